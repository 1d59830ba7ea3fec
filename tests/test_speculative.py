"""Prompt-lookup speculative decoding: the proposals, the acceptance rule (exact for greedy and
sampled decoding), ``Engine.verify`` bit for bit decode's, rejected rows never read, and the
batcher's speculative output token for token plain decoding's."""
import numpy as np
import pytest
from scipy import stats

from internlm_core.batching import Batcher, BatcherMetrics
from internlm_core.engine import Engine
from internlm_core.generation import SamplingParams, SequenceState, softmax
from internlm_core.speculative import (K_MAX, K_MIN, MAX_PAUSE, Adaptive, StepCost, accept, measure_step_cost,
                                      propose, row_budget)
from tests.helpers import random_ids


# ---- proposals -----------------------------------------------------------------------------

def test_propose_continues_the_longest_recurring_suffix():
    assert propose([1, 2, 3, 4, 1, 2, 3], 3) == [4, 1, 2]
    # the 3-gram [5, 3, 9] recurs (followed by 7...), the 2-gram [3, 9] more recently (followed by 8)
    assert propose([5, 3, 9, 7, 3, 9, 8, 5, 3, 9], 2) == [7, 3]
    assert propose([5, 3, 9, 7, 3, 9, 8, 5, 3, 9], 2, max_ngram=2) == [8, 5]


def test_propose_takes_the_latest_match_with_k_tokens_after_it():
    tokens = [1, 2, 8, 1, 2, 9, 9, 9, 1, 2]
    assert propose(tokens, 2) == [9, 9]  # [1, 2] at 3 (the most recent with two after), not at 0
    assert propose(tokens, 6) == [8, 1, 2, 9, 9, 9]  # only the match at 0 has six after it
    assert propose([4, 4, 4], 3) == [4]  # the longest continuation there is


def test_propose_nothing_without_a_recurrence():
    assert propose([1, 2, 3], 4) == []
    assert propose([7], 4) == []
    assert propose([1, 2, 1], 0) == []
    assert propose([1, 5, 2, 1], 2) == [5, 2]
    assert propose([1, 5, 2, 1], 2, min_ngram=2) == []


def test_k_grows_on_acceptance_and_shrinks_on_rejection():
    a = Adaptive(k=4)
    a.update(4, 4)
    assert a.wanted() == 5
    a.update(5, 2)
    assert a.wanted() == 3
    a.update(0, 0)  # nothing proposed: unchanged
    assert a.wanted() == 3
    a.update(3, 0)
    assert a.wanted() == K_MIN
    a = Adaptive(k=K_MAX)
    a.update(K_MAX, K_MAX)
    assert a.wanted() == K_MAX


def test_rejected_single_proposals_pause_proposing_longer_each_time():
    a = Adaptive(k=K_MIN)
    pauses = []
    for _ in range(7):
        a.update(K_MIN, 0)
        steps = 0
        while a.wanted() == 0:
            steps += 1
        pauses.append(steps)
    assert pauses == [1, 2, 4, 8, 16, MAX_PAUSE, MAX_PAUSE]
    a.update(K_MIN, 1)  # kept: the next miss pauses for one step again
    a.update(2, 0)
    a.update(K_MIN, 0)
    assert [a.wanted() for _ in range(2)] == [0, K_MIN]


def test_the_acceptance_rate_counts_the_positions_checked():
    a = Adaptive()
    assert a.rate == 0.8  # the hopeful prior
    for _ in range(20):
        a.update(4, 4)  # every position checked was kept
    assert a.rate > 0.95
    for _ in range(20):
        a.update(3, 1)  # one kept, then a miss: 1 of 2 positions (the third was never checked)
    assert abs(a.rate - 0.5) < 0.02
    for _ in range(20):
        a.update(2, 0)
    low = a.rate
    assert low < 0.05
    a.update(0, 0)  # nothing proposed: a little of the way back to the prior
    assert low < a.rate < 0.05
    for _ in range(60):
        a.update(0, 0)
    assert 0.7 < a.rate < 0.8  # tried again


