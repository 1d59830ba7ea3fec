"""The endpoint's gateway with models of two families behind it: an InternLM (v1) worker and an
InternLM2 worker (the real tokenizer.model of each) on one Redis, one endpoint. Logprobs name each
token with the tokenizer of the model that generated it, on the gRPC door (``tokens``, and each
top alternative's) and on the HTTP door (OpenAI's ``token`` strings), and each request is routed to
its model's worker. The Tokenizer service, asked for a model (or one of its adapters), answers with
that model's tokenizer and chat format."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import time

import grpc
import httpx
import pytest

from internlm_core.checkpoint import read_config
from internlm_core.convert import hf_to_ms
from internlm_core.tokenizer import Tokenizer
from services.pb import common_pb2, inference_pb2, inference_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc
from services.pb_convert import chat_to_pb, join_chunks
from tests.helpers import RedisServer, free_port, internlm2_checkpoint, serving_adapter
from tests.services.conftest import Service, start_endpoint, start_http_endpoint, start_worker, wait_workers

CHAT = [{"role": "user", "content": "Name three rivers."}]
N, TOP = 6, 3
V2, ADAPTER = "internlm2-tiny", "v2-lora"  # the InternLM2 worker's model and an adapter it serves


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, chat_model_dir):
    """({model name: its own Tokenizer}, endpoint with HTTP) for a v1 and an InternLM2 worker."""
    root = tmp_path_factory.mktemp("mixed")
    _, hf = internlm2_checkpoint(root / "hf", seed=5)
    v2_dir = root / V2
    hf_to_ms(hf, v2_dir)
    adapter = serving_adapter(v2_dir, root / ADAPTER)
    redis = RedisServer(root / "redis").start()
    services = []
    try:
        # The tokenizer service holds the v1 tokenizer only: the one the gateway must not name v2 tokens with.
        tok = Service("services.tokenizer_service", [], root / "tokenizer.log", free_port(), free_port())
        services.append(tok)
        for folder, name, extra in ((chat_model_dir, "worker-v1", ()), (v2_dir, "worker-v2", ("--adapter", f"{ADAPTER}={adapter}"))):
            services.append(start_worker(folder, redis.url, root, name, "--max-len", "128", *extra))
        for s in services:
            s.wait_healthy()
        endpoint = start_http_endpoint(redis.url, tok.address, root, "endpoint-mixed")
        services.append(endpoint)
        assert len(wait_workers(endpoint, 2)) == 2
        tokenizers = {d.resolve().name: Tokenizer.for_model(d, read_config(d).family) for d in (chat_model_dir, v2_dir)}
        yield tokenizers, endpoint
    finally:
        for s in services:
            s.stop()
        redis.stop()


def names(tok: Tokenizer, ids) -> list[str | None]:
    """Each id's own text by ``tok`` (None: not in its vocabulary)."""
    return [tok.decode([i]) if i < tok.vocab_size else None for i in ids]


def test_each_model_names_its_tokens_with_its_own_tokenizer(mixed):
    tokenizers, endpoint = mixed
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(endpoint.address))
    for model, tok in tokenizers.items():
        other = next(t for m, t in tokenizers.items() if m != model)
        request = inference_pb2.GenerateRequest(model=model, chat=chat_to_pb(CHAT), params=common_pb2.SamplingParams(
            max_new_tokens=N, temperature=0, ignore_eos=True, logprobs=True, top_logprobs=TOP))
        got = join_chunks(stub.Generate(request, timeout=120))
        ids = list(got.token_ids)
        assert len(ids) == N and list(got.tokens) == names(tok, ids), model
        assert [list(t.tokens) for t in got.top_logprobs] == [names(tok, t.ids) for t in got.top_logprobs], model
        assert got.top_logprobs[0].ids[0] == ids[0]
        # the other family's tokenizer names these ids otherwise: the check above can tell them apart
        alternatives = [i for t in got.top_logprobs for i in t.ids]
        assert names(tok, ids + alternatives) != names(other, ids + alternatives), model

        # The HTTP door: the same greedy request, each token and alternative named as above.
        r = httpx.post(f"{endpoint.base}/v1/chat/completions", timeout=120, json={
            "model": model, "messages": CHAT, "max_tokens": N, "temperature": 0, "ignore_eos": True,
            "logprobs": True, "top_logprobs": TOP})
        assert r.status_code == 200, r.text
        content = r.json()["choices"][0]["logprobs"]["content"]
        assert [c["token"] for c in content] == list(got.tokens), model
        assert [[a["token"] for a in c["top_logprobs"]] for c in content] == [list(t.tokens) for t in got.top_logprobs]
        assert all(c["bytes"] == list(c["token"].encode()) for c in content)


