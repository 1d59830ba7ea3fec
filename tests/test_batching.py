"""Continuous batching on the tiny model: crowds give the solo results, cancel frees slots,
the queue is bounded, bad input is refused at submit."""
import threading
import time

import pytest

from internlm_core.batching import Batcher, QueueFull, ShuttingDown
from internlm_core.engine import Engine
from internlm_core.errors import AdapterNotFound, PromptTooLong
from internlm_core.generation import SamplingParams, generate
from tests.helpers import random_ids

SLOTS = 3


@pytest.fixture(scope="module")
def model(tiny_config):
    from internlm_core.model import InternLMForCausalLM, init_weights

    m = InternLMForCausalLM(tiny_config)
    init_weights(m, seed=0, std=0.5)
    return m


@pytest.fixture(scope="module")
def batcher(model):
    b = Batcher(Engine(model, max_batch=SLOTS, max_len=64), max_queue=4).start()
    yield b
    b.stop(drain=False, timeout=30)


@pytest.fixture(scope="module")
def solo_engine(model):
    return Engine(model, max_batch=1, max_len=64)


def solo(engine, prompt, params):
    return [e.token_id for e in generate(engine, prompt, params)]


def wait_idle(batcher, timeout=20):
    deadline = time.time() + timeout
    while batcher.load and time.time() < deadline:
        time.sleep(0.01)
    return batcher.load


def test_crowd_equals_solo_greedy(solo_engine, batcher):
    # More requests than slots, of different lengths, so some join while others run.
    prompts = [random_ids(n, 512, seed=n) for n in (3, 9, 17, 5, 12)]
    params = [SamplingParams(max_new_tokens=m, ignore_eos=True) for m in (6, 11, 4, 9, 7)]
    handles = [batcher.submit(p, sp) for p, sp in zip(prompts, params)]
    got = [[e.token_id for e in h] for h in handles]
    for p, sp, ids, h in zip(prompts, params, got, handles):
        assert ids == solo(solo_engine, p, sp)
        assert h.finish_reason == "length" and len(ids) == sp.max_new_tokens
    assert wait_idle(batcher) == 0


def test_sampled_with_seed_matches_generate(solo_engine, batcher):
    p = random_ids(7, 512, seed=3)
    sp = SamplingParams(max_new_tokens=8, temperature=0.9, top_k=40, top_p=0.9, seed=1234, ignore_eos=True,
                        logprobs=True)
    other = batcher.submit(random_ids(4, 512, seed=9), SamplingParams(max_new_tokens=8, ignore_eos=True))
    r = batcher.submit(p, sp).result()
    other.result()
    assert r.token_ids == solo(solo_engine, p, sp) and r.seed == 1234
    assert len(r.logprobs) == 8 and all(lp <= 0 for lp in r.logprobs)


def test_cancel_frees_slot_within_a_step(batcher, monkeypatch):
    """cancel() is honoured at the next step boundary: the step already running may still give its
    token, then no decode step includes the request (its slot is freed first) and its stream ends."""
    rec = Recorder()
    monkeypatch.setattr(batcher, "metrics", rec)
    before = batcher.requests_finished
    handles = [batcher.submit(random_ids(4, 512, seed=i), SamplingParams(max_new_tokens=50, ignore_eos=True))
               for i in range(SLOTS + 2)]
    firsts = [h.next_events(timeout=20) for h in handles[:SLOTS]] + [[]] * 2  # every slot decoding, 2 queued
    # The batcher takes this lock between steps, so while it is held no new step starts: the
    # counts read just before each cancel() are behind by the step in flight at most.
    with batcher._wake:
        produced = []
        for h in handles:
            produced.append(len(h.state.generated))
            h.cancel()
        mark = len(rec.log)
    for h, first, at_cancel in zip(handles, firsts, produced):
        events = first + list(h)
        assert len(events) <= at_cancel + 1 and h.finish_reason == "aborted", (len(events), at_cancel)
    ends = [("end", "aborted")] * (SLOTS + 2)
    assert rec.log[mark:] in (ends, [("decode", SLOTS)] + ends)  # at most the step in flight, then freed
    assert batcher.active == 0 and batcher.requests_finished - before == SLOTS + 2


