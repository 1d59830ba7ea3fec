"""Structured output: a grammar the answer must match, enforced token by token.

A request's ``Grammar`` (a JSON Schema, any JSON object, a regular expression, a list of choices
or a Lark grammar) is compiled by llguidance (the grammar engine of llama.cpp, vLLM and SGLang)
into a ``Constraint``. Before every sampled token it says which tokens may come next and the
sampler drops the others, so the text matches by construction at any temperature; once the
grammar is complete only the request's stop tokens remain, so the answer ends there.

llguidance sees tokens as bytes. ``token_bytes`` spells each sentencepiece piece as the bytes the
project's decoding writes for it (``▁`` as a space, a byte-fallback piece ``<0xNN>`` as that
byte; these tokenizers add no dummy prefix, so a token's bytes are the same anywhere in a text)
and marks control pieces special, so that no grammar can spell them out.

Bounds, so that a grammar never hangs a worker: the grammar's text is at most
``MAX_GRAMMAR_CHARS``; llguidance's own fuel limits (``LIMITS``) bound the work of compiling it and
of each token's mask. A grammar that exceeds them is refused when the request is submitted (a
``GrammarError``, i.e. INVALID_ARGUMENT / HTTP 400, naming the problem), or, where a limit is only
met later in the answer, ends that request alone with the error.
"""
from __future__ import annotations

import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Sequence

import llguidance
import numpy as np
from sentencepiece import sentencepiece_model_pb2

from .errors import GrammarError

GRAMMAR_KINDS = ("json_schema", "json_object", "regex", "choice", "lark")
MAX_GRAMMAR_CHARS = 32_768  # a schema or grammar's text, or all choices together (OpenAI caps a schema's size too)
MAX_CHOICES = 256
# llguidance's limits, lower than its defaults where those allow hundreds of MB or ~1 s of work.
# Fuel is llguidance's unit of lexer work (about 50k per ms to build, 14k per ms in a step).
LIMITS = dict(initial_lexer_fuel=200_000, step_lexer_fuel=200_000, step_max_items=50_000,
              max_lexer_states=20_000, max_grammar_size=200_000, verbose_errors=False)
# JSON is written with fixed separators and no other whitespace: bounded schemas then give bounded
# answers (free whitespace lets a sampled answer pad itself until its length runs out).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_PIECE = sentencepiece_model_pb2.ModelProto.SentencePiece
_TEXT_TYPES = (_PIECE.NORMAL, _PIECE.BYTE, _PIECE.USER_DEFINED)


@dataclass(frozen=True)
class Grammar:
    """What an answer must match. ``text``: the JSON Schema (as JSON text), the regular expression
    (Rust ``regex`` syntax, matched against the whole answer) or the Lark grammar; unused for
    ``json_object`` and ``choice``, whose answers are any JSON object and one of ``choices``."""
    kind: str
    text: str = ""
    choices: tuple[str, ...] = ()

    def validate(self) -> "Grammar":
        if self.kind not in GRAMMAR_KINDS:
            raise GrammarError(f"grammar kind must be one of {', '.join(GRAMMAR_KINDS)}, got {self.kind!r}")
        if self.kind == "choice":
            if not 0 < len(self.choices) <= MAX_CHOICES or not all(self.choices):
                raise GrammarError(f"choice takes 1..{MAX_CHOICES} non-empty strings")
            size = sum(len(c) for c in self.choices)
        else:
            if self.kind != "json_object" and not self.text:
                raise GrammarError(f"{self.kind}: empty")
            size = len(self.text)
        if size > MAX_GRAMMAR_CHARS:
            raise GrammarError(f"{self.kind}: {size} characters, more than the {MAX_GRAMMAR_CHARS} allowed")
        if self.kind == "json_schema":  # checked here too, so that a bad schema fails before a model loads
            try:
                schema = json.loads(self.text)
            except json.JSONDecodeError as e:
                raise GrammarError(f"json_schema: not valid JSON ({e})") from None
            if not isinstance(schema, (dict, bool)):
                raise GrammarError("json_schema: a schema is a JSON object")
        return self

    def llguidance(self) -> str:
        """The grammar in llguidance's terms (not yet checked: ``compile_grammar`` does that)."""
        try:
            return self._llguidance()
        except ValueError as e:  # e.g. a schema nested deeper than llguidance's JSON reader takes
            raise GrammarError(f"{self.kind}: {e}") from None

    def _llguidance(self) -> str:
        if self.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
        if self.kind == "json_schema":  # (valid JSON: ``validate``)
            return llguidance.LLMatcher.grammar_from_json_schema(self.text, overrides=JSON_OPTIONS)
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.text)
        if self.kind == "choice":  # a Lark rule of string literals (JSON's string syntax is Lark's)
            return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in self.choices))
        return llguidance.LLMatcher.grammar_from_lark(self.text)


