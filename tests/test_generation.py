"""Sampling functions on hand-made logits, and the per-sequence state machine."""
import numpy as np
import pytest

from internlm_core import generation as g
from internlm_core.generation import SamplingParams, SequenceState
from internlm_core.tokenizer import EOS
from tests.helpers import byte_pieces

L = np.array([2.0, 1.0, 0.5, -1.0, -3.0], np.float32)


def test_temperature():
    np.testing.assert_allclose(g.apply_temperature(L, 0.5), L * 2)
    assert g.apply_temperature(L, 1.0) is L


def test_top_k():
    out = g.top_k_filter(L, 2)
    assert np.isfinite(out).tolist() == [True, True, False, False, False]
    assert g.top_k_filter(L, 0) is L


def test_top_p():
    p = g.softmax(L)  # [0.61, 0.22, 0.14, 0.03, 0.004]
    assert np.isfinite(g.top_p_filter(L, 0.5)).sum() == 1
    assert np.isfinite(g.top_p_filter(L, p[0] + 0.01)).sum() == 2
    assert np.isfinite(g.top_p_filter(L, 0.99)).sum() == 4
    assert np.isfinite(g.top_p_filter(L, 1.0)).sum() == 5


def test_min_p():
    p = g.softmax(L)
    out = g.min_p_filter(L, 0.2)
    assert np.isfinite(out).tolist() == (p >= 0.2 * p.max()).tolist() == [True, True, True, False, False]


def test_repetition_penalty_hf_rule():
    out = g.apply_repetition_penalty(L, np.array([0, 3]), 2.0)
    np.testing.assert_allclose(out, [1.0, 1.0, 0.5, -2.0, -3.0])


def test_presence_and_frequency():
    counts = np.array([2, 0, 1, 0, 0], np.float32)
    out = g.apply_presence_frequency(L, counts, presence=0.5, frequency=0.25)
    np.testing.assert_allclose(out, [2.0 - 0.5 - 0.5, 1.0, 0.5 - 0.5 - 0.25, -1.0, -3.0])


def test_sample_follows_distribution_and_seed():
    """Each token's frequency within 4.5 binomial standard deviations of its probability: with
    20000 draws that is +-0.2 points for the 0.4% token (a sampler that never drew it would fail)
    and +-1.6 points for the 61% one; a fixed seed keeps the test deterministic."""
    rng, n = np.random.default_rng(0), 20000
    draws = [g.sample(L, rng) for _ in range(n)]
    freq, p = np.bincount(draws, minlength=5) / n, g.softmax(L)
    bound = 4.5 * np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(freq - p) <= bound), (freq, p, bound)
    a = [g.sample(L, np.random.default_rng(7)) for _ in range(5)]
    b = [g.sample(L, np.random.default_rng(7)) for _ in range(5)]
    assert a == b


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sampling_mostly_masked_logits_draws_what_choice_draws(dtype):
    """Masked rows (a grammar's, top-k/p's -inf) are sampled over their kept tokens only: the
    same probabilities, bit for bit, and the same token as numpy's ``choice`` over the whole row."""
    rng = np.random.default_rng(0)
    for kept in (1, 2, 7, 100, 30_000, 60_000, 77_000, 90_000, 103_168):
        for scale in (0.5, 4.0, 40.0):  # flat to one dominant token
            logits = np.full(103_168, -np.inf, dtype)
            logits[rng.choice(103_168, kept, replace=False)] = rng.normal(0, scale, kept)
            x = logits.astype(np.float64)
            probs = np.exp(x - x.max())
            probs /= probs.sum()
            ids, p = g.kept_probabilities(x, x > -np.inf)
            assert np.array_equal(ids, np.flatnonzero(x > -np.inf)) and np.array_equal(p, (probs / probs.sum())[ids])
            for seed in range(40):
                expected = int(np.random.default_rng(seed).choice(len(probs), p=probs / probs.sum()))
                assert g.sample(logits, np.random.default_rng(seed)) == expected, (kept, scale, seed)
    for bad in ([1.0, np.nan], [1.0, np.inf], [-np.inf, -np.inf]):  # refused as choice refuses them
        with pytest.raises(ValueError, match="NaN"), np.errstate(invalid="ignore"):
            g.sample(np.array(bad + [-np.inf] * 8, dtype), rng)