def test_queue_is_bounded(batcher):
    long = SamplingParams(max_new_tokens=60, ignore_eos=True)
    # No step runs while the test holds the engine's lock, so nothing finishes and frees a slot
    # meanwhile, however fast the model decodes (60 tokens of the tiny model take a few ms)
    with batcher.engine.lock:
        handles = [batcher.submit([5, 6, 7], long) for _ in range(SLOTS + batcher.max_queue)]
        with pytest.raises(QueueFull, match="retry"):
            batcher.submit([5, 6, 7], long)
    for h in handles:
        h.cancel()
    assert all(h.result().finish_reason == "aborted" for h in handles)
    assert wait_idle(batcher) == 0


@pytest.mark.parametrize("prompt, params, error", [
    ([], SamplingParams(), ValueError),
    (list(range(3, 67)), SamplingParams(), PromptTooLong),
    ([3, 4], SamplingParams(top_p=0.0), ValueError),
    ([3, 4], SamplingParams(max_new_tokens=-1), ValueError),
    ([3, 999], SamplingParams(), ValueError),
])
def test_bad_input_refused_at_submit(batcher, prompt, params, error):
    with pytest.raises(error):
        batcher.submit(prompt, params)
    assert batcher.queued == 0


def test_one_requests_own_failure_ends_it_alone(batcher, solo_engine, monkeypatch):
    """A request whose own sampling raises (a fault injected into its SequenceState at its third
    token, standing for any failure in sampling, penalties, stop strings or detokenising) gets that
    error; the requests sharing its steps finish with every one of their solo tokens."""
    from internlm_core import generation

    real_step = generation.SequenceState.step

    def step(self, logits, max_len=None, token=None):
        if self.params.seed == 666 and len(self.generated) == 2:
            raise ValueError("injected: this request's own sampling failed")
        return real_step(self, logits, max_len, token)

    monkeypatch.setattr(generation.SequenceState, "step", step)
    victims = [(random_ids(n, 512, seed=40 + n), SamplingParams(max_new_tokens=12, ignore_eos=True)) for n in (4, 7)]
    handles = [batcher.submit(p, sp) for p, sp in victims]
    bad = batcher.submit(random_ids(5, 512, seed=3), SamplingParams(max_new_tokens=12, seed=666, ignore_eos=True))
    with pytest.raises(ValueError, match="injected"):
        list(bad)
    assert len(bad.state.generated) == 2
    for (prompt, params), h in zip(victims, handles):
        assert [e.token_id for e in h] == solo(solo_engine, prompt, params) and h.finish_reason == "length"
    assert wait_idle(batcher) == 0


def test_unknown_adapter(batcher):
    with pytest.raises(AdapterNotFound):
        batcher.submit([3, 4], SamplingParams(), adapter="nope")


def test_stop_without_drain_aborts_and_refuses(model):
    b = Batcher(Engine(model, max_batch=2, max_len=64)).start()
    h = b.submit([3, 4, 5], SamplingParams(max_new_tokens=60, ignore_eos=True))
    assert h.next_events(timeout=20)
    t = threading.Thread(target=b.stop, kwargs={"drain": False})
    t.start()
    t.join(20)
    assert h.result().finish_reason == "aborted" and b.active == 0
    with pytest.raises(ShuttingDown):
        b.submit([3, 4], SamplingParams())


class Recorder:
    """BatcherMetrics that keeps the order of what the batcher reported."""

    def __init__(self):
        self.log = []

    def batch_size(self, size):
        self.log.append(("decode", size))

    def prefix_cache(self, reused, prompt):
        self.log.append(("admit", reused, prompt))

    def finished(self, reason, seconds):
        self.log.append(("end", reason))

    def __getattr__(self, name):  # the other reports are not needed here
        return lambda *a: None


