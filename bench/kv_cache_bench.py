"""KV cache in float16 against float32: decode tokens/s with a long context, and the cache's bytes.

    .venv/bin/python bench/kv_cache_bench.py [--preset bench-serve | --shape internlm2-1.8b] [--context 1000]

One process loads the model once (``load_serving_model``, the bf16 checkpoint that
``bench/weights_bench.py`` writes into its cache folder) and builds two engines on it, one with an
fp32 KV cache and one with the fp16 cache (the default on the CPU kernels), 4 slots each. Each slot
gets a ``--context``-token prompt (prefilled once, so the cache holds real rows), then batch 1 and
batch 4 each decode ``--steps`` greedy tokens from position ``--context`` on, the two engines' steps alternated so that a busy neighbour slows both
alike; tokens/s over the steps and from the median step, and whether the greedy tokens agree.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.weights_bench import SHAPES, make_checkpoint  # noqa: E402

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
from internlm_core.engine import Engine
from internlm_core.loader import load_serving_model
folder, steps, context = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
model = load_serving_model(folder)
dtypes = ("float32", "float16")
engines = [Engine(model, max_batch=4, max_len=context + steps + 8, cache_dtype=d) for d in dtypes]
out = {"cache_mb": [e.cache_bytes / 2**20 for e in engines], "kernels": [e.kernels for e in engines]}
rng = np.random.default_rng(0)
prompts = rng.integers(3, model.config.vocab_size, (4, context)).tolist()
first = []
for e in engines:  # every slot's prompt once; batch 1 then batch 4 decode from position ``context`` on
    t = time.perf_counter()
    first.append(e.prefill([0, 1, 2, 3], prompts).argmax(-1))
    out[f"prefill_s_{e.cache_dtype}"] = time.perf_counter() - t
for b in (1, 4):
    slots = list(range(b))
    toks = [e.decode(f[:b], np.full(b, context), slots=slots).argmax(-1) for e, f in zip(engines, first)]  # compiles
    times, seqs = [[] for _ in engines], [[t.tolist()] for t in toks]
    for i in range(steps):
        for j, e in enumerate(engines):
            t = time.perf_counter()
            toks[j] = e.decode(toks[j], np.full(b, context + 1 + i), slots=slots).argmax(-1)
            times[j].append(time.perf_counter() - t)
            seqs[j].append(toks[j].tolist())
    for d, t in zip(dtypes, times):
        out[f"b{b}_{d}_tok_s"] = b * steps / sum(t)
        out[f"b{b}_{d}_median_tok_s"] = b / sorted(t)[len(t) // 2]
    out[f"b{b}_same_tokens"] = seqs[0] == seqs[1]
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bench-serve")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="a named shape instead of a preset")
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "internlm" / "weights-bench"))
    ap.add_argument("--context", type=int, default=1000, help="cached positions before decoding")
    ap.add_argument("--steps", type=int, default=24)
    args = ap.parse_args()
    from internlm_core.config import Config

    name = args.shape or args.preset
    cfg = Config.from_name(SHAPES[name][0], **SHAPES[name][1]) if args.shape else Config.from_name(args.preset)
    folder = Path(args.work) / f"{name}-bfloat16"
    if not (folder / "config.json").is_file():
        make_checkpoint(folder, cfg, "bfloat16")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    run = subprocess.run([sys.executable, "-c", CHILD, str(REPO), str(folder), str(args.steps), str(args.context)],
                         capture_output=True, text=True, env=env, cwd="/")
    if run.returncode:
        print(f"the engines failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
        sys.exit(1)
    r = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"{name} (bf16 weights), 4 slots, {args.context} cached positions, {args.steps} decode steps; "
          f"KV cache fp32 {r['cache_mb'][0]:.0f} MB, fp16 {r['cache_mb'][1]:.0f} MB; kernels {r['kernels']}")
    for b in (1, 4):
        f32, f16 = r[f"b{b}_float32_tok_s"], r[f"b{b}_float16_tok_s"]
        m32, m16 = r[f"b{b}_float32_median_tok_s"], r[f"b{b}_float16_median_tok_s"]
        print(f"  batch {b}: fp32 cache {f32:.2f} tok/s, fp16 cache {f16:.2f} tok/s, {f16 / f32:.2f}x "
              f"(median step {m32:.2f} vs {m16:.2f}, {m16 / m32:.2f}x); same greedy tokens {r[f'b{b}_same_tokens']}")
    print(f"  load average {os.getloadavg()[0]:.1f}")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
