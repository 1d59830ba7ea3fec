"""OpenAI parameters pinned by their effect, through a real endpoint (HTTP side on) and a real
worker serving a tiny model with one LoRA adapter, on a Redis of their own: each test compares with
the core generating in-process and with the same request without the parameter, so it fails if the
endpoint or the worker dropped the parameter. And ``/health``: 503 until a worker registers.

The model is the tiny chat model's shape (the real tokenizer's 103k ids) with small random weights
(std 0.05), so its logits are close together: its greedy answer repeats tokens, which the
penalties (at most 2 in OpenAI's range) can then change. With the larger weights of the other
tests' model, the logits are too far apart for a penalty of 2 to change any token."""
from __future__ import annotations

from types import SimpleNamespace

import httpx
import pytest

from internlm_core.generation import SamplingParams, generate
from tests.helpers import RedisServer, save_chat_model, serving_adapter
from tests.services.conftest import WORKER_LEN, start_http_endpoint, start_worker, wait_workers
from tests.services.test_adapters import NAME as ADAPTER, with_adapter

openai = pytest.importorskip("openai")

PROMPT = "The history of the city"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_chat_model(tmp_path_factory.mktemp("flat") / "tiny-flat", "tiny-flat", std=0.05)


@pytest.fixture(scope="module")
def engine(model_dir):
    """The same model in-process, one slot: the reference for what the services return."""
    from internlm_core.engine import Engine
    from internlm_core.loader import load_model

    return Engine(load_model(model_dir), max_batch=1, max_len=WORKER_LEN)


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory):
    return serving_adapter(model_dir, tmp_path_factory.mktemp("lora") / ADAPTER)


@pytest.fixture(scope="module")
def stack(model_dir, adapter_dir, tokenizer_service, stack_dir, tmp_path_factory):
    """An endpoint on a Redis of its own, asked for /health before and after its one worker (with
    the adapter) registers; ``.base`` is its HTTP URL, ``.client`` an OpenAI client."""
    redis = RedisServer(tmp_path_factory.mktemp("params-redis")).start()
    ep = worker = None
    try:
        ep = start_http_endpoint(redis.url, tokenizer_service.address, stack_dir, "endpoint-params")
        base = ep.base
        health_before = httpx.get(f"{base}/health")
        worker = start_worker(model_dir, redis.url, stack_dir, "worker-params",
                              "--adapter", f"{ADAPTER}={adapter_dir}").wait_healthy()
        assert wait_workers(ep, 1), "the worker never showed up at the endpoint"
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
        yield SimpleNamespace(base=base, client=client, health_before=health_before, model=model_dir.name,
                              worker=worker)
    finally:
        for service in (worker, ep):
            if service is not None:
                service.stop()
        redis.stop()


def core(engine, tokenizer, ids, **params) -> str:
    return "".join(e.text for e in generate(engine, ids, SamplingParams(**params), tokenizer))


def test_health_is_503_until_a_worker_registers(stack):
    assert stack.health_before.status_code == 503 and stack.health_before.json()["workers"] == 0
    r = httpx.get(f"{stack.base}/health")
    assert r.status_code == 200 and r.json()["workers"] == 1


@pytest.mark.parametrize("penalty", ["frequency_penalty", "presence_penalty"])
def test_penalties_change_the_answer_as_the_core_does(stack, penalty, engine, core_tokenizer):
    """Greedy repeats tokens; with the penalty at 2 no token repeats, at -2 one token repeats
    throughout; each is the core's answer with that penalty."""
    kw = dict(model=stack.model, prompt=PROMPT, max_tokens=24, temperature=0, logprobs=0,
              extra_body={"ignore_eos": True})
    ids = core_tokenizer.encode(PROMPT)
    distinct = {}
    for value in (0.0, 2.0, -2.0):
        choice = stack.client.completions.create(**kw, **{penalty: value}).choices[0]
        assert choice.text == core(engine, core_tokenizer, ids, max_new_tokens=24, ignore_eos=True, **{penalty: value})
        assert len(choice.logprobs.tokens) == 24
        distinct[value] = len(set(choice.logprobs.tokens))
    assert distinct[0.0] < 24 and distinct[2.0] == 24 and distinct[-2.0] == 1, distinct


