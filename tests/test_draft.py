"""Draft-model speculative decoding (``internlm_core/draft.py``): the draft's cache holds exactly
the kept tokens after a rejection, the batcher's output with a draft (itself, a near copy, an
InternLM2-shaped random model) is plain decoding's token for token, a draft that is the target
accepts everything, and a draft with another tokenizer is refused."""
import numpy as np
import pytest
from scipy import stats

from internlm_core.batching import Batcher
from internlm_core.config import Config
from internlm_core.draft import Drafter, check_pair
from internlm_core.engine import Engine
from internlm_core.errors import TokenizerError
from internlm_core.generation import SamplingParams, SequenceState, softmax
from internlm_core.model import InternLMForCausalLM, init_weights
from internlm_core.tokenizer import AddedToken, Tokenizer
from tests.helpers import DATA, TOKENIZER_MODEL, random_ids
from tests.test_speculative import Counts, repetitive, seeded_requests, serve, slot_rows


def random_model(cfg, seed, std):
    m = InternLMForCausalLM(cfg)
    init_weights(m, seed=seed, std=std)
    return m


@pytest.fixture(scope="module")
def target(tiny_config):
    return repetitive(tiny_config)


@pytest.fixture(scope="module")
def drafts(tiny_config, target):
    """Draft models for the target: itself (the same weights), a near copy (its init scaled by
    1.1: agrees with it often, not always) and an InternLM2-shaped random model (GQA, another width:
    its proposals are mostly rejected)."""
    return {"self": target, "near": random_model(tiny_config, 0, 0.022),
            "other": random_model(Config.from_name("tiny-v2", max_position_embeddings=128), 5, 0.02)}


# ---- the draft's cache ---------------------------------------------------------------------

def test_after_a_rejection_the_drafts_cache_is_a_draft_that_fed_only_the_kept_tokens(target, drafts):
    """Four proposals, the first kept and the target's own token after it: the draft rolls back,
    feeds the target's token and proposes again; its rows and proposals are bit for bit those of
    a draft that decoded only the kept tokens."""
    prompt = random_ids(11, 512, seed=31)
    drafter = Drafter(Engine(drafts["near"], max_batch=2, max_len=64), Engine(target, max_batch=2, max_len=64))
    drafter.prefill([1], [prompt])
    seq = prompt + [7]  # the target's first token (any)
    first = drafter.propose([1], [seq], [4])[0]
    assert len(first) == 4 and drafter.fed[1] == len(seq) + 3  # x4 is not fed yet
    own = (first[1] + 1) % 512  # the target keeps x1 and says another token than x2
    tokens = seq + [first[0], own]
    drafter.rollback(1, len(tokens))
    assert drafter.fed[1] == len(tokens) - 1  # the rows of x2 and x3 lie past its end
    second = drafter.propose([1], [tokens], [3])[0]

    ref = Engine(drafts["near"], max_batch=1, max_len=64)  # the kept tokens only, one decode at a time
    ref.prefill([0], [prompt])
    fed = [7, first[0], own, *second[:2]]
    greedy = [int(np.argmax(ref.decode([t], [len(prompt) + i], slots=[0])[0])) for i, t in enumerate(fed)]
    assert greedy[:2] == first[:2] and greedy[2:] == second
    n = drafter.fed[1]
    assert n == len(prompt) + len(fed)
    for a, b in zip(slot_rows(drafter.engine, 1, n), slot_rows(ref, 0, n)):
        np.testing.assert_array_equal(a, b)


def test_a_sequence_behind_the_draft_catches_up(target, drafts):
    """Tokens the draft missed (a pause in proposing) are fed before it proposes: its proposals
    are those of a draft that saw every token."""
    prompt, later = random_ids(9, 512, seed=32), random_ids(6, 512, seed=33)
    drafter = Drafter(Engine(drafts["near"], max_batch=1, max_len=64), Engine(target, max_batch=1, max_len=64))
    drafter.prefill([0], [prompt])
    got = drafter.propose([0], [prompt + later], [2])[0]
    ref = Engine(drafts["near"], max_batch=1, max_len=64)
    logits = ref.prefill([0], [prompt + later])[0]
    want = [int(np.argmax(logits))]
    want.append(int(np.argmax(ref.decode([want[0]], [len(prompt) + len(later)], slots=[0])[0])))
    assert got == want and drafter.fed[0] == len(prompt) + len(later) + 1


# ---- the batcher with a draft ----------------------------------------------------------------

