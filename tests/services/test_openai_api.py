"""The endpoint's HTTP side against a real worker, tokenizer service and Redis on loopback: the
OpenAI API driven by OpenAI's own Python client and by raw HTTP (httpx), compared with the core
generating in-process on the same weights; errors, disconnects, the API key and the console's JSON."""
from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from internlm_core.generation import SamplingParams, generate
from tests.helpers import RedisServer, free_port
from tests.services.conftest import start_endpoint, start_worker, wait_http, wait_workers

openai = pytest.importorskip("openai")


def core_text(engine, tokenizer, ids, params):
    events = list(generate(engine, ids, params, tokenizer))
    return "".join(e.text for e in events), events


def test_models_lists_the_served_model(client, http, chat_model_dir):
    models = client.models.list().data
    assert [m.id for m in models] == [chat_model_dir.name]
    assert client.models.retrieve(chat_model_dir.name).id == chat_model_dir.name
    r = httpx.get(f"{http.base}/v1/models/nope")
    assert r.status_code == 404 and "nope" in r.json()["error"]["message"]


def test_chat_completion_equals_the_core(client, model_id, core_engine, core_tokenizer):
    """Greedy chat through the OpenAI client is the core's greedy generation of the InternLM chat
    template (system and history included), with usage and finish_reason."""
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour."}]
    r = client.chat.completions.create(model=model_id, messages=messages, temperature=0, max_tokens=12)
    ids = core_tokenizer.encode_chat(messages)
    text, events = core_text(core_engine, core_tokenizer, ids, SamplingParams(max_new_tokens=12))
    assert r.choices[0].message.content == text and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(events)
    assert r.choices[0].finish_reason == ("length" if len(events) == 12 else "stop")
    assert r.id.startswith("chatcmpl-") and r.created > 0 and r.model == model_id