# ---- how many rows a step verifies ----------------------------------------------------------

def expected_rate(wanted, rates, take, cost):
    """A step's expected tokens per second when sequence i verifies take[i] proposals."""
    tokens = len(wanted) + sum(r ** j for r, t in zip(rates, take) for j in range(1, t + 1))
    return tokens / cost.seconds(len(wanted) + sum(take), tokens)


def test_rows_that_ride_on_the_weights_read_are_all_taken():
    """A step bound by reading the weights (a large fixed cost, cheap rows): every proposal wanted
    pays, even unlikely ones, up to the row cap."""
    cost = StepCost(fixed=50e-3, per_row=0.5e-3, per_token=0.05e-3)
    assert row_budget([7], [0.9], cost, cap=64) == [7]
    assert row_budget([4, 0, 3], [0.6, 0.9, 0.5], cost, cap=64) == [4, 0, 3]
    assert row_budget([1, 1], [0.1, 0.1], cost, cap=64) == [1, 1]  # kept 1 time in 10, and still worth it
    assert row_budget([7], [0.3], cost, cap=64) == [3]  # not a fourth: kept 1 time in 123
    assert row_budget([7, 7], [0.9, 0.9], cost, cap=10) == [4, 4]  # the cap counts the sequences' own rows
    assert row_budget([3], [0.0], cost, cap=64) == [0]  # never kept: never worth a row


def test_rows_bound_by_arithmetic_go_to_likely_proposals_first():
    """bench-serve bf16's measured cost at 8 sequences (4.2 ms, 0.29 ms a row): a proposal kept 3 times
    in 4 pays, one kept 1 time in 5 does not; the likelier sequence gets the rows first, and the
    budget is the one that gives the most tokens per second."""
    cost = StepCost(fixed=1.9e-3, per_row=0.29e-3)
    rates = [0.95, 0.75, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2]
    take = row_budget([7] * 8, rates, cost, cap=64)
    assert take[0] >= take[1] > 0 and take[2:] == [0] * 6
    best = max(((a, b) for a in range(8) for b in range(8)),
               key=lambda ab: expected_rate([7] * 8, rates, [*ab, 0, 0, 0, 0, 0, 0], cost))
    assert tuple(take[:2]) == best
    assert row_budget([7] * 8, [0.2] * 8, cost, cap=64) == [0] * 8
    assert expected_rate([7] * 8, rates, take, cost) > expected_rate([7] * 8, rates, [0] * 8, cost)