def test_in_the_batcher_the_drafts_rows_are_the_kept_tokens_only(target, drafts):
    """After requests with kept and rejected proposals, one after the other in one slot (the
    second a prefix hit on the first), the draft's rows of the slot are those of a draft fed the
    request's own tokens only (to rounding: a pause's tokens are caught up by a prefill)."""
    engine = Engine(target, max_batch=1, max_len=96, cache_dtype="float32")
    draft = Engine(drafts["near"], max_batch=1, max_len=96, cache_dtype="float32")
    first = random_ids(10, 512, seed=60)
    second = first[:6] + random_ids(5, 512, seed=61)
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    counts = Counts()
    b = Batcher(engine, metrics=counts, speculate="draft", draft=draft).start()
    try:
        for prompt in (first, second):
            tokens = prompt + b.submit(prompt, params).result().token_ids
            n = b.drafter.fed[0]
            assert len(prompt) < n < len(tokens)
            ref = Engine(drafts["near"], max_batch=1, max_len=96, cache_dtype="float32")
            ref.prefill([0], [prompt])
            for i, t in enumerate(tokens[len(prompt):n]):
                ref.decode([t], [len(prompt) + i], slots=[0])
            for got, want in zip(slot_rows(draft, 0, n), slot_rows(ref, 0, n)):
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    finally:
        b.stop(timeout=60)
    assert counts.proposed > counts.accepted > 0 and counts.reused == 6


@pytest.fixture(scope="module")
def crowd_engine(tiny_config, tmp_path_factory):
    """The target with a LoRA adapter beside the base (the draft has none), 3 slots."""
    from internlm_core.lora import AdapterSpec
    from tests.helpers import random_adapter

    engine = Engine(repetitive(tiny_config), max_batch=3, max_len=96)
    engine.load_adapter("a", random_adapter(tiny_config, AdapterSpec(rank=4, alpha=8, targets=("wq", "wv")),
                                            tmp_path_factory.mktemp("adapter") / "a", seed=1, std=0.5))
    return engine


@pytest.mark.parametrize("kind", ["self", "near", "other"])
def test_greedy_with_a_draft_is_plain_greedy_in_a_crowd(crowd_engine, drafts, kind):
    """Streams joining and leaving (more than the slots), prefix hits (the draft's rows reused as
    far as they go), an adapter beside the base model, max_new_tokens cutting a kept run, a stop id
    held back by min_new_tokens: every request gets plain decoding's tokens and logprobs."""
    prompts = [random_ids(n, 512, seed=n) for n in (3, 9, 17, 5, 12)]
    lengths = [30, 41, 12, 60, 25]
    requests = [(p, SamplingParams(max_new_tokens=n, ignore_eos=True, logprobs=True), "a" if i % 3 == 1 else None)
                for i, (p, n) in enumerate(zip(prompts, lengths))]
    requests.append((prompts[4], SamplingParams(max_new_tokens=40, min_new_tokens=8, stop_token_ids=[286]), None))
    hits = [(prompts[4] + random_ids(4, 512, seed=40), requests[4][1], None),
            (prompts[3] + random_ids(2, 512, seed=41), requests[1][1], None)]
    plain, _ = serve(crowd_engine, requests, "off", hits)
    draft = Engine(drafts[kind], max_batch=3, max_len=96)
    spec, counts = serve(crowd_engine, requests, "draft", hits, draft=draft)
    assert spec == plain
    assert counts.method == "draft" and counts.reused > 0
    per_step = (counts.steps + counts.accepted) / counts.steps
    if kind == "self":  # the target's own greedy tokens: kept but where an adapter or a stop id intervenes
        assert per_step > 1.5
    else:
        assert counts.proposed > counts.accepted


def test_a_draft_that_is_the_target_keeps_every_proposal(target):
    """Without adapters or stops, a draft with the target's weights proposes the target's own
    greedy tokens: every proposal kept, up to k + 1 tokens a step."""
    engine, draft = (Engine(target, max_batch=2, max_len=96) for _ in range(2))
    requests = [(random_ids(n, 512, seed=50 + n), SamplingParams(max_new_tokens=48, ignore_eos=True), None)
                for n in (4, 10, 7)]
    plain, _ = serve(engine, requests, "off")
    spec, counts = serve(engine, requests, "draft", draft=draft)
    assert spec == plain
    assert counts.accepted == counts.proposed > 0
    assert (counts.steps + counts.accepted) / counts.steps > 3


