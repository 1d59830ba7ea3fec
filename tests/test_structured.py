"""Structured output in the core: the sentencepiece vocabulary as llguidance sees it, answers that
match their grammar at temperature 1 over random logits (any model's), the end as a stop token,
resume, refusals with the problem named, bounded work for hostile grammars, and one request's
grammar failure ending it alone in the batcher."""
from __future__ import annotations

import json
import re
import threading
import time

import numpy as np
import pytest

from internlm_core.errors import GrammarError
from internlm_core.generation import FINISH_EOS, SamplingParams, SequenceState
from internlm_core import structured
from internlm_core.structured import MAX_GRAMMAR_CHARS, Constraint, Grammar, compile_grammar, token_bytes
from internlm_core.tokenizer import EOS, Tokenizer
from tests.helpers import V2_TOKENIZER

jsonschema = pytest.importorskip("jsonschema")

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "colour", "ok"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "colour": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3}}}


@pytest.fixture(scope="module")
def v2_tokenizer():
    return Tokenizer(V2_TOKENIZER)


def answer(tok, grammar: Grammar, seed: int, temperature: float = 1.0, max_new_tokens: int = 200, **kw):
    """Sample an answer from random logits (a model that knows nothing) under ``grammar``."""
    params = SamplingParams(temperature=temperature, seed=seed, max_new_tokens=max_new_tokens, grammar=grammar, **kw)
    state = SequenceState([1], params, tok, tok.vocab_size)
    rng = np.random.default_rng(seed)
    while state.finish_reason is None:
        state.step(rng.normal(0, 3, tok.vocab_size).astype(np.float32))
    return state


@pytest.mark.parametrize("which", ["v1", "v2"])
def test_token_bytes_spell_what_decoding_writes(which, tokenizer, v2_tokenizer):
    tok = tokenizer if which == "v1" else v2_tokenizer
    tokens, special = token_bytes(tok)
    assert len(tokens) == tok.vocab_size
    text = ' {"name": "Zoë",\n\t"城市": "北京"} 🙂 x  y'  # spaces, non-ASCII, an emoji in byte pieces
    ids = tok.encode(text, bos=False)
    assert b"".join(tokens[i] for i in ids) == text.encode()
    assert {0, 1, 2} <= set(special) and set(special).isdisjoint(ids)
    assert set(tok.stop_ids) <= set(special)  # </s> and <eoa> / <|im_end|> are never text
    if which == "v2":
        assert tokens[92352] == "Ｅ".encode()  # a one-character user-defined piece is text


@pytest.mark.parametrize("which", ["v1", "v2"])
def test_json_schema_answers_validate_at_temperature_one(which, tokenizer, v2_tokenizer):
    tok = tokenizer if which == "v1" else v2_tokenizer
    grammar = Grammar("json_schema", json.dumps(SCHEMA))
    for seed in range(25):
        state = answer(tok, grammar, seed)
        assert state.finish_reason == FINISH_EOS and state.generated[-1] in tok.stop_ids
        jsonschema.validate(json.loads(state.text), SCHEMA)
        assert state.text == tok.decode(state.generated[:-1])


def test_choice_regex_lark_and_json_object(tokenizer):
    for seed in range(10):
        assert answer(tokenizer, Grammar("choice", choices=("yes", "no", "日本")), seed).text in ("yes", "no", "日本")
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", answer(tokenizer, Grammar("regex", "[0-9]{3}-[a-z]{2,4}"), seed).text)
        lark = 'start: "(" num ("+" num)* ")"\nnum: /[0-9]{1,3}/'
        assert re.fullmatch(r"\(\d{1,3}(\+\d{1,3})*\)", answer(tokenizer, Grammar("lark", lark), seed).text)
    # any object: free keys and strings run long over random logits, so greedy and a bound
    state = answer(tokenizer, Grammar("json_object"), 0, max_new_tokens=64)
    assert state.text.startswith("{")
    if state.finish_reason == FINISH_EOS:
        assert isinstance(json.loads(state.text), dict)


def test_the_end_is_a_stop_token_and_only_there(tokenizer):
    state = SequenceState([1], SamplingParams(grammar=Grammar("choice", choices=("ab",))), tokenizer, tokenizer.vocab_size)
    logits = np.zeros(tokenizer.vocab_size, np.float32)
    logits[EOS] = 100.0  # the model wants to stop at once: it may not before the answer is complete
    assert state.step(logits).token_id != EOS
    while state.finish_reason is None:
        logits = np.zeros(tokenizer.vocab_size, np.float32)
        logits[tokenizer.encode("x", bos=False)] = 100.0  # and wants more afterwards: only stops remain
        ev = state.step(logits)
    assert state.text == "ab" and ev.token_id in tokenizer.stop_ids and state.finish_reason == FINISH_EOS