def test_the_budget_gives_the_most_tokens_per_second():
    """Against every budget there is for three sequences wanting up to 4 proposals each, over random
    costs (the batcher's own time a token included) and acceptance rates: the greedy budget's expected
    tokens per second are the best's, within 1%."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        cost = StepCost(fixed=rng.uniform(0, 5e-3), per_row=rng.uniform(0.01e-3, 1e-3), per_token=rng.uniform(0, 1e-3))
        wanted, rates = list(rng.integers(0, 5, 3)), list(rng.uniform(0, 1, 3))
        take = row_budget(wanted, rates, cost, cap=64)
        assert all(0 <= t <= w for t, w in zip(take, wanted))
        best = max(expected_rate(wanted, rates, t, cost) for t in np.ndindex(*(w + 1 for w in wanted)))
        assert expected_rate(wanted, rates, take, cost) >= 0.99 * best


def test_the_step_cost_is_measured_on_the_engine(model):
    """Fixed and per-row seconds from verification steps of 8 and 16 rows, in a 2-slot engine."""
    engine = Engine(model, max_batch=2, max_len=48)
    cost = measure_step_cost(engine, repeats=3)
    assert cost.fixed > 0 and cost.per_row >= 0 and cost.per_token == 0
    assert cost.seconds(1, 1) <= cost.seconds(16, 1)
    with pytest.raises(ValueError, match="do not fit"):
        measure_step_cost(Engine(model, max_batch=1, max_len=16))


def test_history_appends_only_what_is_new():
    from internlm_core.speculative import History

    h = History(8)
    assert h.update([5, 6], [7]).tolist() == [5, 6, 7]
    assert h.update([5, 6], [7, 8, 9]).tolist() == [5, 6, 7, 8, 9]
    assert h.update([5, 6], [7, 8, 9]).tolist() == [5, 6, 7, 8, 9]


# ---- the acceptance rule -------------------------------------------------------------------

V = 6
LOGITS = np.array([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0], [0.0, 1.0, 0.5, 2.0, -0.5, 0.3]], np.float32)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, max_new_tokens=4, ignore_eos=True, stop_token_ids=[]),
    SamplingParams(temperature=0.7, top_k=4, top_p=0.95, repetition_penalty=1.3, max_new_tokens=4,
                   stop_token_ids=[]),
], ids=["plain", "processed"])
@pytest.mark.parametrize("proposal", [0, 1, 5])
def test_accepted_tokens_follow_the_target_distribution(params, proposal):
    """Chi-square over many seeded draws: the first token of a verification follows the target's
    fully processed distribution whether the proposal is likely, unlikely or filtered out; the
    proposal is kept with probability P(proposal); after a rejection the token follows P with the
    proposal removed and renormalised (the rejection rule for a point-mass draft)."""
    prompt = [1, 2]
    probe = SequenceState(prompt, params, vocab_size=V)
    logits = probe.process(LOGITS[0])
    target = softmax(np.asarray(_filtered(probe, logits), np.float64))
    n = 4000
    first, kept, after_reject = np.zeros(V), 0, np.zeros(V)
    for seed in range(n):
        state = SequenceState(prompt, params.replace(seed=seed), vocab_size=V)
        events = list(accept(state, LOGITS, [proposal]))
        first[events[0].token_id] += 1
        if events[0].token_id == proposal:
            kept += 1
            assert len(events) == 2  # kept: the next row's token comes too
        else:
            after_reject[events[0].token_id] += 1
            assert len(events) == 1
    live = target > 0
    assert first[~live].sum() == 0
    assert stats.chisquare(first[live], target[live] * n).pvalue > 1e-3
    assert stats.binomtest(kept, n, target[proposal]).pvalue > 1e-3
    rest = target.copy()
    rest[proposal] = 0
    rest_live = rest > 0
    assert stats.chisquare(after_reject[rest_live], rest[rest_live] / rest.sum() * after_reject.sum()).pvalue > 1e-3


# A draft's distribution at the first position: unlike the target's (it favours 2 and 3), on a token
# the target's top-k drops (5) and missing one the target likes (1).
Q = np.array([0.3, 0.0, 0.35, 0.2, 0.05, 0.1])


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, max_new_tokens=4, ignore_eos=True, stop_token_ids=[]),
    SamplingParams(temperature=0.7, top_k=4, top_p=0.95, repetition_penalty=1.3, max_new_tokens=4,
                   stop_token_ids=[]),
], ids=["plain", "processed"])
def test_the_rejection_rule_gives_the_target_distribution_and_keeps_min_p_q(params):
    """Chi-square over many seeded draws: a proposal drawn from the draft's q (``draft_uniforms``,
    as ``DraftSampler`` draws it) and judged by ``accept`` gives a first token that follows the
    target's processed p, and is kept with probability sum(min(p, q)) (the point-mass rule keeps
    it with probability sum(p q): 0.27 against 0.59 here); a kept proposal brings the next row's token."""
    from internlm_core.generation import draw

    prompt = [1, 2]
    target = SequenceState(prompt, params, vocab_size=V).probs(LOGITS[0])
    n = 4000
    first, kept = np.zeros(V), 0
    for seed in range(n):
        state = SequenceState(prompt, params.replace(seed=seed), vocab_size=V)
        x = draw(Q, state.draft_uniforms(0)[0])
        events = list(accept(state, LOGITS, [x], draft_probs=[Q]))
        first[events[0].token_id] += 1
        kept += events[0].token_id == x
        assert len(events) == (2 if events[0].token_id == x else 1)
    live = target > 0
    assert first[~live].sum() == 0
    assert stats.chisquare(first[live], target[live] * n).pvalue > 1e-3
    assert stats.binomtest(kept, n, np.minimum(target, Q).sum()).pvalue > 1e-3