def test_log_softmax():
    np.testing.assert_allclose(np.exp(g.log_softmax(L)).sum(), 1.0, rtol=1e-6)


def _run(params, logits_seq, tokenizer=None):
    st = SequenceState([1, 5], params, tokenizer, vocab_size=len(logits_seq[0]))
    events = []
    for lg in logits_seq:
        events.append(st.step(np.asarray(lg, np.float32)))
        if events[-1].finish_reason:
            break
    return st, events


def onehot(i, v=8):
    x = np.full(v, -5.0)
    x[i] = 5.0
    return x


def test_greedy_eos_and_length():
    st, ev = _run(SamplingParams(max_new_tokens=10, stop_token_ids=[2]), [onehot(4), onehot(2), onehot(4)])
    assert [e.token_id for e in ev] == [4, 2] and ev[-1].finish_reason == "eos"
    st, ev = _run(SamplingParams(max_new_tokens=2), [onehot(4), onehot(5), onehot(6)])
    assert len(ev) == 2 and ev[-1].finish_reason == "length"


def test_min_new_tokens_blocks_eos():
    st, ev = _run(SamplingParams(max_new_tokens=5, min_new_tokens=2, stop_token_ids=[2]), [onehot(2)] * 5)
    assert [e.token_id for e in ev] != [2]
    assert ev[0].token_id != 2 and ev[1].token_id != 2 and ev[2].token_id == 2


def test_seeded_sampling_repeats():
    seq = [np.linspace(0, 1, 8) for _ in range(6)]
    p = SamplingParams(max_new_tokens=6, temperature=1.0, seed=123)
    a = [e.token_id for e in _run(p, seq)[1]]
    b = [e.token_id for e in _run(p, seq)[1]]
    assert a == b
    assert _run(SamplingParams(max_new_tokens=1, temperature=1.0), seq)[0].seed is not None


@pytest.mark.parametrize("kw, msg", [
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(temperature=-1), "temperature"), (dict(top_k=-2), "top_k"), (dict(min_p=1.0), "min_p"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(stop=[""]), "stop"),
    (dict(max_new_tokens=3, min_new_tokens=4), "min_new_tokens")])
def test_invalid_params(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kw).validate()


