"""Serving from weights in their stored precision: decode tokens/s and peak RSS of an engine on a
random checkpoint saved in bf16 (or fp16 / fp32), loaded as ``open_engine`` loads it.

    .venv/bin/python bench/weights_bench.py [--preset bench-serve | --shape internlm2-1.8b] [--dtype bfloat16]
        [--code DIR]      # another checkout's internlm_core (e.g. main's, to compare with the fp32 upcast)
        [--against float32]  # the same weights stored fp32, served in the same process, steps alternated
        [--worker]        # one inference worker (4 slots x --max-len) instead, 1 and 4 greedy gRPC streams
        [--quantize int8]    # serve the --dtype folder's linears quantised to int8 at load (W8A16 kernel)

The checkpoint is written tensor by tensor into a cache folder (``--work``, kept between runs, so
two checkouts are measured on the same file); the engine runs in its own process, so its peak RSS
(VmHWM) is its own. It gets 4 slots x ``--max-len`` positions; batch 1 and 4 decode ``--steps``
greedy tokens each after 32-token prompts (engine level: prefill, then one decode step per token),
reported over all steps and from the median step (less moved by a busy neighbour on a shared machine).
``--worker`` serves the file with ``services.inference_worker`` of ``--code`` instead (its defaults
but 4 slots x ``--max-len``; the config's family set to v1 so that the bundled tokenizer fits,
weights and compute unchanged): time to healthy (load and warm-up), 64-token greedy streams after
32-token prompts, 1 and 4 at once, tokens/s over wall time, and the worker's peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# InternLM2-1.8B's shape (hidden 2048, 24 layers, 16 query / 8 k/v heads, intermediate 8192), with
# the v1 tokenizer's vocabulary as in issue 24's measurements.
SHAPES = {"internlm2-1.8b": ("internlm2-7b", dict(hidden_size=2048, intermediate_size=8192, num_layers=24,
                                                  num_heads=16, num_kv_heads=8, vocab_size=103168))}

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
def mb(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) / 1024
from internlm_core import kernels
from internlm_core.engine import open_engine
kernels.library()
folder, steps, max_len = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
quantize = sys.argv[5] if len(sys.argv) > 5 and sys.argv[5] else None
base = mb("VmRSS:")
t = time.perf_counter()
eng = open_engine(folder, max_batch=4, max_len=max_len, **({"quantize": quantize} if quantize else {}))
out = {"code": sys.argv[1], "base_rss_mb": base, "load_s": time.perf_counter() - t, "after_load_peak_mb": mb("VmHWM:"),
       "kernels": eng.kernels, "cache_mb": eng.cache_bytes / 2**20}
vocab = eng.config.vocab_size
rng = np.random.default_rng(0)
for b in (1, 4):
    prompts = rng.integers(3, vocab, (b, 32)).tolist()
    slots = list(range(b))
    tok = eng.prefill(slots, prompts).argmax(-1)
    tok = eng.decode(tok, np.full(b, 32), slots=slots).argmax(-1)  # compile
    times = []
    for i in range(steps):
        t = time.perf_counter()
        tok = eng.decode(tok, np.full(b, 33 + i), slots=slots).argmax(-1)
        times.append(time.perf_counter() - t)
    out[f"decode_b{b}_tok_s"] = b * steps / sum(times)
    out[f"decode_b{b}_median_tok_s"] = b / sorted(times)[len(times) // 2]  # less moved by a busy neighbour
    out[f"tokens_b{b}"] = tok.tolist()
out["peak_rss_mb"] = mb("VmHWM:")
print(json.dumps(out))
"""


AB = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
from internlm_core.engine import open_engine
folders, steps, max_len = sys.argv[2].split(","), int(sys.argv[3]), int(sys.argv[4])
quantize = (sys.argv[5] if len(sys.argv) > 5 else "").split(",")
engines = [open_engine(f, max_batch=4, max_len=max_len, **({"quantize": q} if q else {}))
           for f, q in zip(folders, quantize + [""] * len(folders))]
