"""Two workers behind one endpoint (their own Redis): both get traffic; one killed mid-stream
fails its in-flight streams cleanly while new requests go to the other; SIGTERM drains.

The tests run in file order on the same pair of workers (the later ones stop them)."""
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.pb import common_pb2, inference_pb2, inference_pb2_grpc
from services.registry import PREFIX, TTL_S
from tests.helpers import RedisServer
from tests.services.conftest import start_endpoint, start_worker, wait_workers


@pytest.fixture(scope="module")
def pair(chat_model_dir, tokenizer_service, tmp_path_factory):
    d = tmp_path_factory.mktemp("pair")
    (d / "redis").mkdir()
    server = RedisServer(d / "redis").start()
    a = start_worker(chat_model_dir, server.url, d, "worker-a")
    b = start_worker(chat_model_dir, server.url, d, "worker-b")
    a.wait_healthy(), b.wait_healthy()
    ep = start_endpoint(server.url, tokenizer_service.address, d).wait_healthy()
    assert len(wait_workers(ep, 2)) == 2
    yield SimpleNamespace(redis=server, a=a, b=b, endpoint=ep)
    for s in (ep, a, b):
        s.stop()
    server.stop()


def request(n, text="Tell me about the sea"):
    return inference_pb2.GenerateRequest(text=text, params=common_pb2.SamplingParams(max_new_tokens=n,
                                                                                     ignore_eos=True))


def stub(service):
    return inference_pb2_grpc.InferenceStub(grpc.insecure_channel(service.address))


def serving(service) -> bool:
    with grpc.insecure_channel(service.address) as ch:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return r.status == health_pb2.HealthCheckResponse.SERVING


def test_both_workers_get_traffic(pair):
    s = stub(pair.endpoint)
    for _ in range(4):  # one at a time: the tie between idle workers goes to the one picked least recently
        assert s.GenerateUnary(request(3), timeout=60).finish.completion_tokens == 3
    a0, b0 = (w.metric("internlm_generated_tokens_total") for w in (pair.a, pair.b))
    # at once: the least-loaded worker takes each. Long enough (120 tokens) that none ends before the
    # last is routed, now that a decode step runs only the live rows and is fast.
    with ThreadPoolExecutor(4) as pool:
        done = list(pool.map(lambda _: s.GenerateUnary(request(120), timeout=60), range(4)))
    assert all(r.finish.completion_tokens == 120 for r in done)
    routed = {w.address: w.requests_routed for w in wait_workers(pair.endpoint, 2)}
    assert routed == {pair.a.address: 4, pair.b.address: 4}
    assert pair.a.metric("internlm_generated_tokens_total") - a0 == 240
    assert pair.b.metric("internlm_generated_tokens_total") - b0 == 240


def test_killing_a_worker_leaves_the_endpoint_serving(pair):
    s = stub(pair.endpoint)
    calls = [s.Generate(request(240), timeout=120) for _ in range(4)]
    for c in calls:
        next(c)  # all four are running, two on each worker
    on_a = pair.a.metric("internlm_active_requests")
    assert on_a == 2 and pair.b.metric("internlm_active_requests") == 2
    pair.a.kill()
    outcomes = []
    for c in calls:
        try:
            outcomes.append(sum(len(r.token_ids) for r in c) + 1)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE and "went away" in e.details(), e
            outcomes.append(e.code())
    assert outcomes.count(240) == 2 and outcomes.count(grpc.StatusCode.UNAVAILABLE) == 2
    # New requests go to the live worker at once, before the dead one's registration expires.
    for _ in range(4):
        assert s.GenerateUnary(request(4), timeout=60).finish.completion_tokens == 4
    assert serving(pair.endpoint)
    deadline = time.monotonic() + TTL_S + 5
    while len(wait_workers(pair.endpoint, 0)) != 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [w.address for w in wait_workers(pair.endpoint, 0)] == [pair.b.address]


def test_sigterm_drains_running_streams_and_leaves_the_registry(pair):
    call = stub(pair.b).Generate(request(200), timeout=120)
    first = next(call)
    pair.b.proc.send_signal(signal.SIGTERM)
    rest = list(call)
    assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 200
    assert rest[-1].finish.reason == common_pb2.FINISH_REASON_LENGTH
    assert pair.b.proc.wait(60) == 0
    assert list(redis.Redis.from_url(pair.redis.url).scan_iter(PREFIX + "*")) == []
    time.sleep(1)  # the endpoint's next look at the registry
    with pytest.raises(grpc.RpcError) as e:
        stub(pair.endpoint).GenerateUnary(request(2), timeout=30)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "no inference worker" in e.value.details()
    assert serving(pair.endpoint)
