"""The training GEMMs alone: the project's kernels (oneDNN's sgemm, sliced over both cores, inside a
MindSpore graph, as the trainer runs them), MindSpore's own MatMul and PyTorch, on the bench-100m
linears' shapes, each framework in its own process. A step is mostly these GEMMs, so this is the
measurement that says how much of a training step's speed is the GEMM kernel's.

    .venv/bin/python bench/gemm_bench.py [--rows 128,512,2048] [--json out.json]

GFLOP/s of y = x W^T (forward), dx = dy W (input gradient) and dW = dy^T x (weight gradient).
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
sys.path.insert(0, str(REPO))
LINEARS = {"attention 768->768": (768, 768), "ffn 768->2048": (768, 2048), "ffn 2048->768": (2048, 768),
           "head 768->32000": (768, 32000)}
GEMM_PASSES = ("forward", "input_grad", "weight_grad")
SIDES = ("kernels", "mindspore", "torch")
REPEAT = 8  # GEMMs per MindSpore graph


def timed(fn, seconds: float = 0.4) -> float:
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n


def mindspore_cases(side: str, m: int, k: int, n: int):
    import mindspore as ms
    import numpy as np
    from mindspore import Tensor, nn, ops

    os.environ["MS_DEV_HOST_BLOCKING_RUN"] = "1"  # as the trainer runs its steps
    from internlm_core import kernels, train_kernels

    rng = np.random.default_rng(0)
    x, w, dy = (Tensor(rng.normal(size=s).astype(np.float32)) for s in ((m, k), (n, k), (m, n)))
    if side == "kernels":
        op_list = (train_kernels.train_linear_op(False, True),
                   kernels._op("LinearGradX", lambda dy, w: dy[:-1] + [w[1]], lambda dy, w: dy, training=True),
                   kernels._op("LinearGradW", lambda dy, x: [dy[-1], x[-1]], lambda dy, x: dy, training=True))
    else:
        op_list = (ops.MatMul(transpose_b=True), ops.MatMul(), ops.MatMul(transpose_a=True))

    class Graph(nn.Cell):
        """REPEAT GEMMs on distinct inputs in one graph: what a launch costs is spread as in a step."""

        def __init__(self, op):
            super().__init__()
            self.op = op

        @ms.jit
        def construct(self, a_list, b):
            return tuple(self.op(a, b) for a in a_list)

    def case(op, a, b):
        graph, copies = Graph(op), tuple(a + float(i) for i in range(REPEAT))
        return lambda: _sync(graph(copies, b)[-1])

    return [case(op, a, b) for op, (a, b) in zip(op_list, ((x, w), (dy, w), (dy, x)))]


def _sync(t):
    t.asnumpy()  # the result is waited for, as a training step's are


def torch_cases(m: int, k: int, n: int):
    import torch

    x, w, dy = torch.randn(m, k), torch.randn(n, k), torch.randn(m, n)
    return [lambda: x @ w.T, lambda: dy @ w, lambda: dy.T @ x]


def worker(side: str, rows: list[int]) -> dict:
    out = {}
    for m in rows:
        for name, (k, n) in LINEARS.items():
            cases = torch_cases(m, k, n) if side == "torch" else mindspore_cases(side, m, k, n)
            per_call = 1 if side == "torch" else REPEAT
            for kind, fn in zip(GEMM_PASSES, cases):
                out[f"{m} {name} {kind}"] = per_call * 2 * m * k * n / timed(fn) / 1e9
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="128,512,2048", help="tokens per step (batch x sequence), comma separated")
    p.add_argument("--json", help="write the results here too")
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    a = p.parse_args()
    rows = [int(r) for r in a.rows.split(",")]
    if a.worker:
        print("RESULT " + json.dumps(worker(a.worker, rows)), flush=True)
        return 0
    results = {}
    for side in SIDES:
        run = subprocess.run([sys.executable, __file__, "--worker", side, "--rows", a.rows], capture_output=True,
                             text=True, cwd=REPO, env={**os.environ, "GLOG_v": "3"})
        line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(run.stdout[-2000:], run.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"{side} failed")
        results[side] = json.loads(line[7:])
    print(f"{'GFLOP/s':42s}" + "".join(f"{s:>11s}" for s in SIDES) + "   kernels/torch")
    for key in results["torch"]:
        vals = [results[s][key] for s in SIDES]
        print(f"{key:42s}" + "".join(f"{v:11.0f}" for v in vals) + f"   {vals[0] / vals[2]:.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
