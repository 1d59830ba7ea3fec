"""Export benchmark: the exported MindIR pair (static and dynamic) vs the eager core Engine, same run.

    .venv/bin/python bench/export_bench.py [--preset bench-100m] [--batch 1] [--max-len 256]
                                           [--prompt 128] [--steps 32] [--rounds 3] [--threads 2]

One process, one random model: exports it twice (static and --dynamic shapes), then measures, in
interleaved rounds so that load on a shared machine hits every engine alike: prefill time of one
prompt, and decode tokens/s with every slot active (engine.decode only: no sampling cost). Greedy
tokens of the three engines are compared first. Medians over rounds are reported.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def peak_rss(kind: str, folder: Path, batch: int, max_len: int) -> float:
    """Peak RSS (MB) of a fresh process that loads one engine and runs one prefill and one decode
    (VmHWM: ru_maxrss would carry this big parent's peak across exec)."""
    code = f"""
import sys, numpy as np
sys.path.insert(0, {str(REPO)!r})
from internlm_core.engine import Engine, open_engine
e = open_engine({str(folder)!r}, {batch}, {max_len})
e.prefill([0], [[1, 2, 3]]); e.decode(np.zeros({batch}, np.int32), np.zeros({batch}, np.int64))
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="bench-100m")
    ap.add_argument("--batch", type=int, default=1, help="cache slots, all active while decoding")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=128, help="prefill prompt length")
    ap.add_argument("--steps", type=int, default=32, help="decode steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    import mindspore as ms
    import numpy as np

    from internlm_core.config import Config
    from internlm_core.engine import Engine
    from internlm_core.export import export_mindir
    from internlm_core.exported import ExportedEngine
    from internlm_core.generation import SamplingParams, generate_batch
    from internlm_core.loader import load_model, save_model
    from internlm_core.model import InternLMForCausalLM, init_weights

    ms.set_context(device_target="CPU")
    cfg = Config.from_name(args.preset)
    work = Path(tempfile.mkdtemp(prefix="export-bench-"))
    model = InternLMForCausalLM(cfg)
    init_weights(model, seed=0, std=0.02)
    save_model(model, cfg, work / "model")
    del model
    print(f"model {args.preset}: {cfg.num_parameters() / 1e6:.0f}M parameters; batch {args.batch}, "
          f"cache {args.max_len} positions, prompt {args.prompt}, {args.threads} threads", flush=True)

    export_s, sizes = {}, {}
    for kind in ("static", "dynamic"):
        t = time.perf_counter()
        export_mindir(work / "model", work / kind, max_batch=args.batch, max_len=args.max_len,
                      dynamic=kind == "dynamic")
        export_s[kind] = time.perf_counter() - t
        sizes[kind] = sum(f.stat().st_size for f in (work / kind).rglob("*") if f.is_file()) / 2**20

    engines = {"eager": Engine(load_model(work / "model"), args.batch, args.max_len),
               "static": ExportedEngine(work / "static"), "dynamic": ExportedEngine(work / "dynamic")}

    rng = np.random.default_rng(0)
    long = [1] + rng.integers(3, cfg.vocab_size, args.prompt - 1).tolist()
    short = [[1] + rng.integers(3, cfg.vocab_size, 31 - i).tolist() for i in range(args.batch)]
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    tokens = {n: [r.token_ids for r in generate_batch(e, short, greedy)] for n, e in engines.items()}  # compiles
    for e in engines.values():
        e.prefill([0], [long])  # compile the prompt's shape

    prefill, decode = {n: [] for n in engines}, {n: [] for n in engines}
    for _ in range(args.rounds):
        for name, e in engines.items():
            t = time.perf_counter()
            e.prefill([0], [long])
            prefill[name].append(time.perf_counter() - t)
            logits = e.prefill(list(range(args.batch)), short)
            toks = logits.argmax(-1).astype(np.int32)
            pos = np.array([len(p) for p in short], np.int64)
            t = time.perf_counter()
            for _ in range(args.steps):
                toks = e.decode(toks, pos).argmax(-1).astype(np.int32)
                pos += 1
            decode[name].append(args.batch * args.steps / (time.perf_counter() - t))

    del engines["static"], engines["dynamic"]
    rss = {n: peak_rss(n, work / ("model" if n == "eager" else n), args.batch, args.max_len)
           for n in ("eager", "static", "dynamic")}
    same = tokens["static"] == tokens["eager"] and tokens["dynamic"] == tokens["eager"]
    print(f"\nexport: static {export_s['static']:.1f} s ({sizes['static']:.0f} MB), "
          f"dynamic {export_s['dynamic']:.1f} s ({sizes['dynamic']:.0f} MB)")
    print(f"greedy tokens identical to eager (12 tokens x {args.batch} rows): {same}")
    print(f"{'':30}{'eager':>10}{'static':>10}{'dynamic':>10}")
    rows = [(f"decode tok/s (batch {args.batch})", {n: np.median(v) for n, v in decode.items()}, "{:10.1f}"),
            (f"prefill {args.prompt} tokens (s)", {n: np.median(v) for n, v in prefill.items()}, "{:10.3f}"),
            ("peak RSS, own process (MB)", rss, "{:10.0f}")]
    for label, vals, fmt in rows:
        print(f"{label:30}" + "".join(fmt.format(vals[n]) for n in ("eager", "static", "dynamic")))
    print(f"(static prefill runs the exported shape: one prompt padded to {args.max_len} tokens)")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