def test_prefix_reuse_gives_the_same_tokens(model, solo_engine):
    """A request sharing a prefix with one that just finished reuses its slot's rows (counted),
    and generates exactly what a fresh engine generates; the same with reuse switched off."""
    system = random_ids(30, 512, seed=30)
    prompts = [system + random_ids(6, 512, seed=31), system + random_ids(9, 512, seed=32),
               system + random_ids(9, 512, seed=32)]  # the third repeats the second
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    for reuse in (True, False):
        rec = Recorder()
        b = Batcher(Engine(model, max_batch=2, max_len=64), metrics=rec, prefix_cache=reuse).start()
        try:
            got = [[e.token_id for e in b.submit(p, params)] for p in prompts]
        finally:
            b.stop(timeout=30)
        assert got == [solo(solo_engine, p, params) for p in prompts]
        admits = [e[1:] for e in rec.log if e[0] == "admit"]
        assert admits == ([(0, 36), (30, 39), (38, 39)] if reuse else [(0, 36), (0, 39), (0, 39)])


def test_prefix_reuse_stays_within_one_tenant(model):
    """A prompt reuses the rows its own tenant's request left, never another tenant's."""
    prompt = random_ids(30, 512, seed=33)
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    rec = Recorder()
    b = Batcher(Engine(model, max_batch=2, max_len=64), metrics=rec).start()
    try:
        for tenant in ("alice", "bob", "alice", "bob"):
            list(b.submit(prompt, params, tenant=tenant))
    finally:
        b.stop(timeout=30)
    admits = [e[1:] for e in rec.log if e[0] == "admit"]
    assert admits == [(0, 30), (0, 30), (29, 30), (29, 30)]


def test_long_prompt_is_prefilled_between_decode_steps(model, solo_engine):
    """A prompt longer than the prefill chunk goes in a chunk per iteration while a running stream
    keeps getting a token each iteration, and comes out as it would alone."""
    rec = Recorder()
    engine = Engine(model, max_batch=2, max_len=64)
    engine.prefill_chunk = 8  # 40 tokens: 5 chunks
    b = Batcher(engine, metrics=rec, prefix_cache=False).start()
    try:
        first = b.submit(random_ids(4, 512, seed=4), SamplingParams(max_new_tokens=40, ignore_eos=True))
        first.next_events()
        long_prompt = random_ids(40, 512, seed=40)
        params = SamplingParams(max_new_tokens=5, ignore_eos=True)
        got = [e.token_id for e in b.submit(long_prompt, params)]
        first.result()
    finally:
        b.stop(timeout=30)
    assert got == solo(solo_engine, long_prompt, params)
    after = rec.log[rec.log.index(("admit", 0, 40)):]
    alone = next(i for i, e in enumerate(after) if e == ("decode", 2)) - 1
    assert alone == 4  # decode steps of the running stream while the 5 chunks went in


class PrefillLog(Engine):
    """An engine that records the (slot, tokens) of every prefill call."""

    def prefill(self, slots, prompts, adapters=None, starts=None, ends=None):
        self.calls.append([(s, e - st) for s, e, st in zip(slots, ends, starts)])
        return super().prefill(slots, prompts, adapters, starts, ends)


def test_prefill_budget_while_streams_decode(model, solo_engine, monkeypatch):
    """With a stream decoding, a prefill step takes at most PREFILL_BUDGET prompt tokens, oldest
    request first, so two long prompts go in one chunk a step (the older one first) instead of
    both chunks in every step; both still come out as they would alone."""
    import internlm_core.batching as batching_mod

    monkeypatch.setattr(batching_mod, "PREFILL_BUDGET", 8)
    engine = PrefillLog(model, max_batch=3, max_len=64)
    engine.calls, engine.prefill_chunk = [], 8
    b = Batcher(engine, prefix_cache=False).start()
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    try:
        first = b.submit(random_ids(4, 512, seed=4), SamplingParams(max_new_tokens=40, ignore_eos=True))
        first.next_events()
        engine.calls.clear()
        prompts = [random_ids(24, 512, seed=24), random_ids(16, 512, seed=16)]
        with b._wake:  # both admitted in the same iteration
            handles = [b.submit(p, params) for p in prompts]
        got = [[e.token_id for e in h] for h in handles]
        first.result()
    finally:
        b.stop(timeout=30)
    assert got == [solo(solo_engine, p, params) for p in prompts]
    older, newer = handles[0].slot, handles[1].slot
    assert engine.calls == [[(older, 8)]] * 3 + [[(newer, 8)]] * 2  # one 8-token chunk a step, oldest first