def test_draft_sampler_processes_each_proposal_as_the_target_will():
    """Fed the target's own rows, ``DraftSampler``'s q_j are the target's p_j bit for bit at every
    position (penalties counting the proposals before it, min_tokens' stop mask lifting on the
    way), so the rejection rule keeps every proposal; the tokens and logprobs are the target's."""
    from internlm_core.speculative import DraftSampler

    params = SamplingParams(temperature=0.8, top_k=5, top_p=0.9, repetition_penalty=1.4, presence_penalty=0.5,
                            frequency_penalty=0.3, min_new_tokens=2, stop_token_ids=[3], max_new_tokens=8,
                            seed=11, logprobs=True)
    rows = np.random.default_rng(1).normal(0, 1, (5, V)).astype(np.float32)
    rows[:, 3] += 3  # the stop id is likely once it may come
    state = SequenceState([1, 4], params, vocab_size=V)
    sampler = DraftSampler(state)
    proposals = [sampler(r) for r in rows[:3]]
    events = []
    for j, event in enumerate(accept(state, rows[:4], proposals, draft_probs=sampler.q)):
        events.append(event)
        if j < 3:
            np.testing.assert_array_equal(sampler.q[j], _probs_before(state, rows[j]))
    assert [e.token_id for e in events][:3] == proposals  # all kept (then the bonus token, or the stop id ended it)
    assert len(events) == 4 or (len(events) == 3 and events[-1].finish_reason == "eos")
    assert sampler.q[0][3] == 0 and sampler.q[2][3] > 0  # the stop id masked for the first two tokens only
    for e, r in zip(events, rows):
        assert e.logprob == pytest.approx(float(np.log(softmax(r.astype(np.float64))[e.token_id])))


def _probs_before(state, row):
    """The target's p at the token ``state`` last recorded: recomputed from a copy of the state
    that has not recorded it (the same prompt, params and tokens)."""
    probe = SequenceState(state.prompt, state.params, vocab_size=state.vocab_size)
    probe.resume(state.generated[:-1])
    return probe.probs(row)


def _filtered(state, logits):
    """The logits ``SequenceState.choose`` samples from (temperature, top-k/p, min-p applied)."""
    from internlm_core.generation import apply_temperature, min_p_filter, top_k_filter, top_p_filter

    p = state.params
    return min_p_filter(top_p_filter(top_k_filter(apply_temperature(logits, p.temperature), p.top_k), p.top_p),
                        p.min_p)


def test_accept_takes_the_same_draws_as_plain_decoding():
    """A seeded verification gives exactly the tokens (and logprobs) of plain decoding from the
    same rows, kept proposals or not: one draw per token either way."""
    params = SamplingParams(temperature=1.0, max_new_tokens=8, seed=5, logprobs=True, stop_token_ids=[])
    rows = np.random.default_rng(0).normal(0, 1, (4, V)).astype(np.float32)
    plain = SequenceState([1], params, vocab_size=V)
    want = [plain.step(r) for r in rows]
    for proposals in ([want[0].token_id, want[1].token_id, want[2].token_id], [want[0].token_id, 99 % V]):
        state = SequenceState([1], params, vocab_size=V)
        got = list(accept(state, rows[:len(proposals) + 1], proposals))
        n = len(got)
        assert [(e.token_id, e.logprob) for e in got] == [(e.token_id, e.logprob) for e in want[:n]]


