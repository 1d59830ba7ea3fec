"""The endpoint's cap on long calls (``--max-streams``, ``--max-streams-per-key``): streams held
open by one key (WatchJob on a job that never moves, reflection waiting on its client) are
refused past the key's share and past
the total, on both doors, with RESOURCE_EXHAUSTED / 429 naming the cap, while another key's
stream, short calls and health are still answered at once, and a closed stream frees its place.
A real endpoint with two keys in front of the session's worker."""
from __future__ import annotations

import threading
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.auth import client_channel
from services.jobs.records import JobRecords
from services.pb import (endpoint_pb2, endpoint_pb2_grpc, inference_pb2_grpc, jobs_pb2, jobs_pb2_grpc, tokenizer_pb2,
                         tokenizer_pb2_grpc)
from tests.helpers import free_port
from tests.services.conftest import start_endpoint, wait_http
from tests.services.test_auth import generate, wait_registered

KEYS, PER_KEY, TOTAL = ("stream-key-one", "stream-key-two"), 3, 5


@pytest.fixture(scope="module")
def capped(stack_redis, tokenizer_service, worker, stack_dir):
    port = free_port()
    s = start_endpoint(stack_redis.url, tokenizer_service.address, stack_dir, "endpoint-capped",
                       "--http-port", str(port), "--api-key", ",".join(KEYS), "--max-streams", str(TOTAL),
                       "--max-streams-per-key", str(PER_KEY)).wait_healthy()
    s.base = f"http://127.0.0.1:{port}"
    wait_http(s.base)
    wait_registered(client_channel(s.address, KEYS[0]))
    yield s
    s.stop()


@pytest.fixture
def queued_job(stack_redis):
    """A job record that stays QUEUED (no job worker takes it), so its watchers stay open."""
    records = JobRecords(stack_redis.url)
    rec, _ = records.create("convert", {"source": "stream-limits"}, "stream-limits")
    yield rec["id"]
    records.update(rec["id"], state="CANCELLED")  # ends any watcher still open
    records.r.delete(records.key(rec["id"]))
    records.r.zrem(records.index, rec["id"])


def watch(channel, job_id):
    """An open WatchJob stream (its first message read: admitted), or the RpcError refusing it."""
    stream = jobs_pb2_grpc.JobsStub(channel).WatchJob(jobs_pb2.WatchJobRequest(id=job_id), timeout=120)
    next(stream)
    return stream


def reflect(channel):
    """An open reflection stream (its first answer read), whose client sends nothing more until
    the stream is cancelled: the server's side waits on it, holding its place."""
    quiet = threading.Event()

    def requests():
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        quiet.wait(120)
    stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(requests(), timeout=120)
    next(stream)
    stream.add_done_callback(lambda _: quiet.set())
    return stream


def refused(call) -> str:
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value
    return e.value.details()


def complete(base: str, key: str, **body) -> httpx.Response:
    return httpx.post(f"{base}/v1/completions", headers={"authorization": f"Bearer {key}"}, timeout=60,
                      json={"prompt": "Hello", "max_tokens": 3, **body})


def served_at_once(channel, capped, key: str) -> None:
    """Another caller's stream, a short call and health, each answered within seconds."""
    start = time.monotonic()
    stub = inference_pb2_grpc.InferenceStub(channel)
    tokens = [t for r in stub.Generate(generate(8), timeout=30) for t in r.token_ids]
    assert len(tokens) == 8
    assert endpoint_pb2_grpc.EndpointStub(channel).ListWorkers(endpoint_pb2.ListWorkersRequest(), timeout=5).workers
    with grpc.insecure_channel(capped.address) as plain:
        assert health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
    assert httpx.get(f"{capped.base}/health", timeout=5).status_code == 200
    assert time.monotonic() - start < 10


def wait_open(capped, n: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while capped.metric("internlm_open_streams") != n:
        assert time.monotonic() < deadline, f"{capped.metric('internlm_open_streams')} streams open, not {n}"
        time.sleep(0.1)


def test_streams_past_the_caps_are_refused_and_everyone_else_is_served(capped, queued_job):
    one, two = (client_channel(capped.address, k) for k in KEYS)
    held = [watch(one, queued_job) for _ in range(PER_KEY - 1)] + [reflect(one)]
    wait_open(capped, PER_KEY)

    # The key's share is taken: its next stream (of either kind), its unary generation and its HTTP
    # generation are refused.
    assert "--max-streams-per-key" in refused(lambda: watch(one, queued_job))
    assert "--max-streams-per-key" in refused(lambda: reflect(one))
    assert "--max-streams-per-key" in refused(lambda: inference_pb2_grpc.InferenceStub(one).GenerateUnary(
        generate(), timeout=30))
    assert "--max-streams-per-key" in refused(lambda: tokenizer_pb2_grpc.TokenizerStub(one).Encode(
        tokenizer_pb2.EncodeRequest(text="Hello"), timeout=30))
    r = complete(capped.base, KEYS[0])
    assert r.status_code == 429 and "--max-streams-per-key" in r.json()["error"]["message"], r.text
    # An HTTP request takes a place per choice, all or none: more choices than a key's share are refused.
    r = complete(capped.base, KEYS[1], n=PER_KEY + 1)
    assert r.status_code == 429 and "--max-streams-per-key" in r.json()["error"]["message"], r.text
    # The other key is served meanwhile, on both doors.
    served_at_once(two, capped, KEYS[1])
    assert complete(capped.base, KEYS[1]).status_code == 200

    # The other key fills the rest: the total is reached, for everyone.
    held += [watch(two, queued_job) for _ in range(TOTAL - PER_KEY)]
    message = refused(lambda: watch(two, queued_job))
    assert "--max-streams)" in message and "per-key" not in message, message
    r = complete(capped.base, KEYS[1])
    assert r.status_code == 429 and "--max-streams)" in r.json()["error"]["message"], r.text
    # Short calls and health still find a thread.
    assert endpoint_pb2_grpc.EndpointStub(two).ListWorkers(endpoint_pb2.ListWorkersRequest(), timeout=5).workers
    with grpc.insecure_channel(capped.address) as plain:
        assert health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING

    # A stream that ends gives its place back.
    held.pop().cancel()
    wait_open(capped, TOTAL - 1)
    held.append(watch(two, queued_job))
    for stream in held:
        stream.cancel()
    wait_open(capped, 0)