def test_a_seeded_request_with_a_sampling_draft_repeats_exactly(target, drafts):
    """Sampled, a draft's proposals are drawn and judged by the rejection rule (other draws than
    plain decoding's), all from the request's seed: the request repeats token for token (alone on
    the worker, so each step proposes as many tokens), with penalties and top-k/p, and its
    logprobs are the target's."""
    engine = Engine(target, max_batch=2, max_len=96)
    draft = Engine(drafts["near"], max_batch=2, max_len=96)
    runs = []
    for _ in range(2):
        counts = Counts()
        b = Batcher(engine, metrics=counts, speculate="draft", draft=draft).start()
        try:
            runs.append([b.submit(p, sp.replace(logprobs=True)).result() for p, sp, _ in seeded_requests()])
        finally:
            b.stop(timeout=60)
        assert counts.accepted > 0 and counts.proposed > counts.accepted
    assert [(r.token_ids, r.logprobs) for r in runs[0]] == [(r.token_ids, r.logprobs) for r in runs[1]]
    ref = Engine(target, max_batch=1, max_len=96)
    for (prompt, *_), r in zip(seeded_requests(), runs[0]):
        logits = [ref.prefill([0], [prompt])[0]]
        logits += [ref.decode([t], [len(prompt) + i], slots=[0])[0] for i, t in enumerate(r.token_ids[:-1])]
        want = [np.log(softmax(np.asarray(x, np.float64))[t]) for x, t in zip(logits, r.token_ids)]
        np.testing.assert_allclose(r.logprobs, want, rtol=1e-5)


def test_sampled_tokens_through_the_batcher_follow_the_target(tiny_config, target, drafts):
    """Chi-square over many seeded requests through the batcher with a draft (temperature 1,
    top-k 4): the first two tokens (the second always a draft proposal judged by the rejection
    rule, kept or drawn from the residual) follow the target's joint distribution, and the second
    is kept with probability E[sum(min(p, q))] (the point-mass rule keeps a greedy proposal with
    probability E[p(argmax q)])."""
    params = SamplingParams(temperature=1.0, top_k=4, max_new_tokens=3, ignore_eos=True, stop_token_ids=[])
    prompt = random_ids(6, 512, seed=80)
    ref, ref_draft = Engine(target, max_batch=1, max_len=32), Engine(drafts["near"], max_batch=1, max_len=32)
    p1 = SequenceState(prompt, params, vocab_size=512).probs(ref.prefill([0], [prompt])[0])
    joint, keep = {}, 0.0
    for t1 in np.flatnonzero(p1):
        at = SequenceState(prompt, params, vocab_size=512)
        at.resume([int(t1)])
        p2 = at.probs(ref.prefill([0], [prompt + [int(t1)]])[0])
        q2 = at.probs(ref_draft.prefill([0], [prompt + [int(t1)]])[0])
        keep += p1[t1] * np.minimum(p2, q2).sum()
        joint.update({(int(t1), int(t2)): p1[t1] * p2[t2] for t2 in np.flatnonzero(p2)})
    n = 1500
    counts = Counts()
    engine, draft = Engine(target, max_batch=4, max_len=32), Engine(drafts["near"], max_batch=4, max_len=32)
    b = Batcher(engine, max_queue=n, metrics=counts, speculate="draft", draft=draft).start()
    try:
        handles = [b.submit(prompt, params.replace(seed=s)) for s in range(n)]
        pairs = [tuple(h.result().token_ids[:2]) for h in handles]
    finally:
        b.stop(timeout=60)
    assert counts.proposed == n  # one proposal each, for the second token
    assert set(pairs) <= set(joint)
    cells = sorted(joint)
    seen = np.array([pairs.count(c) for c in cells])
    assert stats.chisquare(seen, np.array([joint[c] for c in cells]) * n).pvalue > 1e-3
    assert stats.binomtest(counts.accepted, n, keep).pvalue > 1e-3


def test_a_self_draft_keeps_nearly_every_sampled_proposal(target):
    """A draft with the target's weights, sampled at temperature 0.8 with top-p: its q is the
    target's p, so the rejection rule keeps its proposals (the point-mass rule kept 10 of 58 of the
    demo model's: a greedy proposal had to be the sampled token)."""
    engine, draft = (Engine(target, max_batch=2, max_len=96) for _ in range(2))
    requests = [(random_ids(n, 512, seed=90 + n), SamplingParams(max_new_tokens=40, temperature=0.8, top_p=0.95,
                                                                  seed=n, ignore_eos=True), None) for n in (4, 9, 6)]
    _, counts = serve(engine, requests, "draft", draft=draft)
    assert counts.proposed > 30 and counts.accepted > 0.8 * counts.proposed


def test_a_resumed_request_continues_exactly_with_a_draft(target, drafts):
    """Failover: a request resumed after tokens it streamed elsewhere is prefilled into the draft
    with them and gets the rest plain decoding gives."""
    engine, draft = Engine(target, max_batch=2, max_len=96), Engine(drafts["near"], max_batch=2, max_len=96)
    prompt, params = random_ids(6, 512, seed=6), SamplingParams(max_new_tokens=40, ignore_eos=True)
    (plain, *_), = serve(engine, [(prompt, params, None)], "off")[0]
    b = Batcher(engine, speculate="draft", draft=draft).start()
    try:
        assert b.submit(prompt, params).result().token_ids == plain
        for cut in (1, 7, 23):
            assert [e.token_id for e in b.submit(prompt, params, resume=plain[:cut])] == plain[cut:]
    finally:
        b.stop(timeout=60)


