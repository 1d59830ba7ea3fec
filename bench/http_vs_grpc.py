"""The OpenAI HTTP path against the gRPC path and the core in-process, same requests, one run.

    .venv/bin/python bench/http_vs_grpc.py [--preset bench-serve | --model DIR] [--new-tokens 64] [--reps 3]

A real redis-server, tokenizer service, one inference worker with its defaults (8 slots, the
model's positions) and the endpoint with its HTTP side, as the launcher starts them.
(a) One greedy request of N new tokens (the same token ids everywhere): core ``generate`` in this
    process (an engine like the worker's: 8 slots, the model's positions), gRPC ``Generate`` through the endpoint, and ``POST /v1/completions``
    streamed through the same endpoint (httpx); median of --reps, and each path's overhead.
(b) Time to first token over HTTP and over gRPC with 8 and 32 concurrent streams (32: 24 wait for
    a slot), median and p90.
"""
from __future__ import annotations

import os

os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")  # this process imports MindSpore too

import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


_CLIENT = []  # one pooled HTTP client, as an application keeps one (the gRPC side shares a channel too)


def http_stream(base: str, ids: list[int], new: int):
    """(tokens, seconds to first token, seconds in all) of one streamed /v1/completions."""
    import httpx

    if not _CLIENT:
        # httpx.stream() without a client builds a new one per call, under the GIL with the other
        # streams' threads: measured, 8 streams' HTTP TTFT 298-316 ms that way, 165 ms with this one
        _CLIENT.append(httpx.Client(timeout=600, limits=httpx.Limits(max_connections=64)))
    body = {"prompt": ids, "max_tokens": new, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, n = None, 0
    with _CLIENT[0].stream("POST", f"{base}/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"][0]["text"]:
                first = time.perf_counter() - t0
    return n, first if first is not None else time.perf_counter() - t0, time.perf_counter() - t0


def concurrent(fn, jobs: list) -> list:
    out = [None] * len(jobs)
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, fn(jobs[i]))) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def main() -> None:
    from serving_bench import Proc, free_port, make_model, model_arguments, stream, wait_http

    ap = model_arguments(__doc__.splitlines()[0], "bench-serve")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--streams", default="8,32")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="http-vs-grpc-"))
    procs = []
    try:
        import grpc
        import numpy as np

        from internlm_core.engine import Engine
        from internlm_core.generation import SamplingParams, generate
        from internlm_core.loader import load_model
        from services.pb import common_pb2, inference_pb2, inference_pb2_grpc
        from services.registry import wait_for_workers
        from services.server_common import wait_healthy

        model_dir = Path(args.model) if args.model else make_model(args.preset, tmp)
        rng = np.random.default_rng(0)
        (tmp / "redis").mkdir()
        redis_port = free_port()
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        procs.append(Proc(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--dir",
                           str(tmp / "redis"), "--save", ""], tmp / "redis.log"))
        tok_port, worker_port, ep_port, http_port = free_port(), free_port(), free_port(), free_port()
        procs.append(Proc([sys.executable, "-m", "services.tokenizer_service", "--port", str(tok_port),
                           "--metrics-port", str(free_port())], tmp / "tokenizer.log"))
        procs.append(Proc([sys.executable, "-m", "services.inference_worker", "--model", str(model_dir), "--port",
                           str(worker_port), "--metrics-port", str(free_port()), "--redis-url", redis_url],
                          tmp / "worker.log"))
        procs.append(Proc([sys.executable, "-m", "services.endpoint", "--port", str(ep_port), "--metrics-port",
                           str(free_port()), "--redis-url", redis_url, "--tokenizer-address",
                           f"127.0.0.1:{tok_port}", "--http-port", str(http_port), "--no-jobs"], tmp / "endpoint.log"))
        for port in (tok_port, worker_port, ep_port):
            wait_healthy(f"127.0.0.1:{port}", timeout=900)
        wait_for_workers(redis_url, 1, timeout=60)
        base = f"http://127.0.0.1:{http_port}"
        wait_http(base, 30)
        stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{ep_port}"))
        params = common_pb2.SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)

        def grpc_one(ids):
            return stream(stub, inference_pb2.GenerateRequest(ids=common_pb2.TokenIds(ids=ids), params=params))

        engine = Engine(load_model(model_dir), max_batch=8)  # as the worker's defaults: 8 slots, all positions
        core_params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)

        def core_one(ids):
            t0 = time.perf_counter()
            n = sum(1 for _ in generate(engine, ids, core_params))
            return n, None, time.perf_counter() - t0

        def prompt():
            return rng.integers(3, 30000, 32).tolist()

        for fn in (core_one, grpc_one, lambda ids: http_stream(base, ids, args.new_tokens)):
            fn(prompt())  # warm: compile, connect
        paths = {"in-process": core_one, "gRPC": grpc_one,
                 "HTTP": lambda ids: http_stream(base, ids, args.new_tokens)}
        times = {name: [] for name in paths}
        for _ in range(args.reps):  # the same prompt on every path, paths interleaved
            ids = prompt()
            for name, fn in paths.items():
                n, _, seconds = fn(ids)
                assert n == args.new_tokens, (name, n)
                times[name].append(seconds)
        base_t = statistics.median(times["in-process"])
        print(f"(a) one greedy request, 32-token prompt, {args.new_tokens} new tokens, median of {args.reps}:")
        for name, ts in times.items():
            t = statistics.median(ts)
            print(f"    {name:10s} {t * 1e3:7.0f} ms  ({args.new_tokens / t:5.1f} tok/s, "
                  f"{(t / base_t - 1) * 100:+5.1f}% vs in-process)", flush=True)
        print("(b) time to first token under load (median / p90), same prompts on both paths:")
        for c in [int(x) for x in args.streams.split(",")]:
            for name, fn in (("gRPC", grpc_one), ("HTTP", lambda ids: http_stream(base, ids, args.new_tokens))):
                t0 = time.perf_counter()
                res = concurrent(fn, [prompt() for _ in range(c)])
                wall = time.perf_counter() - t0
                ttft = [r[1] for r in res]
                print(f"    {c:2d} streams {name:5s} TTFT {statistics.median(ttft) * 1e3:6.0f} / "
                      f"{np.percentile(ttft, 90) * 1e3:6.0f} ms, {sum(r[0] for r in res) / wall:6.1f} tok/s",
                      flush=True)
    finally:
        for p in reversed(procs):
            p.stop()


if __name__ == "__main__":
    main()