def test_accept_stops_where_the_request_ends():
    """A stop token (or max_new_tokens) reached on a kept proposal ends the run there."""
    rows = np.full((4, V), -5.0, np.float32)
    for j, t in enumerate([3, 4, 2, 1]):
        rows[j, t] = 5.0
    state = SequenceState([1], SamplingParams(max_new_tokens=8, stop_token_ids=[2]), vocab_size=V)
    assert [e.token_id for e in accept(state, rows, [3, 4, 2])] == [3, 4, 2]
    assert state.finish_reason == "eos"
    state = SequenceState([1], SamplingParams(max_new_tokens=2, stop_token_ids=[]), vocab_size=V)
    assert [e.token_id for e in accept(state, rows, [3, 4, 2])] == [3, 4]
    assert state.finish_reason == "length"


# ---- the engine's verification step ---------------------------------------------------------

def repetitive(cfg):
    """Small weights make the tiny model repeat itself (runs and cycles that it sometimes breaks),
    so prompt lookup has proposals that are kept and ones that are rejected; and its logits lie
    close together, where a rounding difference would change a greedy token."""
    from internlm_core.model import InternLMForCausalLM, init_weights

    m = InternLMForCausalLM(cfg)
    init_weights(m, seed=0, std=0.02)
    return m


@pytest.fixture(scope="module")
def model(tiny_config):
    return repetitive(tiny_config)


def slot_rows(engine, slot, n):
    """The k and v cache rows of positions 0..n-1 of ``slot``, every layer and head."""
    cfg, L = engine.config, engine.max_len
    heads = (slot * cfg.kv_heads + np.arange(cfg.kv_heads))[:, None] * L + np.arange(n)[None, :]
    return [c.asnumpy()[heads.reshape(-1)] for c in engine.caches]


@pytest.mark.parametrize("cache_dtype", ["float16", "float32"])
def test_verify_gives_decodes_logits_bit_for_bit(model, cache_dtype):
    """Logits at every position of a verification chunk, and the cache rows it writes, are the
    bits that feeding the same tokens one decode step at a time gives, for rows of different
    chunk lengths in one step (the linears' rows and decode's attention are row-independent)."""
    prompts = [random_ids(20, 512, seed=1), random_ids(7, 512, seed=2), random_ids(12, 512, seed=4)]
    chunks = [random_ids(6, 512, seed=3), random_ids(1, 512, seed=5), random_ids(3, 512, seed=6)]
    plain, spec = (Engine(model, max_batch=3, max_len=64, cache_dtype=cache_dtype) for _ in range(2))
    for e in (plain, spec):
        e.prefill([0, 1, 2], prompts)
    want = [np.stack([plain.decode([t], [len(p) + j], slots=[s])[0] for j, t in enumerate(c)])
            for s, (p, c) in enumerate(zip(prompts, chunks))]
    got = spec.verify([0, 1, 2], chunks, [len(p) for p in prompts])
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    for s, (p, c) in enumerate(zip(prompts, chunks)):
        for a, b in zip(slot_rows(plain, s, len(p) + len(c)), slot_rows(spec, s, len(p) + len(c))):
            np.testing.assert_array_equal(a, b)


def test_rejected_rows_are_rewritten_before_anything_reads_them(model):
    """After a verification whose proposals are rejected, the next steps write over their rows
    before any query reaches them: every later logit and the cache rows read are plain decoding's."""
    prompt = random_ids(10, 512, seed=8)
    plain, spec = (Engine(model, max_batch=1, max_len=64) for _ in range(2))
    logits = [e.prefill([0], [prompt])[0] for e in (plain, spec)]
    tokens, plain_logits = [int(np.argmax(logits[0]))], []
    for i in range(8):  # plain greedy decoding
        plain_logits.append(plain.decode([tokens[-1]], [len(prompt) + i], slots=[0])[0])
        tokens.append(int(np.argmax(plain_logits[-1])))
    wrong = [(t + 1) % 512 for t in tokens[1:4]]
    rows = spec.verify([0], [[tokens[0]] + wrong], [len(prompt)])[0]  # three rejected rows written
    np.testing.assert_array_equal(rows[0], plain_logits[0])
    assert int(np.argmax(rows[0])) != wrong[0]
    for i in range(1, 8):  # one token at a time from the model's own next token on
        got = spec.decode([tokens[i]], [len(prompt) + i], slots=[0])[0]
        np.testing.assert_array_equal(got, plain_logits[i])
    for a, b in zip(slot_rows(plain, 0, len(prompt) + 8), slot_rows(spec, 0, len(prompt) + 8)):
        np.testing.assert_array_equal(a, b)