def test_min_p_narrows_sampling_as_the_core_does(stack, engine, core_tokenizer):
    """With a seed at temperature 1, min_p 0.5 (only tokens at least half as likely as the top one)
    changes the sampled answer, to the core's with min_p; min_p 1 (nothing but ties left) is
    refused naming it."""
    kw = dict(model=stack.model, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=3)
    sampled = stack.client.completions.create(**kw, extra_body={"ignore_eos": True}).choices[0].text
    narrowed = stack.client.completions.create(**kw, extra_body={"ignore_eos": True, "min_p": 0.5}).choices[0].text
    assert narrowed == core(engine, core_tokenizer, core_tokenizer.encode(PROMPT), max_new_tokens=16,
                            ignore_eos=True, temperature=1.0, seed=3, min_p=0.5)
    assert sampled == core(engine, core_tokenizer, core_tokenizer.encode(PROMPT), max_new_tokens=16,
                           ignore_eos=True, temperature=1.0, seed=3)
    assert narrowed != sampled
    r = httpx.post(f"{stack.base}/v1/completions", json={"model": stack.model, "prompt": PROMPT, "max_tokens": 4,
                                                         "min_p": 1.0}, timeout=60)
    assert r.status_code == 400 and "min_p" in r.json()["error"]["message"], r.text


def test_speculate_false_opts_out_with_the_same_answer(stack, engine, core_tokenizer):
    """The worker speculates by default; ``speculate: false`` (ours) opts a request out: the same
    text either way, the core's, and only the first counts speculative decode steps."""
    steps = lambda: stack.worker.metric('internlm_spec_decode_tokens_per_step_count{method="ngram"}')  # noqa: E731
    want = core(engine, core_tokenizer, core_tokenizer.encode(PROMPT), max_new_tokens=40, ignore_eos=True)
    kw = dict(model=stack.model, prompt=PROMPT, max_tokens=40, temperature=0)
    before = steps()
    assert stack.client.completions.create(**kw, extra_body={"ignore_eos": True}).choices[0].text == want
    after = steps()
    assert after > before
    off = stack.client.completions.create(**kw, extra_body={"ignore_eos": True, "speculate": False})
    assert off.choices[0].text == want and steps() == after


def test_max_completion_tokens_bounds_the_answer(stack):
    """max_completion_tokens (OpenAI's newer name) bounds the answer, ahead of max_tokens."""
    messages = [{"role": "user", "content": "Tell me about Paris"}]
    kw = dict(model=stack.model, messages=messages, temperature=0, extra_body={"ignore_eos": True})
    r = stack.client.chat.completions.create(**kw, max_completion_tokens=5)
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    both = stack.client.chat.completions.create(**kw, max_tokens=20, max_completion_tokens=3)
    assert both.usage.completion_tokens == 3
    assert stack.client.chat.completions.create(**kw, max_tokens=7).usage.completion_tokens == 7


def test_chat_n_gives_n_choices_seeded_in_turn(stack, engine, core_tokenizer):
    """n=3 with a seed: three choices, the i-th the core's answer with seed + i."""
    messages = [{"role": "user", "content": "Name a colour."}]
    r = stack.client.chat.completions.create(model=stack.model, messages=messages, n=3, seed=11, temperature=1.0,
                                             max_tokens=8, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    ids = core_tokenizer.encode_chat(messages)
    want = [core(engine, core_tokenizer, ids, max_new_tokens=8, ignore_eos=True, temperature=1.0, seed=11 + i)
            for i in range(3)]
    assert [c.message.content for c in r.choices] == want
    assert len(set(want)) > 1 and r.usage.completion_tokens == 3 * 8


def test_adapters_are_models_and_requests_by_their_id_use_them(stack, model_dir, adapter_dir, core_tokenizer):
    """/v1/models lists the adapter as a model whose parent is the base; a request naming it is
    answered under the adapter (the core's answer with it, not the base's)."""
    models = {m["id"]: m for m in httpx.get(f"{stack.base}/v1/models", timeout=30).json()["data"]}
    assert set(models) == {stack.model, ADAPTER}
    assert models[ADAPTER]["parent"] == stack.model == models[ADAPTER]["root"] and models[stack.model]["parent"] is None
    kw = dict(prompt=PROMPT, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    base = stack.client.completions.create(model=stack.model, **kw).choices[0].text
    tuned = stack.client.completions.create(model=ADAPTER, **kw)
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    want = core_tokenizer.decode(with_adapter(model_dir, adapter_dir, core_tokenizer,
                                              core_tokenizer.encode(PROMPT), params))
    assert tuned.choices[0].text == want != base and tuned.model == ADAPTER
