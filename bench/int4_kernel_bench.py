"""The int4 linear kernel alone, W4A8 (vpdpbusd, on a CPU with AVX512_VNNI) against W4A16, on the
InternLM2-1.8B linears at one row (a decode step of one stream) and four: ``kernels.cc`` built twice
from the same source, as the serving build (-march=native) and with AVX512_VNNI switched off
(-mno-avx512vnni: the W4A16 tile, everything else the same), both called in this process through
ctypes (no MindSpore launch around them), alternating, best of ``--rounds``.

    .venv/bin/python bench/int4_kernel_bench.py [--rows 1,4] [--rounds 7] [--json out.json]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from internlm_core import kernels  # noqa: E402
from internlm_core.quantize import pack_int4, quantize_int4  # noqa: E402
from gemm_bench import timed  # noqa: E402  (bench/ is this script's own folder)

# (N, K) of the InternLM2-1.8B shape's linears as README's serving benchmarks run it: hidden 2048,
# 16 query heads and 8 k/v heads of 128 (wqkv 2048 + 2 x 1024), ffn 8192 (w1 and w3 fused), the
# bench models' vocabulary of 103168 (the real model's is 92544)
SHAPES = {"wqkv": (2048 + 2 * 1024, 2048), "wo": (2048, 2048), "w13": (2 * 8192, 2048), "w2": (2048, 8192),
          "head": (103168, 2048)}
VARIANTS = {"w4a8": [], "w4a16": ["-mno-avx512vnni"]}


def build(folder: Path, extra: list[str]) -> ctypes.CDLL:
    out = folder / f"kernels{''.join(extra)}.so"
    subprocess.run([shutil.which("g++"), *kernels.flags(), *extra, "-o", str(out), str(kernels.SERVING_SOURCE)],
                   check=True, capture_output=True, text=True)
    return ctypes.CDLL(str(out))


def linear_call(lib: ctypes.CDLL, x: np.ndarray, wp: np.ndarray, sp: np.ndarray, y: np.ndarray):
    """A no-argument function running PackedLinear(x, wp, scale) -> y as the AOT op would call it."""
    arrays = [x, wp, sp, y]
    params = (ctypes.c_void_p * 4)(*(a.ctypes.data for a in arrays))
    ndims = (ctypes.c_int * 4)(*(a.ndim for a in arrays))
    shapes_keep = [(ctypes.c_int64 * a.ndim)(*a.shape) for a in arrays]
    shapes = (ctypes.POINTER(ctypes.c_int64) * 4)(*(ctypes.cast(s, ctypes.POINTER(ctypes.c_int64))
                                                    for s in shapes_keep))
    dtypes = (ctypes.c_char_p * 4)(b"float32", b"uint8", b"float32", b"float32")
    fn = lib.PackedLinear

    def run():
        if fn(4, params, ndims, shapes, dtypes, None, None) != 0:
            raise RuntimeError("PackedLinear refused its arguments")
    run.keep = (params, ndims, shapes, shapes_keep, dtypes)  # alive as long as the call
    return run


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,4", help="rows of x, comma separated")
    p.add_argument("--rounds", type=int, default=7, help="timings of each case, the best kept")
    p.add_argument("--json", help="write the results here too")
    a = p.parse_args()
    rng = np.random.default_rng(0)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        libs = {name: build(Path(tmp), extra) for name, extra in VARIANTS.items()}
        bits = {name: lib.Int4ActivationBits() for name, lib in libs.items()}
        if bits != {"w4a8": 8, "w4a16": 32}:
            raise SystemExit(f"this CPU or compiler builds no W4A8 kernel: activation bits {bits}")
        for name, (n, k) in SHAPES.items():
            q, scale = quantize_int4(rng.normal(size=(n, k)).astype(np.float32))
            wp, sp = kernels.pack(pack_int4(q)), kernels.pack(scale)
            del q, scale
            for m in (int(r) for r in a.rows.split(",")):
                x = rng.normal(size=(m, k)).astype(np.float32)
                ys = {v: np.empty((m, n), np.float32) for v in libs}
                calls = {v: linear_call(lib, x, wp, sp, ys[v]) for v, lib in libs.items()}
                times = {v: [] for v in libs}
                for _ in range(a.rounds):  # alternating: the machine's other load falls on both
                    for v, fn in calls.items():
                        times[v].append(timed(fn, 0.25))
                err = np.abs(ys["w4a8"] - ys["w4a16"]).max() / np.abs(ys["w4a16"]).max()
                row = {v: {"best_us": min(t) * 1e6, "median_us": float(np.median(t)) * 1e6} for v, t in times.items()}
                row["max_diff_rel"] = float(err)
                results[f"{name} {n}x{k} rows={m}"] = row
                best = {v: row[v]["best_us"] for v in libs}
                print(f"{name:5s} {n:6d}x{k:<5d} rows={m}  w4a16 {best['w4a16']:8.1f} us (median "
                      f"{row['w4a16']['median_us']:8.1f})  w4a8 {best['w4a8']:8.1f} us (median "
                      f"{row['w4a8']['median_us']:8.1f})  {best['w4a16'] / best['w4a8']:.2f}x  "
                      f"max diff {err:.1e} of max|y|", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