def test_warmup_compiles_the_verification_rows(model):
    """Steps of more rows than slots (a verification's) are compiled by ``warmup(verify_rows)``."""
    engine = Engine(model, max_batch=2, max_len=32, native_step=False)  # the native step compiles nothing
    assert engine.warmup(8) == engine.warmup() + 2
    assert {(4, 1, 0), (8, 1, 0)} <= engine.shapes_run


def test_verify_refuses_shared_slots_and_the_cache_end(model):
    from internlm_core.errors import PromptTooLong

    engine = Engine(model, max_batch=2, max_len=16)
    with pytest.raises(ValueError, match="distinct"):
        engine.verify([0, 0], [[1, 2], [3]], [0, 2])
    with pytest.raises(PromptTooLong):
        engine.verify([0], [[1, 2, 3]], [14])


# ---- the batcher ---------------------------------------------------------------------------

class Counts(BatcherMetrics):
    def __init__(self):
        self.steps = self.proposed = self.accepted = self.reused = 0

    def speculation(self, proposed, accepted, method):
        self.last, self.method = (proposed, accepted), method
        self.steps += 1
        self.proposed += proposed
        self.accepted += accepted

    def prefix_cache(self, reused, prompt):
        self.reused += reused


def serve(engine, requests, speculate, then=(), tok=None, draft=None, cost=None):
    """Each (prompt, params, adapter) through a batcher over ``engine``, all submitted at once
    (more than the slots: they join as others leave), then the ones of ``then`` (after those
    ended: their prefixes are in the slots); their results and the batcher's counts. ``draft``:
    the draft engine of ``speculate="draft"``; ``cost``: the step cost the batcher budgets rows by
    ("measure": its own measurement; None: up to SPECULATE_ROWS rows a step)."""
    counts = Counts()
    b = Batcher(engine, tok, metrics=counts, speculate=speculate, draft=draft)
    b.step_cost = b.measure() if cost == "measure" else cost
    b.start()
    try:
        results = []
        for wave in (requests, then):
            handles = [b.submit(p, sp, adapter=a) for p, sp, a in wave]
            results += [h.result() for h in handles]
    finally:
        b.stop(timeout=60)
    return [(r.token_ids, r.text, r.finish_reason, r.logprobs) for r in results], counts


def test_speculative_greedy_is_plain_greedy_in_a_crowd(tmp_path, tiny_config):
    """Streams joining and leaving, prefix hits, an adapter beside the base model, max_new_tokens
    cutting a kept run, a stop id held back by min_new_tokens: speculation gives every request
    plain decoding's tokens and logprobs, keeps proposals (more than one token a step) and rejects
    some."""
    from internlm_core.lora import AdapterSpec
    from tests.helpers import random_adapter

    engine = Engine(repetitive(tiny_config), max_batch=3, max_len=96)  # its own: the adapter goes into its layers
    engine.load_adapter("a", random_adapter(tiny_config, AdapterSpec(rank=4, alpha=8, targets=("wq", "wv")),
                                            tmp_path / "a", seed=1, std=0.5))
    prompts = [random_ids(n, 512, seed=n) for n in (3, 9, 17, 5, 12)]
    lengths = [30, 41, 12, 60, 25]
    requests = [(p, SamplingParams(max_new_tokens=n, ignore_eos=True, logprobs=True), "a" if i % 3 == 1 else None)
                for i, (p, n) in enumerate(zip(prompts, lengths))]
    # a stop id held back by min_new_tokens (the model says 286 fourth; masked, it goes round a cycle)
    requests.append((prompts[4], SamplingParams(max_new_tokens=40, min_new_tokens=8, stop_token_ids=[286]), None))
    hits = [(prompts[4] + random_ids(4, 512, seed=40), requests[4][1], None),  # prefix hits on finished slots
            (prompts[3] + random_ids(2, 512, seed=41), requests[1][1], None)]
    plain, _ = serve(engine, requests, "off", hits)
    spec, counts = serve(engine, requests, "ngram", hits)
    assert spec == plain
    assert plain[5][2] == "eos" and len(plain[5][0]) == 9
    assert counts.accepted > 0 and counts.proposed > counts.accepted  # kept ones and rejected ones
    assert (counts.steps + counts.accepted) / counts.steps > 1.2  # tokens per sequence per step
    assert counts.reused > 0