def test_streamed_completion_equals_the_plain_one(client, model_id, core_engine, core_tokenizer):
    prompt = "The history of the city"
    plain = client.completions.create(model=model_id, prompt=prompt, temperature=0, max_tokens=10,
                                      extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(model=model_id, prompt=prompt, temperature=0, max_tokens=10,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    text, _ = core_text(core_engine, core_tokenizer, core_tokenizer.encode(prompt),
                        SamplingParams(max_new_tokens=10, ignore_eos=True))
    assert plain.choices[0].text == text == "".join(c.choices[0].text for c in chunks if c.choices)
    assert plain.choices[0].finish_reason == "length" == [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10  # include_usage: last chunk
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + 10


def test_sse_framing_and_the_done_marker(http, model_id):
    body = {"model": model_id, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True,
            "temperature": 0}
    with httpx.stream("POST", f"{http.base}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"


def test_sampling_parameters_reach_the_worker(client, model_id, core_engine, core_tokenizer):
    """seed repeats a sampled answer; n choices with a seed are seeds seed, seed+1; stop ends the
    text before the stop string; the vLLM extras (top_k, min_tokens, repetition_penalty) apply."""
    kw = dict(model=model_id, prompt="Once upon a time", max_tokens=12, temperature=1.0, top_p=0.9, seed=7,
              extra_body={"top_k": 40, "repetition_penalty": 1.1, "min_tokens": 12})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text
    two = client.completions.create(**{**kw, "n": 2})
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == a.choices[0].text
    params = SamplingParams(max_new_tokens=12, min_new_tokens=12, temperature=1.0, top_p=0.9, top_k=40,
                            repetition_penalty=1.1, seed=8)
    text, _ = core_text(core_engine, core_tokenizer, core_tokenizer.encode("Once upon a time"), params)
    assert two.choices[1].text == text
    greedy = client.completions.create(model=model_id, prompt="Once upon a time", max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].text
    stop = greedy.strip()[3:6]
    assert stop
    cut = client.completions.create(model=model_id, prompt="Once upon a time", max_tokens=12, temperature=0,
                                    stop=[stop], extra_body={"ignore_eos": True}).choices[0]
    assert cut.finish_reason == "stop" and greedy.startswith(cut.text) and stop not in cut.text


def test_logprobs_are_the_cores(client, model_id, core_engine, core_tokenizer):
    messages = [{"role": "user", "content": "Count: one, two"}]
    r = client.chat.completions.create(model=model_id, messages=messages, temperature=0, max_tokens=6,
                                       logprobs=True)
    content = r.choices[0].logprobs.content
    _, events = core_text(core_engine, core_tokenizer, core_tokenizer.encode_chat(messages),
                          SamplingParams(max_new_tokens=6, logprobs=True))
    assert len(content) == len(events)
    np.testing.assert_allclose([c.logprob for c in content], [e.logprob for e in events], atol=1e-4)
    assert "".join(c.token for c in content).strip() != ""


def test_top_logprobs_are_the_cores(client, model_id, core_engine, core_tokenizer):
    """The k most likely tokens at each step, most likely first, with the core's values; under
    greedy decoding the first of them is the chosen token."""
    messages = [{"role": "user", "content": "Count: one, two"}]
    r = client.chat.completions.create(model=model_id, messages=messages, temperature=0, max_tokens=5,
                                       logprobs=True, top_logprobs=3)
    _, events = core_text(core_engine, core_tokenizer, core_tokenizer.encode_chat(messages),
                          SamplingParams(max_new_tokens=5, top_logprobs=3))
    content = r.choices[0].logprobs.content
    for got, ev in zip(content, events, strict=True):
        assert len(got.top_logprobs) == 3
        np.testing.assert_allclose([t.logprob for t in got.top_logprobs], [lp for _, lp in ev.top_logprobs], atol=1e-4)
        assert got.top_logprobs[0].token == got.token and abs(got.top_logprobs[0].logprob - got.logprob) < 1e-6
    legacy = client.completions.create(model=model_id, prompt="Count: one, two", temperature=0, max_tokens=4,
                                       logprobs=2, extra_body={"ignore_eos": True}).choices[0].logprobs
    assert len(legacy.tokens) == len(legacy.token_logprobs) == len(legacy.top_logprobs) == 4
    assert all(1 <= len(t) <= 2 for t in legacy.top_logprobs) and legacy.text_offset[0] == 0


@pytest.mark.parametrize("body, status, param", [
    ("{not json", 400, None),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ({"messages": []}, 400, "messages"),
    ({}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 21, "logprobs": True}, 400, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, 400, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "no-such-model"}, 404, None),
    ({"messages": [{"role": "user", "content": "hi"}], "stop_token_ids": [10 ** 9]}, 400, None),  # the worker checks it
], ids=["malformed", "temperature", "max_tokens", "role", "no-messages", "empty", "top_logprobs",
        "top_logprobs-alone", "model",
        "stop-token-range"])
def test_bad_requests_get_openai_errors(http, model_id, body, status, param):
    if isinstance(body, dict):
        body = json.dumps({"model": model_id, **body})
    r = httpx.post(f"{http.base}/v1/chat/completions", content=body, headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if param:
        assert err["param"] == param and param.split(".")[0] in err["message"]


def test_client_disconnect_frees_the_slot(http, model_id, worker):
    """Closing a stream half way cancels the generation: the worker holds no request soon after."""
    body = {"model": model_id, "prompt": "Tell me a long story", "max_tokens": 200, "stream": True,
            "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", f"{http.base}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
        assert worker.metric("internlm_active_requests") == 1
    assert any(g.startswith("data: ") for g in got)
    deadline = time.monotonic() + 10
    while worker.metric("internlm_active_requests") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker.metric("internlm_active_requests") == 0


def test_health_and_metrics(http):
    r = httpx.get(f"{http.base}/health")
    assert r.status_code == 200 and r.json()["workers"] >= 1
    text = httpx.get(f"{http.base}/metrics").text
    assert 'internlm_http_requests_total{route="/health",status="200"}' in text
    assert "internlm_http_request_duration_seconds_bucket" in text


def test_console_and_its_json(http, worker, stack_dir, tiny_hf):
    """The console's page and files, and its JSON: the workers, and jobs submitted, read, listed and
    cancelled through the endpoint's own Jobs API (no Celery worker runs here: the job stays queued)."""
    import shutil

    shutil.copytree(tiny_hf[1], stack_dir / "store" / "imports" / "console-hf", dirs_exist_ok=True)
    page = httpx.get(f"{http.base}/")
    assert page.status_code == 200 and "InternLM console" in page.text
    assert httpx.get(f"{http.base}/console/app.js").status_code == 200
    workers = httpx.get(f"{http.base}/api/workers").json()["workers"]
    assert [w["address"] for w in workers] == [worker.address]
    missing = httpx.post(f"{http.base}/api/jobs", json={"convert": {"source": "imports/nothing-here", "output": "x"}})
    assert missing.status_code in (400, 404) and "nothing-here" in missing.json()["error"]["message"]
    r = httpx.post(f"{http.base}/api/jobs", json={"convert": {"source": "imports/console-hf", "output": "console"}})
    job = r.json()
    assert r.status_code == 200 and job["kind"] == "JOB_KIND_CONVERT" and job["state"] == "JOB_STATE_QUEUED"
    assert httpx.get(f"{http.base}/api/jobs/{job['id']}").json()["id"] == job["id"]
    assert job["id"] in [j["id"] for j in httpx.get(f"{http.base}/api/jobs?kind=convert").json()["jobs"]]
    cancelled = httpx.post(f"{http.base}/api/jobs/{job['id']}/cancel").json()
    assert cancelled["cancel_requested"] or cancelled["state"] == "JOB_STATE_CANCELLED"
    bad = httpx.post(f"{http.base}/api/jobs", json={"convert": {"no_such_field": 1}})
    assert bad.status_code == 400 and "no_such_field" in bad.json()["error"]["message"]
    assert httpx.get(f"{http.base}/api/jobs?state=sleeping").status_code == 400
    assert httpx.get(f"{http.base}/api/jobs/does-not-exist").status_code == 404
    store = httpx.get(f"{http.base}/api/store").json()
    assert "console-hf" not in [e["name"] for e in store.get("entries", [])]  # imports are not store entries


def test_api_key_guards_every_route_but_health_and_the_console_files(stack_redis, tokenizer_service, worker,
                                                                      stack_dir):
    port = free_port()
    s = start_endpoint(stack_redis.url, tokenizer_service.address, stack_dir, "endpoint-key",
                       "--http-port", str(port), "--api-key", "s3cret").wait_healthy()
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(base)
        for path in ("/v1/models", "/metrics", "/api/workers"):
            r = httpx.get(base + path)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            assert httpx.get(base + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{base}/health").status_code in (200, 503)  # open, for probes
        assert httpx.get(f"{base}/").status_code == 200 and httpx.get(f"{base}/console/app.js").status_code == 200
        deadline = time.monotonic() + 60  # the gRPC door needs the key too (wait_workers sends none)
        while httpx.get(f"{base}/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="s3cret", max_retries=0)
        assert c.models.list().data
    finally:
        s.stop()


def test_greedy_text_equals_grpc_generate_unary(client, http, model_id):
    """The same prompt over HTTP and over the endpoint's gRPC API gives the same greedy text."""
    import grpc

    from services.pb import common_pb2, inference_pb2, inference_pb2_grpc

    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(http.address))
    params = common_pb2.SamplingParams(max_new_tokens=12, ignore_eos=True)
    unary = stub.GenerateUnary(inference_pb2.GenerateRequest(text="The river", params=params), timeout=60)
    over_http = client.completions.create(model=model_id, prompt="The river", temperature=0, max_tokens=12,
                                          extra_body={"ignore_eos": True})
    assert over_http.choices[0].text == unary.text and over_http.usage.completion_tokens == 12
    chat = [{"role": "user", "content": "Hello"}]
    unary = stub.GenerateUnary(inference_pb2.GenerateRequest(
        chat=common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(**chat[0])]), params=params), timeout=60)
    r = client.chat.completions.create(model=model_id, messages=chat, temperature=0, max_tokens=12,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == unary.text


def test_errors_raise_the_clients_exception_types(client, model_id):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "x"}], top_p=0)
    assert "top_p" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model_id, prompt="")