def test_resume_advances_the_grammar(tokenizer):
    grammar = Grammar("json_schema", json.dumps(SCHEMA))
    whole = answer(tokenizer, grammar, 3)
    resumed = SequenceState([1], SamplingParams(temperature=1.0, seed=3, max_new_tokens=200, grammar=grammar),
                            tokenizer, tokenizer.vocab_size)
    resumed.resume(whole.generated[:5])
    rng = np.random.default_rng(3)
    for _ in range(5):
        rng.normal(0, 3, tokenizer.vocab_size)
    while resumed.finish_reason is None:
        resumed.step(rng.normal(0, 3, tokenizer.vocab_size).astype(np.float32))
    assert resumed.generated == whole.generated and resumed.text == whole.text
    bad = SequenceState([1], SamplingParams(grammar=grammar), tokenizer, tokenizer.vocab_size)
    with pytest.raises(GrammarError, match="token"):
        bad.resume(tokenizer.encode("hello", bos=False))


def test_masks_computed_ahead_give_the_answers_of_masks_computed_when_needed(tokenizer, monkeypatch):
    """Each step starts the next token's mask on the mask thread while the caller goes on (here:
    drawing the next logits, as a model's step would); the answers are those of masks computed
    on the spot, the grammar's state then."""
    grammars = [Grammar("json_schema", json.dumps(SCHEMA)), Grammar("regex", "(ab|cd|xyz )+!")]
    ahead = [answer(tokenizer, g, seed).generated for g in grammars for seed in range(3)]
    monkeypatch.setattr(Constraint, "prefetch", lambda self: None)
    assert [answer(tokenizer, g, seed).generated for g in grammars for seed in range(3)] == ahead


def test_a_mask_computed_ahead_is_never_used_once_the_grammar_moved_on(tokenizer):
    """``advance`` without the mask computed ahead being taken (as ``resume`` does): the mask then
    used is the grammar's new state's, whether the old one was still queued, being computed or
    done (after "a" only "b..." may follow, after "ab" "a..." or "c...": a stale mask differs)."""
    vocab, a, b = tokenizer.vocab_size, tokenizer.encode("a", bos=False)[0], tokenizer.encode("b", bos=False)[0]
    grammar, stops = Grammar("regex", "(ab)*c"), sorted(tokenizer.stop_ids)
    TEXT = slice(3, 1000)  # text pieces (past <unk> <s> </s>), "a", "b", "c" and "ab" among them

    def asked(tokens):  # the text tokens llguidance allows after ``tokens``, asked of it directly
        m = compile_grammar(grammar, tokenizer, stops).matcher
        for t in tokens:
            m.consume_token(t)
        return np.flatnonzero(np.unpackbits(np.frombuffer(m.compute_bitmask(), np.uint8), bitorder="little")[TEXT])

    def used(c):  # the text tokens the constraint allows next
        return np.flatnonzero(c.allowed(vocab)[TEXT])

    c = compile_grammar(grammar, tokenizer, stops)
    gate = threading.Event()
    busy = structured._MASK_THREAD.submit(gate.wait, 60)  # the mask thread busy: the next mask waits in line
    try:
        c.prefetch()
        c.advance(a)
    finally:
        gate.set()  # (whatever happens, the mask thread goes on for the other tests)
    busy.result()
    np.testing.assert_array_equal(used(c), asked([a]))
    assert b - 3 in asked([a]) and not np.array_equal(asked([a]), asked([a, b]))
    tokens = [a]
    for i, t in enumerate([b, a] * 150):  # started, then the grammar moves on: queued, running or done
        c.prefetch()
        time.sleep(i % 5 * 2e-5)
        c.advance(t)
        tokens.append(t)
    np.testing.assert_array_equal(used(c), asked(tokens))


@pytest.mark.parametrize("grammar, message", [
    (Grammar("json_schema", '{"type": "strin"}'), "Invalid type"),
    (Grammar("json_schema", "{not json"), "not valid JSON"),
    (Grammar("json_schema", '{"type": "string", "format": "hostnamex"}'), "hostnamex"),
    (Grammar("json_schema", "[" * 200 + "]" * 200), "a schema is a JSON object"),
    (Grammar("json_schema", json.dumps({"type": "object", "properties": {
        f"p{i}": {"type": "string", "pattern": "[a-z]{3,9}"} for i in range(1000)}})), str(MAX_GRAMMAR_CHARS)),
    (Grammar("regex", "a(b"), "regex"),
    (Grammar("lark", "start: foo"), "foo"),
    (Grammar("choice"), "choice"),
    (Grammar("yaml", "a: 1"), "kind"),
])
def test_grammars_that_cannot_be_followed_are_refused_naming_why(tokenizer, grammar, message):
    with pytest.raises(GrammarError, match=re.escape(message)):
        SequenceState([1], SamplingParams(grammar=grammar), tokenizer, tokenizer.vocab_size)