@pytest.mark.parametrize("cost", [StepCost(fixed=1e-3, per_row=1e-6), "measure"])
def test_a_step_cost_lets_proposals_fill_more_rows_with_the_same_tokens(tiny_config, cost):
    """With rows cheap against the step (as on the weights-bound CPU step), proposals fill more than
    SPECULATE_ROWS rows a step; with a given cost or the engine's own measured one, every request
    gets plain decoding's tokens. (How many rows the tiny model's measured cost lets through depends
    on that measurement, tens of microseconds here: only the given cost's rows are checked.)"""
    from internlm_core.batching import SPECULATE_ROWS

    engine = Engine(repetitive(tiny_config), max_batch=3, max_len=96)
    if cost == "measure":
        cost = Batcher(engine, speculate="ngram").measure()
        assert cost.fixed > 0 and cost.per_row >= 0
        checked = False
    else:
        checked = True
    rows, verify = [], engine.verify

    def counted(slots, chunks, *args, **kwargs):
        rows.append(sum(map(len, chunks)))
        return verify(slots, chunks, *args, **kwargs)

    engine.verify = counted
    requests = [(random_ids(n, 512, seed=n), SamplingParams(max_new_tokens=60, ignore_eos=True), None)
                for n in (3, 9, 17, 5)]
    plain, _ = serve(engine, requests, "off")
    spec, counts = serve(engine, requests, "ngram", cost=cost)
    assert spec == plain
    if checked:
        assert max(rows) > SPECULATE_ROWS and counts.accepted > 0


def seeded_requests():
    """Seeded sampled requests: two near greedy with logprobs, one with top-k/p and penalties."""
    params = [SamplingParams(max_new_tokens=40, temperature=0.05, seed=s, ignore_eos=True, logprobs=True)
              for s in (1, 2)]
    params.append(SamplingParams(max_new_tokens=40, temperature=0.3, top_k=5, top_p=0.9, repetition_penalty=1.1,
                                 presence_penalty=0.2, seed=3, ignore_eos=True))
    return [(random_ids(8, 512, seed=i), sp, None) for i, sp in enumerate(params)]


def test_speculative_sampling_is_plain_sampling_under_a_seed(model):
    """A seeded sampled request gives the tokens it gives without speculation (so it repeats
    exactly, and a failover's resume stays right), with penalties, top-k/p and a repeated run."""
    engine = Engine(model, max_batch=2, max_len=96)
    requests = seeded_requests()
    plain, _ = serve(engine, requests, "off")
    spec, counts = serve(engine, requests, "ngram")
    again, _ = serve(engine, requests, "ngram")
    assert spec == plain == again
    assert counts.accepted > 0