@pytest.mark.parametrize("body, status, check", [
    (b'{"prompt": "hi", "temperature": "hot"}', 400, "temperature"),
    (b'{"prompt": 12}', 400, "prompt"),
    (b'{"prompt": "hi", "max_tokens": "many"}', 400, "max_tokens"),
    (b'{"prompt": "hi", "max_tokens": 4, "a_field_from_the_future": {"x": 1}}', 400, None),
    (b'{"prompt": "hi", "max_tokens": 1000000000000}', 400, "max_tokens"),
    (b'{"prompt": "hi", "max_tokens": 2000000000, "temperature": 0}', 200, "length"),
    (b'{"prompt": "\xff\xfe bad utf-8"}', 400, None),
    (b'[1, 2, 3]', 400, None),
], ids=["wrong-type", "prompt-type", "max-tokens-type", "unknown-field", "max-tokens-int32", "huge-max-tokens",
        "invalid-utf8", "not-an-object"])
def test_raw_http_bad_input(http, model_id, body, status, check):
    """Wrong types and values are 400s naming the field; so are fields this server does not implement
    (ignoring them would answer another question); a max_tokens past the model's length ends at that length."""
    r = httpx.post(f"{http.base}/v1/completions", content=body, headers={"content-type": "application/json"},
                   timeout=120)
    assert r.status_code == status, r.text
    if status == 400:
        assert r.json()["error"]["type"] == "invalid_request_error"
        if check:
            assert r.json()["error"]["param"] == check
    elif check == "length":
        out = r.json()
        assert out["choices"][0]["finish_reason"] == "length"
        assert out["usage"]["total_tokens"] <= 256  # the worker's max_len


