"""Core benchmark: this project (MindSpore, graph-mode steps) vs HF transformers (torch, CPU) on the
same weights, side by side in one run, each side in its own process so peak RSS is its own.

    .venv/bin/python bench/core_bench.py [--preset bench-100m] [--new-tokens 64] [--threads 2]

Measures greedy decode tokens/s at batch 1 and 8, prefill time of a 512-token prompt, peak RSS,
and conversion time / peak RSS against the checkpoint's file size.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def peak_rss_mb() -> float:
    """This process's own peak RSS. (getrusage's ru_maxrss survives exec, so a child started
    from a big parent would report the parent's size; VmHWM belongs to the new image.)"""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def prompts(vocab: int, n: int, length: int, seed: int = 0):
    import numpy as np

    return np.random.default_rng(seed).integers(3, vocab, (n, length)).tolist()


def run_convert(src: str, dst: str) -> dict:
    from internlm_core.convert import hf_to_ms

    t = time.perf_counter()
    hf_to_ms(src, dst)
    return {"seconds": time.perf_counter() - t, "peak_rss_mb": peak_rss_mb()}


def run_ms(model_dir: str, new: int, prefill_len: int) -> dict:
    from internlm_core.engine import Engine
    from internlm_core.generation import SamplingParams, generate_batch
    from internlm_core.loader import load_model

    model = load_model(model_dir)
    vocab = model.config.vocab_size
    greedy = SamplingParams(max_new_tokens=new, stop_token_ids=[])
    out = {}
    eng = Engine(model, max_batch=1, max_len=prefill_len + 16)
    long = prompts(vocab, 1, prefill_len)[0]
    eng.prefill([0], [long])  # compile
    times = []
    for _ in range(3):
        t = time.perf_counter()
        eng.prefill([0], [long])
        times.append(time.perf_counter() - t)
    out["prefill_512_s"] = min(times)
    for batch in (1, 8):
        eng = Engine(model, max_batch=batch, max_len=32 + new + 1)
        ps = prompts(vocab, batch, 32, seed=batch)
        generate_batch(eng, ps, greedy.replace(max_new_tokens=4))  # compile prefill + decode
        t0 = time.perf_counter()
        eng.prefill(list(range(batch)), ps)
        t1 = time.perf_counter()
        res = generate_batch(eng, ps, greedy)
        t2 = time.perf_counter()
        # decode-only rate: total minus one prefill
        out[f"decode_b{batch}_tok_s"] = batch * (new - 1) / ((t2 - t1) - (t1 - t0))
        out[f"tokens_b{batch}"] = [r.token_ids[:8] for r in res[:1]]
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def run_hf(hf_dir: str, new: int, prefill_len: int, preset: str) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    from internlm_core.config import Config
    from tests.helpers import llama_config

    cfg = Config.from_hf_config(Path(hf_dir) / "config.json")
    model = LlamaForCausalLM.from_pretrained(hf_dir, config=llama_config(cfg), torch_dtype=torch.float32).eval()
    vocab = cfg.vocab_size
    out = {}
    long = torch.tensor(prompts(vocab, 1, prefill_len))
    with torch.no_grad():
        model(long)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            model(long)
            times.append(time.perf_counter() - t)
        out["prefill_512_s"] = min(times)
        for batch in (1, 8):
            ps = torch.tensor(prompts(vocab, batch, 32, seed=batch))
            kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
            model.generate(ps, max_new_tokens=4, min_new_tokens=4, **kw)
            t0 = time.perf_counter()
            model(ps)
            t1 = time.perf_counter()
            res = model.generate(ps, max_new_tokens=new, min_new_tokens=new, **kw)
            t2 = time.perf_counter()
            out[f"decode_b{batch}_tok_s"] = batch * (new - 1) / ((t2 - t1) - (t1 - t0))
            out[f"tokens_b{batch}"] = [res[0, 32:40].tolist()]
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def child(kind: str, *args) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", kind, *map(str, args)], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="bench-100m")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", nargs="+")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.child:
        kind, *rest = args.child
        if kind == "hf":
            import torch

            torch.set_num_threads(args.threads)
        fn = {"convert": run_convert, "ms": run_ms, "hf": run_hf}[kind]
        conv = [str, str] if kind == "convert" else [str, int, int] + ([str] if kind == "hf" else [])
        print(json.dumps(fn(*[c(a) for c, a in zip(conv, rest)])))
        return

    from internlm_core.config import Config
    from tests.helpers import hf_reference_model, save_hf_folder

    cfg = Config.from_name(args.preset)
    work = Path(tempfile.mkdtemp(prefix="core-bench-"))
    hf_dir = save_hf_folder(hf_reference_model(cfg, scale=0.02), cfg, work / "hf")
    size_mb = sum(f.stat().st_size for f in hf_dir.iterdir()) / 2**20
    print(f"model {args.preset}: {cfg.num_parameters() / 1e6:.0f}M parameters, checkpoint {size_mb:.0f} MB, "
          f"{args.threads} threads", flush=True)
    conv = child("convert", hf_dir, work / "ms")
    ms = child("ms", work / "ms", args.new_tokens, args.prefill)
    hf = child("hf", hf_dir, args.new_tokens, args.prefill, args.preset)
    same = ms["tokens_b1"] == hf["tokens_b1"] and ms["tokens_b8"] == hf["tokens_b8"]
    print(f"\nconversion: {conv['seconds']:.2f} s, peak RSS {conv['peak_rss_mb']:.0f} MB "
          f"for a {size_mb:.0f} MB checkpoint")
    print(f"greedy tokens identical (first 8, b1 and b8 row 0): {same}")
    print(f"{'':28}{'this project':>14}{'transformers':>14}{'ratio':>8}")
    for key, label, better in [("decode_b1_tok_s", "decode tok/s, batch 1", "hi"),
                               ("decode_b8_tok_s", "decode tok/s, batch 8", "hi"),
                               ("prefill_512_s", f"prefill {args.prefill} tokens (s)", "lo"),
                               ("peak_rss_mb", "peak RSS (MB)", "lo")]:
        a, b = ms[key], hf[key]
        print(f"{label:28}{a:14.2f}{b:14.2f}{(a / b):8.2f}")


if __name__ == "__main__":
    main()