def test_speculative_resume_continues_exactly(model):
    """A request resumed after tokens it streamed elsewhere (a kill -9 failover) gets the rest
    plain decoding gives, speculating from the resumed text on."""
    engine = Engine(model, max_batch=2, max_len=96)
    prompt, params = random_ids(6, 512, seed=6), SamplingParams(max_new_tokens=40, ignore_eos=True)
    b = Batcher(engine, speculate="ngram").start()
    try:
        full = b.submit(prompt, params).result().token_ids
        for cut in (1, 7, 23):
            assert [e.token_id for e in b.submit(prompt, params, resume=full[:cut])] == full[cut:]
    finally:
        b.stop(timeout=60)
    (plain, *_), = serve(engine, [(prompt, params, None)], "off")[0]
    assert full == plain


def test_opting_out_and_refusals(model):
    engine = Engine(model, max_batch=2, max_len=96)
    request = (random_ids(3, 512, seed=3), SamplingParams(max_new_tokens=30, ignore_eos=True), None)
    off, counts = serve(engine, [(request[0], request[1].replace(speculate=False), None)], "ngram")
    assert counts.steps == 0
    assert off == serve(engine, [request], "off")[0]
    with pytest.raises(ValueError, match="speculate is one of"):
        Batcher(engine, speculate="medusa")
    with pytest.raises(ValueError, match="CPU kernels"):
        Batcher(Engine(model, max_batch=1, max_len=16, cpu_kernels=False), speculate="ngram")


def test_a_stop_string_ending_inside_a_kept_run(tokenizer):
    """A stop string that completes on a kept proposal ends the request there, with plain
    decoding's tokens, text and finish reason (the rest of the run is dropped)."""
    from internlm_core.config import Config
    from internlm_core.model import InternLMForCausalLM, init_weights

    cfg = Config.from_name("tiny", vocab_size=103168, max_position_embeddings=256)
    model = InternLMForCausalLM(cfg)
    init_weights(model, seed=1, std=0.05)  # its greedy text falls into a cycle after ~18 tokens
    engine = Engine(model, max_batch=2, max_len=128)
    prompt = tokenizer.encode("The cat sat on the mat. The cat sat on the")
    params = SamplingParams(max_new_tokens=60, ignore_eos=True)
    (tokens, text, *_), = serve(engine, [(prompt, params, None)], "off", tok=tokenizer)[0]
    i, p = next((i, p) for i in range(len(tokens)) for p in range(1, 20) if tokens[i:i + 4] == tokens[i + p:i + p + 4])
    end = i + p + 3  # the stop string: one whole cycle and then three tokens into the next
    stop = text[len(tokenizer.decode(tokens[:i])):len(tokenizer.decode(tokens[:end]))]
    request = [(prompt, params.replace(stop=(stop,)), None)]
    plain, _ = serve(engine, request, "off", tok=tokenizer)
    spec, counts = serve(engine, request, "ngram", tok=tokenizer)
    assert spec == plain
    assert len(plain[0][0]) == end and plain[0][2] == "stop"
    assert counts.last == (counts.last[0], 2) and counts.last[0] > 2  # ended on the second of more kept proposals


def test_a_grammar_constrains_speculative_decoding_as_plain(tokenizer):
    """Structured output: each verified position is masked by the grammar's state after the
    tokens kept before it, so the answer is plain decoding's (here a run of kept proposals)."""
    from internlm_core.config import Config
    from internlm_core.model import InternLMForCausalLM, init_weights
    from internlm_core.structured import Grammar

    cfg = Config.from_name("tiny", vocab_size=103168, max_position_embeddings=256)
    model = InternLMForCausalLM(cfg)
    init_weights(model, seed=1, std=0.05)
    engine = Engine(model, max_batch=2, max_len=128)
    params = SamplingParams(max_new_tokens=40, grammar=Grammar("regex", "(ab|cd|xyz )+!"))
    request = [(tokenizer.encode("Repeat: ab cd xyz ab cd xyz"), params, None)]
    plain, _ = serve(engine, request, "off", tok=tokenizer)
    spec, counts = serve(engine, request, "ngram", tok=tokenizer)
    assert spec == plain
    assert counts.accepted > 0