def test_endpoint_sigterm_drains_grpc_and_http_streams(stack_redis, tokenizer_service, worker, stack_dir):
    """SIGTERM to the endpoint mid-stream: the gRPC stream and the HTTP stream it is relaying both
    run to their last token, and then the endpoint exits cleanly."""
    import threading

    import grpc

    from services.pb import common_pb2, inference_pb2, inference_pb2_grpc

    port = free_port()
    ep = start_endpoint(stack_redis.url, tokenizer_service.address, stack_dir, "endpoint-drain",
                        "--http-port", str(port)).wait_healthy()
    base = f"http://127.0.0.1:{port}"
    wait_workers(ep, 1)
    wait_http(base)
    n = 150
    call = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(ep.address)).Generate(
        inference_pb2.GenerateRequest(text="Tell me", params=common_pb2.SamplingParams(max_new_tokens=n,
                                                                                        ignore_eos=True)),
        timeout=120)
    grpc_tokens = len(next(call).token_ids)
    http_lines, started = [], threading.Event()

    def http_stream():
        body = {"prompt": "Tell me", "max_tokens": n, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line:
                    http_lines.append(line)
                    started.set()

    t = threading.Thread(target=http_stream)
    t.start()
    assert started.wait(30)
    # both streams in flight at the endpoint when the signal comes (so the test shows a drain, not
    # two streams that had already ended)
    assert httpx.get(f"{base}/api/workers").json()["workers"][0]["inflight"] == 2
    signalled = len(http_lines)
    ep.proc.send_signal(signal.SIGTERM)
    grpc_tokens += sum(len(c.token_ids) for c in call)
    t.join(60)
    assert grpc_tokens == n
    assert http_lines[-1] == "data: [DONE]" and json.loads(http_lines[-2][6:])["usage"]["completion_tokens"] == n
    assert len(http_lines) > signalled + 1  # tokens kept coming after the signal
    assert ep.proc.wait(60) == 0


def test_no_capacity_raises_the_clients_rate_limit_and_unavailable_errors(chat_model_dir, tokenizer_service,
                                                                         stack_dir, tmp_path):
    """With no worker at all the API answers 503 (the client's InternalServerError); with the one
    worker's slot and queue taken it answers 429 (RateLimitError), as OpenAI's clients expect, and
    serves again once the slot is free."""
    redis = RedisServer(tmp_path / "redis").start()
    port = free_port()
    ep = start_endpoint(redis.url, tokenizer_service.address, stack_dir, "endpoint-capacity",
                        "--http-port", str(port)).wait_healthy()
    worker = None
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(base)
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:
            c.completions.create(model="", prompt="The river", max_tokens=4)
        assert e.value.status_code == 503
        worker = start_worker(chat_model_dir, redis.url, stack_dir, "worker-capacity",
                              "--max-batch", "1", "--max-queue", "1").wait_healthy()
        assert wait_workers(ep, 1)
        model = c.models.list().data[0].id
        # one token a step (no speculation: this random model's greedy loops would be copied several a
        # step), so the two stay busy while the third request comes
        long = dict(model=model, max_tokens=220, extra_body={"ignore_eos": True, "speculate": False})
        # the slot and the one queue place, taken by requests that run on threads until they end
        with ThreadPoolExecutor(2) as pool:
            busy = [pool.submit(c.completions.create, prompt=p, **long) for p in ("The river", "In 1912 the")]
            deadline = time.monotonic() + 30
            while httpx.get(f"{base}/api/workers").json()["workers"][0]["inflight"] < 2:
                assert time.monotonic() < deadline, "the two requests never reached the worker"
                time.sleep(0.05)
            with pytest.raises(openai.RateLimitError) as e:
                c.completions.create(model=model, prompt="Paris is", max_tokens=4)
            assert e.value.status_code == 429
            assert all(len(b.result().choices[0].text) > 0 for b in busy)  # they were served meanwhile
        assert c.completions.create(model=model, prompt="Paris is", max_tokens=4).usage.completion_tokens == 4
    finally:
        if worker is not None:
            worker.stop()
        ep.stop()
        redis.stop()
