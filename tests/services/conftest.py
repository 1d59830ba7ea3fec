"""Real servers on loopback for the service tests, each a subprocess started the way the
launcher starts it, with its own log file (shown when a test fails to reach it)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from services.launcher import terminate
from tests.helpers import REPO, RedisServer, free_port

WORKER_SLOTS, WORKER_QUEUE, WORKER_LEN = 4, 8, 256


class Service:
    """One server subprocess: ``address``, ``metrics_url``, ``stop()`` (SIGTERM), ``kill()``; ``env``:
    settings added to its environment; ``tls_ca``: it serves TLS with a certificate this CA signed."""

    def __init__(self, module: str, args: list[str], log: Path, metrics_port: int, port: int,
                 env: dict | None = None, tls_ca: str | None = None):
        self.module, self.log, self.port, self.tls_ca = module, log, port, tls_ca
        self.address = f"127.0.0.1:{port}"
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.proc = subprocess.Popen([sys.executable, "-m", module, "--port", str(port),
                                      "--metrics-port", str(metrics_port), *args],
                                     cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                     env={**os.environ, **env} if env else None)

    def wait_healthy(self, timeout: float = 180) -> "Service":
        from services.server_common import wait_healthy

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.module} exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                wait_healthy(self.address, timeout=2, tls_ca=self.tls_ca)
                return self
            except TimeoutError:
                pass
        raise RuntimeError(f"{self.module} not healthy after {timeout}s:\n{self.log.read_text()[-3000:]}")

    def metrics(self) -> str:
        return urllib.request.urlopen(self.metrics_url, timeout=5).read().decode()

    def metric(self, name: str) -> float:
        """The value of an unlabelled series (e.g. ``internlm_active_requests``)."""
        for line in self.metrics().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def stop(self, timeout: float = 60) -> int:
        return terminate(self.proc, timeout)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def start_worker(model_dir, redis_url: str, log_dir: Path, name: str = "worker", *extra: str, **kw) -> Service:
    return Service("services.inference_worker", ["--model", str(model_dir), "--redis-url", redis_url,
                                       "--max-batch", str(WORKER_SLOTS), "--max-queue", str(WORKER_QUEUE),
                                       "--max-len", str(WORKER_LEN), *extra],
                   log_dir / f"{name}.log", free_port(), free_port(), **kw)


def start_endpoint(redis_url: str, tokenizer_address: str, log_dir: Path, name: str = "endpoint",
                   *extra: str, **kw) -> Service:
    return Service("services.endpoint", ["--redis-url", redis_url, "--tokenizer-address", tokenizer_address,
                                         "--store", str(log_dir / "store"), *extra],
                   log_dir / f"{name}.log", free_port(), free_port(), **kw)


def start_http_endpoint(redis_url: str, tokenizer_address: str, log_dir: Path, name: str, *extra: str) -> Service:
    """An endpoint with its HTTP side on, healthy and answering HTTP; ``.base`` is its URL."""
    port = free_port()
    s = start_endpoint(redis_url, tokenizer_address, log_dir, name, "--http-port", str(port), *extra).wait_healthy()
    s.base = f"http://127.0.0.1:{port}"
    wait_http(s.base)
    return s


@contextmanager
def model_stack(model_dir: Path, root: Path, name: str, *worker_args: str):
    """A model folder served as a user's stack has it, on its own Redis under ``root``: a tokenizer
    service on the folder's tokenizer, one worker (``worker_args`` added), an endpoint with its HTTP
    side (``.base``). Yields (worker, endpoint, tokenizer service); stops them all on the way out."""
    redis = RedisServer(root / "redis").start()
    services = []
    try:
        tok = Service("services.tokenizer_service", ["--tokenizer", str(model_dir / "tokenizer.model")],
                      root / f"tokenizer-{name}.log", free_port(), free_port())
        services.append(tok)
        worker = start_worker(model_dir, redis.url, root, f"worker-{name}", *worker_args)
        services.append(worker)
        tok.wait_healthy()
        worker.wait_healthy()
        endpoint = start_http_endpoint(redis.url, tok.address, root, f"endpoint-{name}")
        services.append(endpoint)
        assert wait_workers(endpoint, 1)
        yield worker, endpoint, tok
    finally:
        for s in services:
            s.stop()
        redis.stop()


def wait_workers(endpoint: Service, n: int, timeout: float = 60) -> list:
    import grpc

    from services.pb import endpoint_pb2, endpoint_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(endpoint.address) as ch:
        while True:
            workers = endpoint_pb2_grpc.EndpointStub(ch).ListWorkers(endpoint_pb2.ListWorkersRequest(), timeout=5).workers
            if len(workers) >= n or time.monotonic() > deadline:
                return list(workers)
            time.sleep(0.2)


@pytest.fixture(scope="session")
def stack_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def stack_redis(stack_dir):
    (stack_dir / "redis").mkdir()
    server = RedisServer(stack_dir / "redis").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tokenizer_service(stack_dir):
    s = Service("services.tokenizer_service", [], stack_dir / "tokenizer.log", free_port(), free_port())
    yield s.wait_healthy()
    s.stop()


@pytest.fixture(scope="session")
def worker(chat_model_dir, stack_redis, stack_dir):
    """One inference worker on the tiny chat model, registered in the session's Redis."""
    s = start_worker(chat_model_dir, stack_redis.url, stack_dir)
    yield s.wait_healthy()
    s.stop()


@pytest.fixture(scope="session")
def endpoint(stack_redis, tokenizer_service, worker, stack_dir):
    s = start_endpoint(stack_redis.url, tokenizer_service.address, stack_dir).wait_healthy()
    assert wait_workers(s, 1), "the worker never showed up at the endpoint"
    yield s
    s.stop()


@pytest.fixture(scope="session")
def core_engine(chat_model_dir):
    """The same model in-process, one slot: the reference for what the services return."""
    from internlm_core.engine import Engine
    from internlm_core.loader import load_model

    return Engine(load_model(chat_model_dir), max_batch=1, max_len=WORKER_LEN)


@pytest.fixture(scope="session")
def core_tokenizer(chat_model_dir):
    from internlm_core.tokenizer import Tokenizer

    return Tokenizer(chat_model_dir / "tokenizer.model")


@pytest.fixture(scope="session")
def http(stack_redis, tokenizer_service, worker, stack_dir):
    """An endpoint with its HTTP side on (``.base`` is its URL) in front of the session's worker."""
    s = start_http_endpoint(stack_redis.url, tokenizer_service.address, stack_dir, "endpoint-http")
    assert wait_workers(s, 1)
    yield s
    s.stop()


def wait_http(base: str, timeout: float = 30, **kw) -> None:
    """The HTTP side starts just after the gRPC side reports healthy."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(f"{base}/health", timeout=2, **kw)
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture(scope="module")
def client(http):
    """The official ``openai`` client against the session's HTTP endpoint."""
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{http.base}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id