out = {}
for b in (1, 4):
    slots = list(range(b))
    toks = [e.prefill(slots, [[5 + i for i in range(32)]] * b).argmax(-1) for e in engines]
    toks = [e.decode(t, np.full(b, 32), slots=slots).argmax(-1) for e, t in zip(engines, toks)]
    times = [[] for _ in engines]
    for i in range(steps):  # alternate the engines step by step: a busy neighbour slows both alike
        for j, e in enumerate(engines):
            t = time.perf_counter()
            toks[j] = e.decode(toks[j], np.full(b, 33 + i), slots=slots).argmax(-1)
            times[j].append(time.perf_counter() - t)
    out[b] = [b * steps / sum(t) for t in times]
    out[f"same_tokens_b{b}"] = all((t == toks[0]).all() for t in toks)
prompt = [[7 + i % 1000 for i in range(max_len - 8)]]  # prefill: compute-bound, 128-token chunks
best = [float("inf")] * len(engines)
for _ in range(3):
    for j, e in enumerate(engines):
        t = time.perf_counter()
        e.prefill([3], prompt)
        best[j] = min(best[j], time.perf_counter() - t)
out["prefill"] = [len(prompt[0]) / t for t in best]
print(json.dumps(out))
"""


def make_checkpoint(folder: Path, cfg, dtype: str) -> None:
    import numpy as np

    from internlm_core.checkpoint import DTYPE_TO_ST, WEIGHTS_FILE, SafetensorsWriter, atomic_folder, cast

    rng = np.random.default_rng(0)
    st = DTYPE_TO_ST[dtype]
    shapes = cfg.param_shapes()
    with atomic_folder(folder, overwrite=True) as tmp:
        w = SafetensorsWriter(tmp / WEIGHTS_FILE, [(n, st, s) for n, s in shapes.items()], {"format": "ms"})
        for n, s in shapes.items():
            a = np.ones(s, np.float32) if "norm" in n else rng.standard_normal(s, dtype=np.float32) * 0.02
            w.write(n, cast(cast(a, "F32", "BF16"), "BF16", st))  # bf16 values in every dtype: the same weights
        w.close()
        cfg.replace(dtype=dtype).save(tmp)


def run_worker(code: str, folder: Path, max_len: int) -> None:
    import shutil

    import grpc
    import numpy as np

    sys.path.insert(0, str(REPO / "bench"))
    from serving_bench import at_once, free_port, stream

    from internlm_core.tokenizer import BUNDLED_MODEL
    from services.pb import common_pb2, inference_pb2, inference_pb2_grpc
    from services.server_common import wait_healthy

    served = folder.with_name(folder.name + "-worker")  # the same file, a v1 config and the bundled tokenizer
    served.mkdir(exist_ok=True)
    if not (served / "model.safetensors").exists():
        (served / "model.safetensors").symlink_to(folder / "model.safetensors")
    shutil.copyfile(BUNDLED_MODEL, served / "tokenizer.model")
    config = json.loads((folder / "config.json").read_text())
    (served / "config.json").write_text(json.dumps({**config, "family": "internlm"}))
    port, log = free_port(), served / "worker.log"
    # -m from the checkout's folder: its internlm_core and services serve
    proc = subprocess.Popen([sys.executable, "-m", "services.inference_worker", "--model", str(served), "--port",
                             str(port), "--metrics-port", str(free_port()), "--redis-url", "", "--max-batch", "4",
                             "--max-len", str(max_len)], cwd=code, stdout=log.open("wb"), stderr=subprocess.STDOUT)

    def peak_mb():
        with open(f"/proc/{proc.pid}/status") as f:
            return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) / 1024

    try:
        t = time.perf_counter()
        wait_healthy(f"127.0.0.1:{port}", timeout=900)
        print(f"worker ({code}) healthy after {time.perf_counter() - t:.0f} s, peak RSS {peak_mb():.0f} MB", flush=True)
        stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        params = common_pb2.SamplingParams(max_new_tokens=64, ignore_eos=True)
        rng = np.random.default_rng(0)

        def request(prompt):
            return inference_pb2.GenerateRequest(ids=common_pb2.TokenIds(ids=prompt), params=params)

        stream(stub, request(rng.integers(3, 30000, 32).tolist()))
        for n in (1, 4):
            res, seconds = at_once(lambda p: stream(stub, request(p)), rng.integers(3, 30000, (n, 32)).tolist())
            print(f"  {n} stream(s): {sum(r[0] for r in res) / seconds:.2f} tok/s; worker peak RSS "
                  f"{peak_mb():.0f} MB; load average {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bench-serve")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="a named shape instead of a preset")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--code", default=str(REPO), help="the checkout whose internlm_core serves")
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "internlm" / "weights-bench"))
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--worker", action="store_true", help="serve with one inference worker over gRPC instead")
    ap.add_argument("--quantize", choices=["int8"], help="quantise the --dtype folder's linears at load")
    ap.add_argument("--against", help="another dtype of the same weights: both served in one process, their decode "
                                      "steps alternated (a fair speed ratio on a busy machine)")
    args = ap.parse_args()
    label = f"{args.dtype} -> {args.quantize} at load" if args.quantize else args.dtype
    sys.path.insert(0, str(REPO))
    from internlm_core.config import Config

    name = args.shape or args.preset
    cfg = Config.from_name(SHAPES[name][0], **SHAPES[name][1]) if args.shape else Config.from_name(args.preset)
    folder = Path(args.work) / f"{name}-{args.dtype}"
    if not (folder / "config.json").is_file():
        t = time.perf_counter()
        make_checkpoint(folder, cfg, args.dtype)
        print(f"wrote {folder} in {time.perf_counter() - t:.0f} s", flush=True)
    size = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    if args.worker:
        return run_worker(args.code, folder, args.max_len)
    if args.against:
        other = Path(args.work) / f"{name}-{args.against}"
        if not (other / "config.json").is_file():
            make_checkpoint(other, cfg, args.against)
        run = subprocess.run([sys.executable, "-c", AB, args.code, f"{folder},{other}", str(args.steps),
                              str(args.max_len), args.quantize or ""], capture_output=True, text=True, env=env, cwd="/",
                             check=True)
        r = json.loads(run.stdout.strip().splitlines()[-1])
        for b in ("1", "4"):
            mine, theirs = r[b]
            print(f"{name} batch {b}: {label} {mine:.2f} tok/s, {args.against} {theirs:.2f} tok/s, "
                  f"{mine / theirs:.2f}x; same tokens {r['same_tokens_b' + b]}")
        mine, theirs = r["prefill"]
        print(f"{name} prefill of {args.max_len - 8} tokens: {label} {mine:.0f} tok/s, {args.against} "
              f"{theirs:.0f} tok/s, {mine / theirs:.2f}x")
        return
    run = subprocess.run([sys.executable, "-c", CHILD, args.code, str(folder), str(args.steps), str(args.max_len),
                          args.quantize or ""], capture_output=True, text=True, env=env, cwd="/")
    if run.returncode:
        print(f"the engine failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
        sys.exit(1)
    r = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"{name} {label}: {cfg.num_parameters() / 1e6:.0f}M parameters, file {size:.0f} MB; code {args.code}")
    print(f"  load {r['load_s']:.1f} s; peak RSS {r['peak_rss_mb']:.0f} MB "
          f"(after load {r['after_load_peak_mb']:.0f} MB, "
          f"before it {r['base_rss_mb']:.0f} MB; KV cache {r['cache_mb']:.0f} MB); kernels {r['kernels']}")
    print(f"  decode batch 1: {r['decode_b1_tok_s']:.2f} tok/s (median step {r['decode_b1_median_tok_s']:.2f}), "
          f"batch 4: {r['decode_b4_tok_s']:.2f} tok/s (median step {r['decode_b4_median_tok_s']:.2f}) over "
          f"{args.steps} steps; last tokens b1 {r['tokens_b1']} b4 {r['tokens_b4']}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