def token_bytes(tokenizer) -> tuple[list[bytes], list[int]]:
    """Each token id's bytes as the tokenizer's decoding writes them, and the special ids.

    Special: control pieces (``<s>``, ``</s>``), ``<unk>``, unused pieces, the ids the checkpoint's
    files name (InternLM2's ``<|im_end|>``) and multi-character user-defined pieces (InternLM's
    ``<eoa>`` and placeholder pieces, written as names, never spelled by text); single-character
    user-defined pieces (InternLM2's full-width letters) are text."""
    proto = sentencepiece_model_pb2.ModelProto.FromString(tokenizer.sp.serialized_model_proto())
    tokens, special = [], []
    for i, p in enumerate(proto.pieces):
        if (p.type not in _TEXT_TYPES or i in tokenizer.added_tokens
                or (p.type == _PIECE.USER_DEFINED and len(p.piece) > 1)):
            special.append(i)
            tokens.append(b"\xff" + p.piece.encode())  # llguidance's mark of a special token
        elif p.type == _PIECE.BYTE:  # <0xNN>
            tokens.append(bytes([int(p.piece[3:-1], 16)]))
        else:
            tokens.append(p.piece.replace("\u2581", " ").encode())
    return tokens, special


class _SentencePieceVocab:
    """What ``llguidance.TokenizerWrapper`` reads: the tokens' bytes, eos/bos and an encoder."""

    def __init__(self, tokenizer):
        self.tokens, self.special_token_ids = token_bytes(tokenizer)
        self.eos_token_id, self.bos_token_id = tokenizer.stop_ids[0], 1
        self._sp = tokenizer.sp

    def __call__(self, text: str) -> list[int]:  # text only: llguidance handles other bytes itself
        return self._sp.encode(text)


_lltokenizers: dict[int, tuple[object, llguidance.LLTokenizer]] = {}
_lock = threading.Lock()


def lltokenizer(tokenizer) -> llguidance.LLTokenizer:
    """llguidance's view of ``tokenizer``, built once per tokenizer (~1 s for 100k pieces)."""
    with _lock:
        hit = _lltokenizers.get(id(tokenizer))
        if hit is None or hit[0] is not tokenizer:
            wrapped = llguidance.TokenizerWrapper(_SentencePieceVocab(tokenizer))
            hit = (tokenizer, llguidance.LLTokenizer(wrapped, eos_token=list(tokenizer.stop_ids)))
            _lltokenizers[id(tokenizer)] = hit
        return hit[1]


# The next token's masks are computed here, ahead of time (``Constraint.prefetch``): llguidance
# drops the GIL while it computes one (~0.3 ms on the 103k vocabulary), so a request's next mask is
# computed beside the batcher thread's sampling of the other rows and the model's next step, instead
# of on the batcher thread between them. One thread: sampling keeps one core busy, the other is free
# between the model's steps; and masks come out in the order they are needed.
_MASK_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-mask")


