"""Serving benchmark: the core in-process vs the same model behind the endpoint and a worker,
side by side in one run (real redis-server, worker and endpoint subprocesses on loopback).

    .venv/bin/python bench/serving_bench.py [--model DIR | --preset demo] [--new-tokens 64] [--reps 5]

(a) one greedy request of N new tokens: core ``generate`` in this process vs ``Generate``
    streamed through endpoint -> worker over gRPC (both with one slot): overhead %.
(b) aggregate tokens/s of 1, 4, 8, 16 concurrent streams on one worker with 16 slots.
(c) time to first token under that load (median and p90 per concurrency).
Without --model, a model of the given preset with random weights is made in a temporary folder.
"""
from __future__ import annotations

import os

os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")  # this process imports MindSpore too

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    def __init__(self, argv, log: Path, env=None):
        self.log = log
        self.proc = subprocess.Popen(argv, cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                     env=os.environ if env is None else env)

    def stop(self):
        from services.launcher import terminate

        terminate(self.proc, 60)


def model_arguments(description: str, preset: str) -> argparse.ArgumentParser:
    """The options every serving benchmark takes: which model, and how many tokens to generate."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", help="model folder (default: --preset with random weights)")
    ap.add_argument("--preset", default=preset)
    ap.add_argument("--new-tokens", type=int, default=64)
    return ap


def make_model(preset: str, folder: Path) -> Path:
    from internlm_core.config import Config
    from internlm_core.loader import save_model
    from internlm_core.model import InternLMForCausalLM, init_weights
    from internlm_core.tokenizer import BUNDLED_MODEL

    cfg = Config.from_name(preset)
    model = InternLMForCausalLM(cfg)
    init_weights(model, seed=0, std=0.02)
    return save_model(model, cfg, folder / preset, tokenizer_from=BUNDLED_MODEL.parent)


def start_worker(model: Path, redis_url: str, slots: int, max_len: int, tmp: Path, name: str) -> Proc:
    from services.server_common import wait_healthy

    port = free_port()
    p = Proc([sys.executable, "-m", "services.inference_worker", "--model", str(model), "--port", str(port),
              "--metrics-port", str(free_port()), "--redis-url", redis_url, "--max-batch", str(slots),
              "--max-queue", "32", "--max-len", str(max_len)], tmp / f"{name}.log")
    wait_healthy(f"127.0.0.1:{port}", timeout=600)
    return p


def wait_registered(redis_url: str, n: int) -> None:
    from services.registry import wait_for_workers

    wait_for_workers(redis_url, n, timeout=60)


def at_once(fn, items) -> tuple[list, float]:
    """``fn(item)`` for every item in its own thread, all started together: (results, wall seconds)."""
    results = [None] * len(items)
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, fn(items[i]))) for i in range(len(items))]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return results, time.perf_counter() - t


def wait_http(base: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Until ``base``/health answers 200 (RuntimeError past ``timeout`` or when ``proc`` exits)."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
            raise RuntimeError(f"{base} did not come up")
        time.sleep(0.2)


def stream(stub, request):
    """(tokens, seconds to first token, seconds in all) of one streamed Generate."""
    t0 = time.perf_counter()
    first, n = None, 0
    for chunk in stub.Generate(request, timeout=600):
        if first is None and chunk.token_ids:
            first = time.perf_counter() - t0
        n += len(chunk.token_ids)
    return n, first, time.perf_counter() - t0


def main() -> None:
    ap = model_arguments(__doc__.splitlines()[0], "demo")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--concurrency", default="1,4,8,16")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    procs = []
    try:
        import grpc
        import numpy as np

        from internlm_core.engine import Engine
        from internlm_core.generation import SamplingParams, generate
        from internlm_core.loader import load_model
        from internlm_core.tokenizer import Tokenizer
        from services.pb_convert import sampling_to_pb
        from services.pb import common_pb2, inference_pb2, inference_pb2_grpc
        from services.server_common import wait_healthy

        model_dir = Path(args.model) if args.model else make_model(args.preset, tmp)
        tok = Tokenizer(model_dir / "tokenizer.model")
        prompt = tok.encode("The history of the city begins in the early years of the")
        max_len = len(prompt) + args.new_tokens + 8
        params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
        request = inference_pb2.GenerateRequest(ids=common_pb2.TokenIds(ids=prompt), params=sampling_to_pb(params))

        (tmp / "redis").mkdir()
        redis_port = free_port()
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        procs.append(Proc(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--dir",
                           str(tmp / "redis"), "--save", ""], tmp / "redis.log"))
        ep_port = free_port()
        # The endpoint never loads MindSpore: let it use protobuf's fast (upb) runtime.
        ep_env = {k: v for k, v in os.environ.items() if k != "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"}
        procs.append(Proc([sys.executable, "-m", "services.endpoint", "--port", str(ep_port), "--metrics-port",
                           str(free_port()), "--redis-url", redis_url, "--no-jobs"], tmp / "endpoint.log", ep_env))
        wait_healthy(f"127.0.0.1:{ep_port}", timeout=120)
        stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{ep_port}"))

        # (a) one request, one slot on both sides; runs interleaved so that load from elsewhere hits both.
        print(f"model: {model_dir.name}; prompt {len(prompt)} tokens, {args.new_tokens} new tokens; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
        worker = start_worker(model_dir, redis_url, 1, max_len, tmp, "worker-1slot")
        procs.append(worker)
        wait_registered(redis_url, 1)
        engine = Engine(load_model(model_dir), max_batch=1, max_len=max_len)
        list(generate(engine, prompt, params))  # compile
        stream(stub, request)  # warm the channel
        core_s, grpc_s = [], []
        for _ in range(args.reps):
            t = time.perf_counter()
            ids = [e.token_id for e in generate(engine, prompt, params, tok)]
            core_s.append(time.perf_counter() - t)
            n, _, total = stream(stub, request)
            assert n == len(ids) == args.new_tokens
            grpc_s.append(total)
        # Other processes' load only ever adds time, so the fastest run of each side is the
        # steadiest estimate on a shared machine; the median is shown too.
        overhead = {"core_s": core_s, "grpc_s": grpc_s}
        for stat in (min, statistics.median):
            core, remote = stat(core_s), stat(grpc_s)
            overhead[f"overhead_pct_{stat.__name__}"] = 100 * (remote / core - 1)
            print(f"(a) {args.new_tokens} tokens, {stat.__name__} of {args.reps}: core {core * 1000:.0f} ms "
                  f"({args.new_tokens / core:.1f} tok/s), endpoint+worker gRPC {remote * 1000:.0f} ms "
                  f"({args.new_tokens / remote:.1f} tok/s): overhead {100 * (remote / core - 1):+.1f}%", flush=True)
        del engine
        worker.stop()
        procs.remove(worker)

        # (b) + (c) one worker with 16 slots; N streams at once.
        worker = start_worker(model_dir, redis_url, max(levels), max_len, tmp, "worker-16slot")
        procs.append(worker)
        time.sleep(6)  # the stopped worker's registration is gone (it left on SIGTERM) and the new one is in
        wait_registered(redis_url, 1)
        stream(stub, request)
        load = {}
        for c in levels:
            results = [None] * c
            barrier = threading.Barrier(c)

            def run(i):
                barrier.wait()
                results[i] = stream(stub, request)

            t = time.perf_counter()
            threads = [threading.Thread(target=run, args=(i,)) for i in range(c)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            wall = time.perf_counter() - t
            tokens = sum(r[0] for r in results)
            ttft = sorted(r[1] for r in results)
            load[c] = {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
                       "ttft_median_s": statistics.median(ttft), "ttft_p90_s": float(np.percentile(ttft, 90))}
        base = load[levels[0]]["tok_s"]
        for c, r in load.items():
            print(f"(b) {c:>2} streams: {r['tok_s']:7.1f} tok/s aggregate ({r['tok_s'] / base:4.1f}x of "
                  f"{levels[0]})   (c) TTFT median {r['ttft_median_s'] * 1000:6.0f} ms, "
                  f"p90 {r['ttft_p90_s'] * 1000:6.0f} ms", flush=True)
        print(f"load average at the end: {os.getloadavg()[0]:.1f}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"single": overhead, "concurrency": load}, indent=2))
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