@pytest.mark.parametrize("params", [
    SamplingParams(max_new_tokens=20, ignore_eos=True),
    SamplingParams(max_new_tokens=20, temperature=0.9, top_k=40, repetition_penalty=1.2, seed=99, ignore_eos=True),
], ids=["greedy", "seeded"])
def test_resumed_request_continues_exactly(model, params):
    """What the endpoint does when a worker dies mid-stream: the same request resumed after the
    tokens already streamed gets exactly the rest (counted, penalised and sampled as if never cut),
    including cuts that put the resumed context across a prefill chunk and past a reused prefix."""
    engine = Engine(model, max_batch=2, max_len=64)
    engine.prefill_chunk = 8
    b = Batcher(engine).start()
    try:
        prompt = random_ids(6, 512, seed=6)
        full = b.submit(prompt, params).result().token_ids
        for cut in (1, 2, 7, 10, 19):
            h = b.submit(prompt, params, resume=full[:cut])
            assert [e.token_id for e in h] == full[cut:], cut  # only what follows is streamed
            assert h.result().token_ids == full and h.finish_reason == "length"
        with pytest.raises(ValueError, match="already ends the request"):
            b.submit(prompt, params, resume=full)
        with pytest.raises(ValueError, match="outside the model's vocabulary"):
            b.submit(prompt, params, resume=[600])
        with pytest.raises(PromptTooLong):
            b.submit(prompt, params.replace(max_new_tokens=80), resume=[5] * 60)
    finally:
        b.stop(timeout=30)


def test_the_cpu_kernels_serve_the_tokens_of_mindspores_own_ops(tiny_config):
    """Greedy tokens are the same with every serving optimisation (the CPU kernels: packed
    matmuls, attention read from the cache, one-op norms/rotary/SwiGLU, one decode shape for any
    length) and without them (MindSpore's ops over gathered, masked cache buckets), for mixed
    traffic through the batcher: short and long prompts (chunked, past the smallest bucket)
    joining and leaving at different times, and prefix-cache hits; the kernels with their default
    fp16 KV cache and with an fp32 one (MindSpore's ops hold fp32) give the same tokens too."""
    from internlm_core.model import InternLMForCausalLM, init_weights

    cfg = tiny_config.replace(max_position_embeddings=256)
    prompts = [random_ids(n, 512, seed=n) for n in (3, 90, 17, 140, 40, 9)]
    prompts += [prompts[1] + random_ids(12, 512, seed=7), prompts[3][:100]]  # prefix hits on finished slots
    lengths = [30, 12, 50, 20, 8, 40, 16, 10]
    got = {}
    for kernels, cache in ((True, None), (True, "float32"), (False, None)):
        model = InternLMForCausalLM(cfg)
        init_weights(model, seed=0, std=0.5)
        engine = Engine(model, max_batch=3, max_len=256, cpu_kernels=kernels, cache_dtype=cache)
        assert engine.kernels == kernels
        assert engine.cache_dtype == (cache or ("float16" if kernels else "float32"))
        engine.prefill_chunk = 32
        b = Batcher(engine, max_queue=8).start()
        try:
            handles, early = [], []
            for i, (p, n) in enumerate(zip(prompts, lengths)):
                handles.append(b.submit(p, SamplingParams(max_new_tokens=n, ignore_eos=True)))
                if i == 2:  # later arrivals join streams that are already decoding
                    early = handles[0].next_events()
                if i == 5:  # the prefix hits come after the slots they reuse were freed
                    wait_idle(b)
            got[kernels, cache] = [[e.token_id for e in (early if i == 0 else []) + list(h)] for i, h in enumerate(handles)]
        finally:
            b.stop(timeout=60)
        assert {t for _, t, _ in engine.shapes_run} & {32}  # chunked prefill ran
    assert got[True, None] == got[False, None] == got[True, "float32"]
    assert [len(t) for t in got[True, None]] == lengths