class Constraint:
    """One request's grammar state: ``mask`` its logits before sampling, ``advance`` with each
    token sampled (a stop token ends the request instead: it is allowed only where the grammar
    may end, and once the grammar is complete it is all that is allowed); ``prefetch`` after
    ``advance`` starts the next mask while the model computes the next logits.

    The mask computed ahead always belongs to the matcher's current state: it is started only by
    ``prefetch`` (or ``prepare``), and anything that moves the matcher (``advance``) first waits
    for the mask thread to be done with it, then drops that mask."""

    def __init__(self, matcher: llguidance.LLMatcher, kind: str, stop_ids: Sequence[int], eos_ids: Sequence[int]):
        self.matcher, self.kind = matcher, kind
        self.stop_ids = np.array(sorted(stop_ids), np.int64)
        self.eos_ids = np.array(sorted(eos_ids), np.int64)  # llguidance's end tokens (the family's stops)
        self._next: Future | None = None  # the next token's mask: computed, or being computed (``prefetch``)

    def prepare(self) -> "Constraint":
        """Compute the first token's mask now, on the submitting thread: most grammars that exceed a
        limit do so here, so they are refused with the request instead of failing in the batch."""
        self._next = Future()
        self._next.set_result(self._compute("the first token's mask"))
        return self

    def prefetch(self) -> None:
        """Start computing the next token's mask on the mask thread (a no-op if it is under way)."""
        if self._next is None:
            self._next = _MASK_THREAD.submit(self._compute, "the next token's mask")

    def _compute(self, doing: str) -> tuple[np.ndarray, bool]:
        """llguidance's mask for the next token, one bool per token of its vocabulary (a multiple
        of 32 long), and whether the grammar may end here."""
        bits = self.matcher.compute_bitmask()
        self._check(doing)
        return np.unpackbits(np.frombuffer(bits, np.uint8), bitorder="little").view(bool), self.matcher.is_accepting()

    def _take(self) -> tuple[np.ndarray, bool]:
        """The next token's mask: the one computed ahead (waiting for it if need be), else now."""
        pending, self._next = self._next, None
        return pending.result() if pending is not None else self._compute("the next token's mask")

    def allowed(self, vocab_size: int) -> np.ndarray:
        """Which of ``vocab_size`` token ids may come next (bool)."""
        bits, accepting = self._take()
        allowed = bits[:vocab_size]  # (its own array: each mask is unpacked afresh)
        if len(allowed) < vocab_size:  # ids past the tokenizer's pieces: never text
            allowed = np.concatenate([allowed, np.zeros(vocab_size - len(allowed), bool)])
        # The end is the request's stop tokens, whichever they are, and only where the grammar may end.
        allowed[self.eos_ids[self.eos_ids < vocab_size]] = False
        allowed[self.stop_ids[self.stop_ids < vocab_size]] = accepting
        return allowed

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """``logits`` with every token the grammar forbids at -inf."""
        allowed = self.allowed(len(logits))
        if not allowed.any():
            raise GrammarError(f"{self.kind}: no token of the model's vocabulary can continue the answer")
        # (filling -inf and copying the allowed logits over costs at most np.where's time, and much
        # less when few tokens are allowed, as between a JSON answer's strings)
        out = np.full_like(logits, -np.inf)
        np.copyto(out, logits, where=allowed)
        return out

    def advance(self, token: int) -> None:
        """Feed the grammar a token of the answer (not a stop token: that ends the request)."""
        self._drop_next()
        self.matcher.consume_token(int(token))
        self._check(f"token {int(token)}")

    def _drop_next(self) -> None:
        """Forget the mask computed ahead: the matcher is about to move on. If the mask thread is
        still computing it, wait for it (llguidance's matcher is not to be used from two threads)."""
        pending, self._next = self._next, None
        if pending is not None and not pending.cancel():  # cancelled if not yet started
            wait([pending])

    def _check(self, doing: str) -> None:
        if self.matcher.is_error():
            raise GrammarError(f"{self.kind}: the grammar failed at {doing}: {_error(self.matcher)}")


def _error(matcher: llguidance.LLMatcher) -> str:
    # without verbose_errors (which would echo the grammar's internals) llguidance appends a marker
    return matcher.get_error().replace("<non-verbose/>", "").strip()


def compile_grammar(grammar: Grammar, tokenizer, stop_ids: Sequence[int]) -> Constraint:
    """A fresh ``Constraint`` for one request; ``GrammarError`` naming the problem when the
    grammar is invalid, unsupported or beyond the limits."""
    if tokenizer is None:
        raise GrammarError("a grammar needs the model's tokenizer")
    if not stop_ids:
        raise GrammarError("a grammar needs a stop token to end the answer (stop_token_ids is empty)")
    grammar.validate()
    lltok = lltokenizer(tokenizer)
    matcher = llguidance.LLMatcher(lltok, grammar.llguidance(), log_level=0,
                                   limits=llguidance.LLParserLimits(**LIMITS))
    if matcher.is_error():
        raise GrammarError(f"{grammar.kind}: {_error(matcher)}")
    return Constraint(matcher, grammar.kind, stop_ids, lltok.eos_tokens).prepare()