def test_deep_schema_and_conflicting_parameters(tokenizer):
    deep = {"type": "string"}
    for _ in range(600):
        deep = {"type": "array", "items": deep}
    with pytest.raises(GrammarError, match="recursion"):
        SequenceState([1], SamplingParams(grammar=Grammar("json_schema", json.dumps(deep))), tokenizer, 10)
    for kw in ({"ignore_eos": True}, {"min_new_tokens": 2}, {"stop_token_ids": ()}):
        with pytest.raises(ValueError, match="grammar"):
            SequenceState([1], SamplingParams(grammar=Grammar("json_object"), **kw), tokenizer, tokenizer.vocab_size)


def test_a_grammar_past_the_engines_limits_fails_within_a_bound(tokenizer):
    """a{1000}{1000} asks llguidance for a million-state lexer: it is stopped by its fuel limits,
    at the first token, in well under a second's work."""
    t = time.monotonic()
    with pytest.raises(GrammarError, match="regex"):
        answer(tokenizer, Grammar("regex", "a{1000}{1000}"), 0)
    assert time.monotonic() - t < 5
    # a regex catastrophic for a backtracking engine is nothing to llguidance's lazy automaton
    assert re.fullmatch(r"(x+x+)+y", answer(tokenizer, Grammar("regex", "(x+x+)+y"), 0).text)


def test_one_requests_grammar_failure_ends_it_alone(chat_model_dir, tokenizer):
    from internlm_core.batching import Batcher
    from internlm_core.engine import Engine
    from internlm_core.loader import load_model

    engine = Engine(load_model(chat_model_dir), max_batch=2, max_len=256)
    batcher = Batcher(engine, tokenizer).start()
    try:
        prompt = tokenizer.encode("The history of")
        alone = batcher.submit(prompt, SamplingParams(max_new_tokens=12, ignore_eos=True)).result().token_ids
        other = batcher.submit(prompt, SamplingParams(max_new_tokens=12, ignore_eos=True))
        failing = batcher.submit(prompt, SamplingParams(grammar=Grammar("regex", "a{1000}{1000}")))
        with pytest.raises(GrammarError):
            failing.result()
        assert other.result().token_ids == alone
        good = batcher.submit(prompt, SamplingParams(max_new_tokens=200, temperature=1.0, seed=0,
                                                     grammar=Grammar("json_schema", json.dumps(SCHEMA)))).result()
        jsonschema.validate(json.loads(good.text), SCHEMA)
    finally:
        batcher.stop(drain=False, timeout=30)


def test_requests_cancelled_or_ended_leave_no_mask_to_the_others(chat_model_dir, tokenizer):
    """Batched requests each follow their own grammar's masks, computed ahead: answers in a crowd
    where others are cancelled or end (their next masks under way) are the answers alone."""
    from internlm_core.batching import Batcher
    from internlm_core.engine import Engine
    from internlm_core.loader import load_model

    engine = Engine(load_model(chat_model_dir), max_batch=4, max_len=256)
    batcher = Batcher(engine, tokenizer).start()
    prompt = tokenizer.encode("The history of")
    schema = Grammar("json_schema", json.dumps(SCHEMA))
    params = [SamplingParams(max_new_tokens=60, grammar=schema),
              SamplingParams(max_new_tokens=60, grammar=Grammar("regex", "(ab|cd|xyz )+!"))]
    try:
        alone = [batcher.submit(prompt, p).result() for p in params]
        assert all(r.token_ids for r in alone)
        cancelled = batcher.submit(prompt, SamplingParams(max_new_tokens=60, temperature=1.0, seed=0, grammar=schema))
        short = batcher.submit(prompt, SamplingParams(max_new_tokens=2, grammar=schema))
        crowd = [batcher.submit(prompt, p) for p in params]
        next(iter(cancelled))
        cancelled.cancel()
        assert short.result().finish_reason == "length"
        late = batcher.submit(prompt, params[0])  # into a slot another constrained request left
        assert [h.result().token_ids for h in crowd + [late]] == [r.token_ids for r in alone + alone[:1]]
        assert cancelled.result().finish_reason == "aborted"
    finally:
        batcher.stop(drain=False, timeout=30)