FLOAT_FIELDS = ["temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), np.float32("nan")], ids=str)
@pytest.mark.parametrize("field", FLOAT_FIELDS)
def test_nan_and_infinities_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be a finite number, got "):
        SamplingParams(**{field: value}).validate()
    with pytest.raises(ValueError, match=rf"^{field} must be a finite number"):
        SamplingParams(**{field: "0.5"}).validate()  # not a number at all (a Python caller's mistake)
    SamplingParams(**{field: 0.5}).validate()  # the same field with a finite value is fine


def test_multi_token_stop_string(tokenizer):
    # "Hello world" = [9843, 2028]; stop on "o w" which spans the two tokens
    ids = tokenizer.encode("Hello world, again", bos=False)
    seq = [onehot(i, tokenizer.vocab_size) for i in ids]
    st, ev = _run(SamplingParams(max_new_tokens=20, stop=["o w"]), seq, tokenizer)
    assert ev[-1].finish_reason == "stop"
    assert "".join(e.text for e in ev) == st.text == "Hell"


def test_stop_string_prefix_is_held_then_released(tokenizer):
    ids = tokenizer.encode("Hello world", bos=False)
    seq = [onehot(i, tokenizer.vocab_size) for i in ids]
    st, ev = _run(SamplingParams(max_new_tokens=len(ids), stop=["o wX"]), seq, tokenizer)
    assert ev[-1].finish_reason == "length"
    assert "".join(e.text for e in ev) == "Hello world"


def _top_p_full_sort(logits, p):
    """The textbook top-p: sort the whole vocabulary."""
    order = np.argsort(-logits, kind="stable")
    probs = g.softmax(logits[order].astype(np.float64))
    out = np.full_like(logits, -np.inf)
    keep = order[np.cumsum(probs) - probs < p]
    out[keep] = logits[keep]
    return out


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_equals_a_full_sort(p):
    """The partial sort keeps exactly the tokens a full sort keeps: flat and peaked logits (the
    candidate set must widen for flat ones), ties, a 103k vocabulary."""
    rng = np.random.default_rng(int(p * 1000))
    for logits in (rng.normal(0, 0.1, 103168), rng.normal(0, 3, 103168),
                   np.round(rng.normal(0, 1, 5000), 1)):  # rounded: many ties
        logits = logits.astype(np.float32)
        np.testing.assert_array_equal(g.top_p_filter(logits, p, candidates=64), _top_p_full_sort(logits, p))


def _resumed(params, logits_seq, tokens, tokenizer):
    """A fresh state resumed after ``tokens``, then stepped on the rest of ``logits_seq``."""
    st = SequenceState([1, 5], params, tokenizer, vocab_size=len(logits_seq[0]))
    st.resume(tokens)
    events = []
    for lg in logits_seq[len(tokens):]:
        events.append(st.step(np.asarray(lg, np.float32)))
        if events[-1].finish_reason:
            break
    return st, events


def test_resume_continues_the_same_sampled_stream(tokenizer):
    # Random logits over the real vocabulary: sampled tokens include byte pieces, so the text of a
    # resumed state must also pick up a UTF-8 sequence that the cut left half released.
    rng = np.random.default_rng(0)
    seq = [rng.normal(0, 3, tokenizer.vocab_size) for _ in range(24)]
    params = SamplingParams(max_new_tokens=24, temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.3,
                            presence_penalty=0.4, frequency_penalty=0.2, seed=7, ignore_eos=True)
    st, full = _run(params, seq, tokenizer)
    ids = [e.token_id for e in full]
    for cut in range(1, len(ids)):
        st2, rest = _resumed(params, seq, ids[:cut], tokenizer)
        assert [e.token_id for e in rest] == ids[cut:], cut
        assert "".join(e.text for e in rest) == "".join(e.text for e in full[cut:]), cut
        assert st2.text == st.text and st2.finish_reason == "length"


def test_resume_keeps_a_held_stop_string_prefix(tokenizer):
    ids = tokenizer.encode("Hello world, again and again", bos=False)
    seq = [onehot(i, tokenizer.vocab_size) for i in ids]
    params = SamplingParams(max_new_tokens=20, stop=["d, ag"])
    st, full = _run(params, seq, tokenizer)
    assert st.text == "Hello worl" and full[-1].finish_reason == "stop"
    for cut in range(1, len(full)):
        _, rest = _resumed(params, seq, ids[:cut], tokenizer)
        assert "".join(e.text for e in rest) == "".join(e.text for e in full[cut:]), cut
        assert rest[-1].finish_reason == "stop"


def test_resume_refuses_tokens_that_end_the_request():
    with pytest.raises(ValueError, match="resumed token 2 of 3 already ends the request"):
        SequenceState([1], SamplingParams(max_new_tokens=5, stop_token_ids=[2]), vocab_size=8).resume([4, 2, 4])
    with pytest.raises(ValueError, match="nothing is left to generate"):
        SequenceState([1], SamplingParams(max_new_tokens=2), vocab_size=8).resume([4, 5])


def test_top_ids_without_a_full_sort():
    from internlm_core.generation import top_ids

    v = np.array([0.1, 3.0, -1.0, 3.0, 2.5, 0.0])
    assert top_ids(v, 3).tolist() == [1, 3, 4]  # ties: the lower index first
    assert top_ids(v, 10).tolist() == [1, 3, 4, 0, 5, 2]
    with pytest.raises(ValueError, match="top_logprobs"):
        SamplingParams(top_logprobs=21).validate()


def _texts(tokenizer, params, ids, max_len=None):
    """Each event's text, the finish reason and the state, with the model choosing exactly ``ids``."""
    st = SequenceState([1, 5], params, tokenizer, vocab_size=tokenizer.vocab_size)
    events = []
    for i in ids:
        events.append(st.step(onehot(i, tokenizer.vocab_size), max_len))
        if events[-1].finish_reason:
            break
    assert "".join(e.text for e in events) == st.text
    return [e.text for e in events], events[-1].finish_reason, st


def test_a_length_limit_or_stop_id_inside_a_character_ends_in_one_u_fffd_per_byte(tokenizer):
    """The bytes of a character cut short are held back while they may still complete it, then
    released with the last event as one U+FFFD each: the text is the one-shot decode of the
    generated ids (minus a final stop id, whose own text is never part of the text)."""
    hello, smile = tokenizer.encode("Hello", bos=False), byte_pieces(tokenizer, "😀")
    ids = hello + smile[:3]
    for params, max_len in [(SamplingParams(max_new_tokens=4), None),  # max_new_tokens
                            (SamplingParams(max_new_tokens=50), 2 + 4)]:  # the end of the cache (prompt of 2)
        texts, reason, st = _texts(tokenizer, params, ids + smile[3:], max_len)
        assert (texts, reason) == (["Hello", "", "", "\ufffd" * 3], "length")
        assert st.text == tokenizer.decode(st.generated, skip_special=True)
    texts, reason, st = _texts(tokenizer, SamplingParams(max_new_tokens=50), hello + smile[:2] + [EOS] + smile[2:])
    assert (texts, reason, st.text) == (["Hello", "", "", "\ufffd" * 2], "eos", "Hello\ufffd\ufffd")
    # a stop id that is itself a byte piece: the character is cut before it
    texts, reason, st = _texts(tokenizer, SamplingParams(max_new_tokens=50, stop_token_ids=[smile[2]]), ids)
    assert (texts, reason, st.generated) == (["Hello", "", "", "\ufffd" * 2], "eos", ids)


def test_lone_byte_pieces_come_out_with_the_next_text(tokenizer):
    """A byte piece that can never form a character is U+FFFD, released with the next token's text
    (as soon as it is known not to start a character); a character in bytes comes out whole."""
    hello, world, smile = tokenizer.encode("Hello", bos=False), tokenizer.encode(" world", bos=False), \
        byte_pieces(tokenizer, "😀")
    ids = smile[-1:] + hello + byte_pieces(tokenizer, "☃") + smile[:1] + world
    texts, reason, st = _texts(tokenizer, SamplingParams(max_new_tokens=len(ids)), ids)
    assert texts == ["", "\ufffdHello", "", "", "☃", "", "\ufffd world"] and reason == "length"
    assert st.text == tokenizer.decode(ids) == "\ufffdHello☃\ufffd world"


@pytest.mark.parametrize("stop, texts, reason", [
    ("☃", ["Hello", "", "", ""], "stop"),  # the stop string is the character in bytes
    ("o☃", ["Hell", "", "", ""], "stop"),  # it ends with it ("o" held while it may begin it)
    (" w", ["Hello", "", "", "☃", ""], "stop"),  # it follows it
    ("☃!", ["Hello", "", "", "", "☃ world"], "length"),  # it begins with it and never completes
])
def test_stop_strings_next_to_a_character_in_bytes(tokenizer, stop, texts, reason):
    ids = tokenizer.encode("Hello", bos=False) + byte_pieces(tokenizer, "☃") + tokenizer.encode(" world", bos=False)
    assert _texts(tokenizer, SamplingParams(max_new_tokens=len(ids), stop=[stop]), ids)[:2] == (texts, reason)


def test_broken_bytes_before_a_stop_string_are_released_as_u_fffd(tokenizer):
    ids = tokenizer.encode("Hello", bos=False) + byte_pieces(tokenizer, "😀")[:2] + \
        tokenizer.encode(" world", bos=False)
    texts, reason, st = _texts(tokenizer, SamplingParams(max_new_tokens=10, stop=[" w"]), ids)
    assert (texts, reason) == (["Hello", "", "", "\ufffd\ufffd"], "stop")


@pytest.mark.parametrize("change, message", [
    ({"repetition_penalty": 1e-300}, r"repetition_penalty must be in \[0.01, 100\]"),
    ({"repetition_penalty": 1e6}, r"repetition_penalty must be in \[0.01, 100\]"),
    ({"frequency_penalty": -1e308}, r"frequency_penalty must be in \[-2, 2\]"),
    ({"presence_penalty": 2.5}, r"presence_penalty must be in \[-2, 2\]"),
    ({"temperature": 2.5}, r"temperature must be in \[0, 2\]"),
    ({"stop": ["x"] * 17}, "stop takes at most 16 strings of 1..512 characters"),
    ({"stop": ["x" * 513]}, "stop takes at most 16 strings"),
    ({"stop": [""]}, "stop takes at most 16 strings"),
    ({"stop_token_ids": list(range(257))}, "stop_token_ids takes at most 256 ids"),
])
def test_every_number_has_a_range_that_keeps_the_arithmetic_finite(change, message):
    """Values that pass as finite but overflow float32 on the logits (the NaNs then fail the request
    at its first token, on a worker shared with others) are refused up front, with the range."""
    with pytest.raises(ValueError, match=message):
        SamplingParams(**change).validate()
    for name, (low, high) in g.RANGES.items():  # the ends themselves are allowed
        SamplingParams(**{name: low}).validate()
        SamplingParams(**{name: high}).validate()


def test_a_tiny_temperature_is_greedy():
    """OpenAI accepts any temperature >= 0; below ``GREEDY_BELOW`` dividing by it overflows, so it
    is greedy (1e-40 would otherwise turn every logit into +-inf and fail at prefill)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 5, 1000).astype(np.float32)
    for t in (1e-40, 1e-6, 0.0):
        state = SequenceState([1], SamplingParams(max_new_tokens=3, temperature=t, seed=1), None, 1000)
        assert state.step(logits).token_id == int(np.argmax(logits)), t


def test_ids_past_the_tokenizer_are_never_picked():
    """A model's embedding padded past its tokenizer (an InternLM3-sized 128512 over a 92544-piece
    tokenizer): the pad ids decode to nothing, so greedy and sampling pick among the tokenizer's
    pieces, and the logprobs are the text's distribution."""
    from internlm_core.tokenizer import Tokenizer
    from tests.helpers import V2_TOKENIZER

    tok = Tokenizer(V2_TOKENIZER / "tokenizer.model")
    logits = np.full(tok.vocab_size + 512, -5.0, np.float32)
    logits[tok.vocab_size + 7] = 50.0  # a pad id the model favours
    logits[1000] = 1.0
    greedy = SequenceState([1], SamplingParams(max_new_tokens=4, logprobs=True), tok, len(logits))
    event = greedy.step(logits)
    assert event.token_id == 1000 and event.logprob == pytest.approx(
        float(g.log_softmax(logits[:tok.vocab_size].astype(np.float64))[1000]))
    sampled = SequenceState([1], SamplingParams(max_new_tokens=64, temperature=1.0, seed=0), tok, len(logits))
    assert all(sampled.step(logits).token_id < tok.vocab_size for _ in range(32))