def test_streamed_completions_name_tokens_per_model(mixed):
    """The legacy completions logprobs, streamed: chunk by chunk, the tokens of the model asked for."""
    tokenizers, endpoint = mixed
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(endpoint.address))
    for model, tok in tokenizers.items():
        want = join_chunks(stub.Generate(inference_pb2.GenerateRequest(model=model, text="Once upon a time",
            params=common_pb2.SamplingParams(max_new_tokens=N, temperature=0, ignore_eos=True, logprobs=True)),
            timeout=120))
        tokens = []
        with httpx.stream("POST", f"{endpoint.base}/v1/completions", timeout=120, json={
                "model": model, "prompt": "Once upon a time", "max_tokens": N, "temperature": 0, "ignore_eos": True,
                "logprobs": 1, "stream": True}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    tokens += json.loads(line[6:])["choices"][0]["logprobs"]["tokens"]
        assert tokens == names(tok, want.token_ids) == list(want.tokens), model


def test_tokenizer_calls_naming_a_model_use_its_tokenizer(mixed):
    """Encode, Decode, ApplyChatTemplate and CountTokens through the endpoint, with ``model``: each
    model's own ids and chat template (a worker of it answers), by model id and by adapter id (its
    base model's); without: the tokenizer service's (v1), as before; an unknown model: NOT_FOUND."""
    from internlm_core.generation import MAX_PROMPT_CHARS

    tokenizers, endpoint = mixed
    stub = tokenizer_pb2_grpc.TokenizerStub(grpc.insecure_channel(endpoint.address))
    text = "Name three rivers <eoa> 你好"
    chat = [{"role": "system", "content": "Be brief."}, *CHAT]
    messages = chat_to_pb(chat).messages
    served = {**tokenizers, ADAPTER: tokenizers[V2], "": Tokenizer()}  # "": the tokenizer service's own (v1)
    for model, tok in served.items():
        ids = list(stub.Encode(tokenizer_pb2.EncodeRequest(text=text, model=model), timeout=30).ids)
        assert ids == tok.encode(text), model
        assert stub.Decode(tokenizer_pb2.DecodeRequest(ids=ids, model=model), timeout=30).text == tok.decode(ids)
        r = stub.ApplyChatTemplate(tokenizer_pb2.ChatTemplateRequest(messages=messages, model=model), timeout=30)
        assert (r.text, list(r.ids)) == (tok.render_chat(chat), tok.encode_chat(chat)), model
        count = stub.CountTokens(tokenizer_pb2.CountTokensRequest(chat=common_pb2.ChatMessages(messages=messages),
                                                                  model=model), timeout=30).count
        assert count == len(r.ids), model
        assert stub.CountTokens(tokenizer_pb2.CountTokensRequest(text=text, model=model), timeout=30).count == \
            len(tok.encode(text, bos=False)), model
    v1 = next(m for m in tokenizers if m != V2)
    assert tokenizers[v1].encode_chat(chat) != tokenizers[V2].encode_chat(chat)  # the checks above tell them apart

    with pytest.raises(grpc.RpcError) as e:
        stub.Encode(tokenizer_pb2.EncodeRequest(text=text, model="internlm-nope"), timeout=30)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "'internlm-nope'" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:  # a worker holds the tokenizer service's limits
        stub.Encode(tokenizer_pb2.EncodeRequest(text="a" * (MAX_PROMPT_CHARS + 1), model=V2), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "over the" in e.value.details()


def threads_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_http_streams_cost_no_thread_each(http, worker):
    """Ten choices streaming at once through the HTTP door (four generating, six queued at the
    worker) add no thread per choice to the endpoint: the gateway's streams are tasks of an event
    loop (a thread each, as before, would add ten)."""
    pid = http.proc.pid
    body = {"messages": CHAT, "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{http.base}/v1/chat/completions", timeout=120, json={**body, "n": 1}) as r:
        next(r.iter_lines())  # warms what any request starts once (the HTTP side's worker threads)
    before = threads_of(pid)
    with httpx.stream("POST", f"{http.base}/v1/chat/completions", timeout=120, json={**body, "n": 10}) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # the first response: every choice is in flight now
        during = threads_of(pid)
    assert during - before < 5, (before, during)


def test_grpc_streams_cost_no_thread_each(endpoint, worker):
    """Twelve Generate streams open at once through the gRPC door (four generating, eight queued at
    the worker) add no thread per stream to the endpoint: its gRPC server is ``grpc.aio`` on the
    gateway's loop, each call a task (a server thread each, as before, would add twelve)."""
    pid = endpoint.proc.pid
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(endpoint.address))
    request = inference_pb2.GenerateRequest(text="Tell me about the sea", params=common_pb2.SamplingParams(
        max_new_tokens=200, temperature=0, ignore_eos=True))
    warm = stub.Generate(request, timeout=120)
    next(warm)  # warms what any call starts once
    warm.cancel()
    deadline = time.monotonic() + 30
    while endpoint.metric("internlm_open_streams") or worker.metric("internlm_active_requests"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    before = threads_of(pid)
    calls = [stub.Generate(request, timeout=120) for _ in range(12)]
    try:
        while endpoint.metric("internlm_open_streams") < 12:  # every stream admitted, open at the endpoint
            assert time.monotonic() < deadline + 30
            time.sleep(0.1)
        during = threads_of(pid)
    finally:
        for call in calls:
            call.cancel()
    assert during - before < 5, (before, during)


def test_router_run_on_its_own_loop_is_refused(stack_redis):
    """The gRPC door runs on the router's loop: a blocking ``Router.run`` there (say, the sync
    ``Gateway.model_info``) would wait forever on the loop it stops; it is refused, naming the fix."""
    from services.gateway import Router

    router = Router(stack_redis.url).start()
    try:
        async def nothing():
            return 1

        async def on_the_loop():
            return router.run(nothing())
        assert router.run(nothing()) == 1  # from another thread: fine
        with pytest.raises(RuntimeError, match="own loop: await the coroutine instead"):
            asyncio.run_coroutine_threadsafe(on_the_loop(), router.loop).result(timeout=10)
    finally:
        router.stop()


def test_sigterm_drains_the_grpc_door(stack_redis, tokenizer_service, worker, stack_dir):
    """The endpoint's gRPC door counts its calls in the RPC metrics, and SIGTERM under a Generate
    stream lets the stream end complete before the endpoint exits 0."""
    endpoint = start_endpoint(stack_redis.url, tokenizer_service.address, stack_dir, "endpoint-drained").wait_healthy()
    try:
        assert wait_workers(endpoint, 1)
        stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(endpoint.address))

        def request(n):
            return inference_pb2.GenerateRequest(text="Tell me about the sea", params=common_pb2.SamplingParams(
                max_new_tokens=n, ignore_eos=True))
        assert len(list(stub.Generate(request(2), timeout=60))) >= 1
        counted = 'internlm_grpc_requests_total{code="OK",method="/internlm.v1.Inference/Generate"} 1.0'
        deadline = time.monotonic() + 10
        while counted not in endpoint.metrics():  # counted once the call has ended on the server's side too
            assert time.monotonic() < deadline, [m for m in endpoint.metrics().splitlines() if "grpc_requests" in m]
            time.sleep(0.05)
        call = stub.Generate(request(120), timeout=120)
        first = next(call)
        endpoint.proc.send_signal(signal.SIGTERM)
        rest = list(call)
        assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 120
        assert rest[-1].finish.reason == common_pb2.FINISH_REASON_LENGTH
        assert endpoint.proc.wait(30) == 0
    finally:
        endpoint.stop()


@pytest.fixture(scope="module")
def pair(chat_model_dir, tokenizer_service, tmp_path_factory):
    """Two workers of one model behind an endpoint with its HTTP side (their own Redis)."""
    root = tmp_path_factory.mktemp("gateway-pair")
    redis = RedisServer(root / "redis").start()
    workers = [start_worker(chat_model_dir, redis.url, root, f"worker-{n}") for n in "ab"]
    try:
        for w in workers:
            w.wait_healthy()
        endpoint = start_http_endpoint(redis.url, tokenizer_service.address, root, "endpoint-pair")
        try:
            assert len(wait_workers(endpoint, 2)) == 2
            yield workers, endpoint
        finally:
            endpoint.stop()
    finally:
        for w in workers:
            w.stop()
        redis.stop()


def test_an_http_stream_is_continued_when_its_worker_dies(pair):
    """The HTTP door reads the gateway's one failover loop: kill -9 of the worker under a streamed
    chat completion, and the client still gets every token, the text of an uninterrupted run."""
    workers, endpoint = pair
    body = {"messages": CHAT, "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    texts, usage = [], None
    with httpx.stream("POST", f"{endpoint.base}/v1/chat/completions", timeout=120, json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                texts.append(json.loads(line[6:])["choices"][0]["delta"]["content"])
                break
        busy = [w for w in workers if w.metric("internlm_active_requests") == 1]
        assert len(busy) == 1
        busy[0].kill()
        for line in lines:
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            if event["choices"]:
                texts.append(event["choices"][0]["delta"].get("content", ""))
            else:
                usage = event["usage"]
    assert usage["completion_tokens"] == 200
    assert endpoint.metric("internlm_endpoint_continued_total") == 1
    again = httpx.post(f"{endpoint.base}/v1/chat/completions", timeout=120, json={**body, "stream": False})
    assert again.status_code == 200, again.text
    assert "".join(texts) == again.json()["choices"][0]["message"]["content"]


def test_a_tokenizer_call_is_taken_over_from_a_worker_gone(chat_model_dir, tokenizer_service, core_tokenizer,
                                                           tmp_path):
    """Two workers of one model, one killed (-9) and still registered: every Tokenizer call naming
    the model is answered, the one routed to the dead worker by the other, which later calls go to."""
    from tests.services.conftest import start_endpoint

    redis = RedisServer(tmp_path / "redis").start()
    services = [start_worker(chat_model_dir, redis.url, tmp_path, f"worker-{n}") for n in "ab"]
    try:
        for w in services:
            w.wait_healthy()
        endpoint = start_endpoint(redis.url, tokenizer_service.address, tmp_path).wait_healthy()
        services.append(endpoint)
        assert len(wait_workers(endpoint, 2)) == 2
        services[0].kill()
        stub = tokenizer_pb2_grpc.TokenizerStub(grpc.insecure_channel(endpoint.address))
        model = chat_model_dir.resolve().name
        for _ in range(4):  # the router takes turns: the dead worker is among the first two picked
            assert list(stub.Encode(tokenizer_pb2.EncodeRequest(text="Hello", model=model), timeout=30).ids) == \
                core_tokenizer.encode("Hello")
        lost = [line for line in endpoint.metrics().splitlines()
                if line.startswith("internlm_endpoint_worker_failures_total{")]
        assert sum(float(line.split()[-1]) for line in lost) == 1, lost
    finally:
        for s in services[1:]:
            s.stop()
        redis.stop()


def test_model_info_is_taken_over_from_a_worker_gone(chat_model_dir, tokenizer_service, tmp_path):
    """Three workers of one model; the one the router picks next killed (-9) while still
    registered, before a call of each door: the HTTP door's /v1/models and the gRPC door's
    ModelInfo each answer at once, from a live worker, with no error."""
    redis = RedisServer(tmp_path / "redis").start()
    workers = [start_worker(chat_model_dir, redis.url, tmp_path, f"worker-{n}") for n in "abc"]
    services = list(workers)
    try:
        for w in workers:
            w.wait_healthy()
        endpoint = start_http_endpoint(redis.url, tokenizer_service.address, tmp_path, "endpoint-info")
        services.append(endpoint)
        assert len(wait_workers(endpoint, 3)) == 3
        model = chat_model_dir.resolve().name
        stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(endpoint.address))
        by_address = {w.address: w for w in workers}

        def next_picks(dead=()):  # the live workers by the requests routed to them, least first: the router's order
            listed = sorted(wait_workers(endpoint, 3), key=lambda w: w.requests_routed)
            return [by_address[w.address] for w in listed if by_address[w.address] not in dead]

        for _ in range(2):  # two of the three asked once: the third is the router's next pick
            assert stub.ModelInfo(inference_pb2.ModelInfoRequest(model=model), timeout=30).model == model
        start = time.monotonic()
        first = next_picks()[0]
        first.kill()
        r = httpx.get(f"{endpoint.base}/v1/models", timeout=30)
        assert r.status_code == 200, r.text
        assert [m["id"] for m in r.json()["data"]] == [model]
        second = next_picks([first])[0]  # the one not asked since the first two calls
        second.kill()
        assert stub.ModelInfo(inference_pb2.ModelInfoRequest(model=model), timeout=30).model == model
        assert time.monotonic() - start < 5  # no waiting on the dead: each refused its connection at once
        lost = [line for line in endpoint.metrics().splitlines()
                if line.startswith("internlm_endpoint_worker_failures_total{")]
        assert sorted(line.split()[-1] for line in lost) == ["1.0", "1.0"], lost
        assert sorted(line.split('"')[1] for line in lost) == sorted([first.address, second.address]), lost
    finally:
        for s in services:
            if s.proc.poll() is None:
                s.stop()
        redis.stop()


def staller(hold_s: float) -> tuple[str, socket.socket]:
    """A real server on loopback that accepts a connection, says nothing and resets it after
    ``hold_s``: what a worker that hangs, then dies, looks like to the gateway (a slow UNAVAILABLE)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # closed: the test is over
                return
            threading.Timer(hold_s, conn.close).start()
    threading.Thread(target=serve, daemon=True).start()
    return f"127.0.0.1:{server.getsockname()[1]}", server


def test_retries_on_other_workers_keep_the_callers_deadline(tmp_path):
    """Two registered workers of a model, each hanging 2.5 s, then gone: a ModelInfo or Tokenizer
    call with a 3 s deadline tries the second with the time the first left it, and ends
    DEADLINE_EXCEEDED at 3 s (not 2.5 s x 2 = 5 s, the full timeout again for each retry)."""
    from internlm_core.errors import DeadlineExceeded
    from services.gateway import Gateway, Router
    from services.registry import Registration
    from services.server_common import status_of

    redis = RedisServer(tmp_path / "redis").start()
    try:
        for name, call in (("ModelInfo", lambda g, m: g.model_info_async(m, 3.0)),
                           ("Encode", lambda g, m: g.tokenizer_call(
                               "Encode", tokenizer_pb2.EncodeRequest(text="Hello", model=m).SerializeToString(), 3.0))):
            # Workers of its own for each call, of a model of its own: grpc shares a connection to an
            # address between channels, and the last call's would still be waiting to reconnect; and
            # the last call's registrations may outlive their stop() by a heartbeat in Redis.
            model = f"stalled-{name}"
            stallers = [staller(2.5) for _ in range(2)]
            registrations = [Registration(redis.url, f"{name}-{n}",
                                          lambda a=a, m=model: {"address": a, "model": m}).start()
                             for n, (a, _) in enumerate(stallers)]
            router = Router(redis.url).start()
            try:
                start = time.monotonic()
                with pytest.raises((grpc.RpcError, DeadlineExceeded)) as e:
                    router.run(call(Gateway(router), model))
                took = time.monotonic() - start
                assert status_of(e.value)[0] == grpc.StatusCode.DEADLINE_EXCEEDED, (name, e.value)
                assert 2.9 < took < 3.8, (name, took)
                mine = [w.routed for w in router.workers.values() if w.model == model]
                assert mine == [1, 1], name  # both were tried
            finally:
                router.stop()
                for registration in registrations:
                    registration.stop()
                for _, server in stallers:
                    server.close()
    finally:
        redis.stop()