def test_a_cancelled_request_leaves_the_draft_exact_for_the_next(target, drafts):
    """A request cancelled mid-stream frees its slot; the next request in that slot (a prefix hit
    on what the cancelled one left) gets plain decoding's tokens."""
    engine, draft = Engine(target, max_batch=1, max_len=96), Engine(drafts["near"], max_batch=1, max_len=96)
    prompt, params = random_ids(8, 512, seed=70), SamplingParams(max_new_tokens=40, ignore_eos=True)
    follow = prompt + random_ids(3, 512, seed=71)
    (plain, *_), = serve(engine, [(follow, params, None)], "off")[0]
    b = Batcher(engine, speculate="draft", draft=draft).start()
    try:
        h = b.submit(prompt, params)
        got = 0
        while got < 10:
            got += len(h.next_events(timeout=60))
        h.cancel()
        assert h.result().finish_reason == "aborted"
        assert b.submit(follow, params).result().token_ids == plain
    finally:
        b.stop(timeout=60)


def test_a_stop_string_ending_inside_a_run_of_draft_proposals(tokenizer):
    """A stop string that completes on a kept draft proposal ends the request there, with plain
    decoding's tokens, text and finish reason."""
    cfg = Config.from_name("tiny", vocab_size=103168, max_position_embeddings=256)
    model = random_model(cfg, 1, 0.05)  # its greedy text falls into a cycle after ~18 tokens
    engine, draft = (Engine(model, max_batch=2, max_len=128) for _ in range(2))
    prompt = tokenizer.encode("The cat sat on the mat. The cat sat on the")
    params = SamplingParams(max_new_tokens=60, ignore_eos=True)
    (tokens, text, *_), = serve(engine, [(prompt, params, None)], "off", tok=tokenizer)[0]
    end = 24  # the stop string: the text of tokens 20..23 (it ends on the 5th of 7 kept proposals)
    stop = text[len(tokenizer.decode(tokens[:20])):len(tokenizer.decode(tokens[:end]))]
    request = [(prompt, params.replace(stop=(stop,)), None)]
    plain, _ = serve(engine, request, "off", tok=tokenizer)
    spec, counts = serve(engine, request, "draft", tok=tokenizer, draft=draft)
    assert spec == plain
    assert len(plain[0][0]) <= end and plain[0][2] == "stop"
    assert counts.last[1] >= 1 and counts.last[0] > counts.last[1]  # ended on a kept proposal, more proposed


# ---- refusals ----------------------------------------------------------------------------------

def test_a_draft_with_another_tokenizer_is_refused():
    v1 = Tokenizer(TOKENIZER_MODEL)
    v2 = Tokenizer(DATA / "internlm2-tokenizer" / "tokenizer.model")
    cfg = Config.from_name("tiny", vocab_size=103168)
    check_pair(cfg, v1, cfg, Tokenizer(TOKENIZER_MODEL))  # the same tokenizer: fine
    with pytest.raises(TokenizerError, match="vocabulary has 92544 ids, the target's 103168"):
        check_pair(cfg, v1, cfg.replace(vocab_size=92544), v2)
    with pytest.raises(TokenizerError, match="tokenizer .*internlm2-tokenizer.* differs from the target's"):
        check_pair(cfg, v1, cfg, v2)  # the same vocabulary size, another tokenizer
    renamed = Tokenizer(TOKENIZER_MODEL, added_tokens={103000: AddedToken("<|tool|>")})
    with pytest.raises(TokenizerError, match="special tokens differ from the target's .*<|tool|>"):
        check_pair(cfg, v1, cfg, renamed)


def test_the_batcher_refuses_a_draft_that_does_not_fit(target, drafts):
    engine = Engine(target, max_batch=2, max_len=64)
    with pytest.raises(ValueError, match="takes a draft engine"):
        Batcher(engine, speculate="draft")
    with pytest.raises(ValueError, match="used only with speculate='draft'"):
        Batcher(engine, speculate="ngram", draft=Engine(target, max_batch=2, max_len=64))
    with pytest.raises(ValueError, match="1 slots x 64 positions, the target 2 x 64"):
        Batcher(engine, speculate="draft", draft=Engine(target, max_batch=1, max_len=64))
    with pytest.raises(ValueError, match="CPU kernels"):
        Batcher(engine, speculate="draft", draft=Engine(target, max_batch=2, max_len=64, cpu_kernels=False))
