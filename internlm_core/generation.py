"""Sampling as small pure functions on numpy logits, and generation as a generator.

``SequenceState`` is one sequence's decoding state (penalties, sampling RNG, detokenisation,
stop handling). ``generate`` drives one through an ``Engine``; ``generate_batch`` drives
several at once; the continuous batcher (``batching.py``) drives many that come and go.
"""
from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from .structured import Grammar, compile_grammar
from .tokenizer import CHAT_STOP_IDS

FINISH_LENGTH, FINISH_EOS, FINISH_STOP, FINISH_ABORTED = "length", "eos", "stop", "aborted"


# ---- logits processing: each takes and returns float logits (V,) --------------------------

def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """HF/CTRL rule: for tokens already seen, divide positive logits and multiply negative ones."""
    if penalty == 1.0 or len(seen) == 0:
        return logits
    out = logits.copy()
    s = out[seen]
    out[seen] = np.where(s > 0, s / penalty, s * penalty)
    return out


def apply_presence_frequency(logits: np.ndarray, counts: np.ndarray, presence: float,
                             frequency: float) -> np.ndarray:
    """OpenAI rule: subtract presence once per seen token and frequency per occurrence."""
    if presence == 0.0 and frequency == 0.0:
        return logits
    return logits - presence * (counts > 0) - frequency * counts


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    return logits / temperature if temperature not in (0.0, 1.0) else logits


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits (ties at the k-th value kept too); k <= 0 disables."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits < kth, -np.inf, logits)


def top_p_filter(logits: np.ndarray, p: float, candidates: int = 1024) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probability reaches p (always >= 1 token).

    Sorts only the ``candidates`` most likely tokens (every token tied with the last of them
    included), widening the set in the rare case that their mass stays below p: the same tokens
    as a full sort of the vocabulary (measured 2.0 ms instead of 8.3 ms for 103k logits)."""
    if p >= 1.0:
        return logits
    z = np.exp((logits - logits.max()).astype(np.float64))  # float64: the cut does not hinge on rounding
    total = z.sum()
    k = min(candidates, logits.shape[-1])
    while True:
        kth = np.partition(logits, -k)[-k]
        cand = np.flatnonzero(logits >= kth)  # ascending ids: a stable sort keeps id order among ties
        order = cand[np.argsort(-logits[cand], kind="stable")]
        probs = z[order] / total
        before = np.cumsum(probs) - probs  # mass of strictly more likely tokens
        if len(cand) == logits.shape[-1] or before[-1] + probs[-1] >= p:
            out = np.full_like(logits, -np.inf)
            keep = order[before < p]
            out[keep] = logits[keep]
            return out
        k = min(8 * k, logits.shape[-1])


def min_p_filter(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Drop tokens whose probability is below min_p times the top token's."""
    if min_p <= 0.0:
        return logits
    probs = softmax(logits)
    return np.where(probs < min_p * probs.max(), -np.inf, logits)


def sampling_filters(logits: np.ndarray, params: "SamplingParams") -> np.ndarray:
    """What a sampled step draws from, after penalties and masks: temperature, top-k, top-p, min-p."""
    logits = apply_temperature(logits, params.temperature)
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    return min_p_filter(logits, params.min_p)


def processed_probs(logits: np.ndarray, params: "SamplingParams", seen: np.ndarray, counts: np.ndarray,
                    masked: Sequence[int] = (), constraint=None) -> np.ndarray:
    """The distribution (float64, (V,)) a sampled step draws its token from: penalties for the
    tokens ``seen`` (prompt and generated) and ``counts`` (generated), ``masked`` ids at -inf, a
    grammar's mask (``constraint``), then ``sampling_filters``. ``SequenceState.probs`` and a
    draft's proposals (``speculative.DraftSampler``) both go through here, so the target's p and
    the draft's q cannot be processed differently."""
    logits = penalized(logits, params, seen, counts, masked)
    if constraint is not None:
        logits = constraint.mask(logits)
    return softmax(sampling_filters(logits, params).astype(np.float64))


def penalized(logits: np.ndarray, params: "SamplingParams", seen: np.ndarray, counts: np.ndarray,
              masked: Sequence[int] = ()) -> np.ndarray:
    """``logits`` with the repetition, presence and frequency penalties applied and ``masked`` ids at -inf."""
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    logits = apply_presence_frequency(logits, counts, params.presence_penalty, params.frequency_penalty)
    if len(masked):
        logits = logits.copy()
        logits[[i for i in masked if i < len(logits)]] = -np.inf
    return logits


def count_token(token: int, params: "SamplingParams", seen: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Count a generated token for the penalties: ``counts`` in place; the new ``seen``."""
    counts[token] += 1
    return np.union1d(seen, [token]) if params.repetition_penalty != 1.0 else seen  # only that penalty reads it


def draw(probs: np.ndarray, u: float) -> int:
    """The token whose slice of ``probs``' running sum holds the uniform ``u`` (inverse CDF)."""
    cdf = np.cumsum(probs)
    return int(min(np.searchsorted(cdf, u * cdf[-1], side="right"), len(probs) - 1))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max())
    return z / z.sum()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max()
    return z - np.log(np.exp(z).sum())


def top_ids(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, largest first (ties: the lower index), without a full sort."""
    k = min(k, len(values))
    part = np.argpartition(-values, k - 1)[:k]
    return part[np.lexsort((part, -values[part]))]


def sample(logits: np.ndarray, rng: np.random.Generator) -> int:
    """Draw one token from softmax(logits) with an explicit generator (seeded => repeatable).

    That is ``rng.choice(len(p), p=p)``, which finds one uniform draw in p's running sum. When
    most logits are -inf (a grammar's mask, top-k/p) the same draw is made over the kept tokens
    only (``kept_probabilities``): the others add exact zeros to the running sum, so a generator
    gives the same token, in a fraction of the time (numpy's exp of -inf alone costs ~5x a
    number's, and choice's running sum goes over the whole row)."""
    x = logits.astype(np.float64)
    kept = x > -np.inf
    if np.count_nonzero(kept) < 0.75 * len(x):
        ids, p = kept_probabilities(x, kept)
        if len(p) and np.isfinite(p).all():  # (none kept, NaN or inf logits: choice says what is wrong)
            cdf = np.cumsum(p)
            cdf /= cdf[-1]
            return int(ids[np.searchsorted(cdf, rng.random(), side="right")])
    probs = softmax(x)
    return int(rng.choice(len(probs), p=probs / probs.sum()))


def kept_probabilities(x: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ids where ``kept`` (x > -inf) and their p of ``sample``, the same bits as computing p
    over the whole row: computed at the kept ids only, except numpy's two sums over the row (its
    pairwise sums group the values by their place in the row)."""
    ids = np.flatnonzero(kept)
    z = np.zeros_like(x)
    z[ids] = np.exp(x[ids] - x.max())
    z[ids] /= z.sum()  # softmax
    return ids, z[ids] / z.sum()


# ---- parameters ----------------------------------------------------------------------------

DRAFT_STREAM = 1  # tells ``SequenceState.draft_uniforms``' generators from the sequence's own
MAX_TOP_LOGPROBS = 20  # as OpenAI's API allows
_FLOAT_PARAMS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
# Each number's range, in one place: gRPC, HTTP and the CLI all validate through ``validate``.
# OpenAI's where it has one; the others keep float32 arithmetic on the logits finite (a logit of ~30
# divided by a repetition penalty of 1e-300 overflows to inf, and the NaNs that follow would fail
# the request at its first token).
RANGES = {"temperature": (0.0, 2.0), "repetition_penalty": (0.01, 100.0),
          "presence_penalty": (-2.0, 2.0), "frequency_penalty": (-2.0, 2.0)}
GREEDY_BELOW = 1e-5  # OpenAI accepts any temperature >= 0; dividing logits by a smaller one overflows
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 512  # OpenAI allows 4; every string is scanned after every token
MAX_STOP_TOKEN_IDS = 256
# The size of a request's prompt and names, the same over gRPC and HTTP, checked before any work on
# them (tokenizing, converting each id), so that an oversized request costs its worker nothing.
MAX_PROMPT_CHARS = 1_000_000  # a prompt's text (chat: all messages' contents)
MAX_PROMPT_IDS = 262_144      # a prompt given as token ids
MAX_NAME_CHARS = 256          # a model or adapter name (an unknown one is quoted back in the error)


def _param(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class SamplingParams:
    max_new_tokens: int = _param(128, "tokens to generate at most")
    min_new_tokens: int = _param(0, "tokens before a stop token may end the request")
    temperature: float = _param(0.0, "0 = greedy")
    top_k: int = _param(0, "sample from the k most likely tokens (0 = all)")
    top_p: float = _param(1.0, "sample from the smallest set reaching this probability")
    min_p: float = _param(0.0, "drop tokens below this times the top token's probability")
    repetition_penalty: float = _param(1.0, "HF's: seen tokens' logits divided (positive) or multiplied")
    presence_penalty: float = _param(0.0, "OpenAI's: subtracted once from every seen token's logit")
    frequency_penalty: float = _param(0.0, "OpenAI's: subtracted per occurrence of a token")
    seed: int | None = _param(None, "sampling seed (default: a fresh one, reported back)")
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] | None = None  # None => eos and <eoa>
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = _param(0, "also the k most likely tokens' log-probabilities (implies logprobs)")
    grammar: Grammar | None = None  # structured output: the answer must match it (structured.py)
    speculate: bool = True  # False: never verify proposed tokens for this request (speculative.py)

    def validate(self) -> "SamplingParams":
        def bad(msg):
            raise ValueError(msg)
        if self.max_new_tokens < 1:
            bad(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            bad(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        # NaN makes every comparison false, so it would slip through checks such as `<= 0` below
        # (a NaN penalty turns all logits NaN); infinities are no meaningful setting either.
        for name in _FLOAT_PARAMS:
            value = getattr(self, name)
            if not isinstance(value, (int, float, np.number)) or not np.isfinite(value):
                bad(f"{name} must be a finite number, got {value!r}")
        for name, (low, high) in RANGES.items():
            if not low <= getattr(self, name) <= high:
                bad(f"{name} must be in [{low:g}, {high:g}], got {getattr(self, name)!r}")
        if self.top_k < 0:
            bad(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            bad(f"min_p must be in [0, 1), got {self.min_p}")
        if len(self.stop) > MAX_STOP_STRINGS or any(not 0 < len(s) <= MAX_STOP_CHARS for s in self.stop):
            bad(f"stop takes at most {MAX_STOP_STRINGS} strings of 1..{MAX_STOP_CHARS} characters")
        if self.stop_token_ids is not None and len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            bad(f"stop_token_ids takes at most {MAX_STOP_TOKEN_IDS} ids, got {len(self.stop_token_ids)}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            bad(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        if self.grammar is not None:
            self.grammar.validate()
            if self.ignore_eos or self.min_new_tokens:  # each could forbid the end the grammar reaches
                bad("a grammar (structured output) cannot be combined with ignore_eos or min_new_tokens")
        return self

    def replace(self, **kw) -> "SamplingParams":
        return dataclasses.replace(self, **kw)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


# The number-valued parameters, as every outer form names them (protobuf fields, CLI flags):
# derived here so that a parameter added above reaches each of them.
SCALAR_PARAMS = tuple(f.name for f in dataclasses.fields(SamplingParams) if f.type in ("int", "float", "int | None"))


@dataclass
class TokenEvent:
    """One generated token; the last event of a sequence carries ``finish_reason``."""
    token_id: int
    text: str  # new final text (may be "" while a UTF-8 sequence or a possible stop string is held)
    logprob: float | None = None
    finish_reason: str | None = None
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, log-probability), most likely first


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    seed: int
    logprobs: list[float] | None = None


@dataclass
class SequenceState:
    """The decoding state of one sequence: feed it logits, it picks the next token."""
    prompt: list[int]
    params: SamplingParams
    tokenizer: object | None = None
    vocab_size: int = 0
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    def __post_init__(self):
        self.params.validate()
        self.seed = self.params.seed if self.params.seed is not None else secrets.randbits(63)
        if self.tokenizer is not None and self.vocab_size > self.tokenizer.vocab_size:
            # A model's embedding may be padded past its tokenizer's pieces: those ids are no text
            # (decoding one fails), so they are never picked, and the distribution is the text's.
            self.vocab_size = self.tokenizer.vocab_size
        self.rng = np.random.default_rng(self.seed)
        default = self.tokenizer.stop_ids if self.tokenizer is not None else CHAT_STOP_IDS  # the family's
        self.stop_ids = set(default if self.params.stop_token_ids is None else self.params.stop_token_ids)
        given = self.params.stop_token_ids or ()  # the defaults may lie past a small test vocabulary
        if self.vocab_size and any(not 0 <= t < self.vocab_size for t in given):
            raise ValueError(f"stop_token_ids must be token ids in 0..{self.vocab_size - 1}, got "
                             f"{sorted(t for t in given if not 0 <= t < self.vocab_size)[:3]}")
        # Compiled here, on the submitting thread: a grammar that cannot be followed is refused now.
        self.constraint = (compile_grammar(self.params.grammar, self.tokenizer, sorted(self.stop_ids))
                           if self.params.grammar is not None else None)
        self.counts = np.zeros(self.vocab_size, np.float32)
        self.seen = np.unique(np.asarray(self.prompt, np.int64))  # repetition penalty covers the prompt (HF)
        # Generated text leaves out <s>/</s>/<unk> (as HF pipelines do); the ids keep them.
        self.decoder = self.tokenizer.stream_decoder(skip_special=True) if self.tokenizer else None
        self.text = ""  # text released so far
        self._held = ""  # text held back while it could be the start of a stop string

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.generated)

    def process(self, logits: np.ndarray) -> np.ndarray:
        logits = penalized(logits, self.params, self.seen, self.counts, self.masked_ids(len(self.generated)))
        if self.constraint is not None:  # before temperature and top-k/p, so those pick among allowed tokens
            logits = self.constraint.mask(logits)
        return logits

    def masked_ids(self, generated: int) -> Sequence[int]:
        """The stop ids forbidden as generated token number ``generated`` (0-based): all of them
        before min_new_tokens, or always under ignore_eos; else none."""
        if generated < self.params.min_new_tokens or self.params.ignore_eos:
            return sorted(self.stop_ids)
        return ()

    def _stops_masked(self) -> bool:
        return bool(self.masked_ids(len(self.generated)))

    def choose(self, logits: np.ndarray) -> int:
        p = self.params
        if p.greedy:
            return int(np.argmax(logits))
        return sample(sampling_filters(logits, p), self.rng)

    def logits(self, logits) -> np.ndarray:
        """The model's logits (V,) as this sequence reads them: float32, cut to its vocabulary."""
        logits = np.asarray(logits, np.float32)
        return logits[:self.vocab_size] if self.vocab_size else logits

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """The distribution a sampled ``step`` on these model logits would draw from (float64)."""
        return processed_probs(self.logits(logits), self.params, self.seen, self.counts,
                               self.masked_ids(len(self.generated)), self.constraint)

    def draft_uniforms(self, index: int) -> np.ndarray:
        """Three uniforms for generated token ``index`` where a draft model proposed it by sampling
        (``speculative.accept``'s rejection rule): the draft's draw, the acceptance test, the draw
        from the residual. From a generator of this sequence's seed keyed by the token's index, not
        from ``rng``: a position's proposal may be drawn again after an earlier rejection (its first
        draw decided nothing kept), and a resumed request (``resume``) must not reuse a draw that
        chose a token it resumes after; keyed draws are fresh for every new index on both counts."""
        return np.random.default_rng([self.seed, DRAFT_STREAM, index]).random(3)

    def step(self, logits: np.ndarray, max_len: int | None = None, token: int | None = None) -> TokenEvent:
        """Pick, record and report the next token from the model's logits (V,). ``token``: the
        token already chosen from these logits (``speculative.accept``'s rejection rule)."""
        logits = self.logits(logits)
        if token is None:
            token = self._greedy_unchanged(logits)
        if token is None:
            token = self.choose(self.process(logits))
        text = self._record(token, max_len)
        if self.constraint is not None and self.finish_reason is None:
            self.constraint.prefetch()  # the next token's mask, computed while the model computes its logits
        logprob = top = None
        if self.params.logprobs or self.params.top_logprobs:  # of the model's distribution, before sampling's changes
            lsm = log_softmax(logits.astype(np.float64))
            logprob = float(lsm[token])
            if self.params.top_logprobs:
                top = [(int(i), float(lsm[i])) for i in top_ids(lsm, self.params.top_logprobs)]
        return TokenEvent(token, text, logprob, self.finish_reason, top)

    def _greedy_unchanged(self, logits: np.ndarray) -> int | None:
        """Greedy without penalties: the argmax, found without copying the logits when it is not a
        masked stop id (masking only lowers those, so the masked argmax is the same token); None
        when ``choose(process(...))`` must decide. Saves a copy of the vocabulary every token."""
        p = self.params
        if (not p.greedy or p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty
                or self.constraint is not None):
            return None
        token = int(np.argmax(logits))
        return None if token in self.stop_ids and self._stops_masked() else token

    def resume(self, tokens: Sequence[int], max_len: int | None = None) -> None:
        """Continue after ``tokens`` that this request already produced (on a worker that went
        away): they are recorded as if just generated (penalties, stop strings, the text already
        released) and a sampling generator is moved past their draws (each sampled step takes
        exactly one), so what follows is what the uninterrupted request would have produced,
        under greedy decoding and under a fixed seed alike, up to float rounding: the caller
        recomputes the prefix in other step shapes, so its logits differ from the lost worker's in
        the last bits, and a sampled draw that falls within that of a token boundary takes the
        neighbouring token (greedy decoding is unaffected unless two logits tie that closely).
        A sampled request whose tokens a draft model proposed (``draft_uniforms``) continues with
        fresh draws, another sample of the same distribution, not the lost worker's tokens."""
        for i, token in enumerate(tokens, 1):
            self._record(int(token), max_len)
            if self.finish_reason is not None:
                raise ValueError(f"resumed token {i} of {len(tokens)} already ends the request "
                                 f"({self.finish_reason}): nothing is left to generate")
        if not self.params.greedy and len(tokens):
            # At most one draw each (fewer where a draft proposed them: ``draft_uniforms``), so
            # what follows never reuses a draw that chose one of them.
            self.rng.random(len(tokens))

    def _record(self, token: int, max_len: int | None) -> str:
        """Append a generated token; the text it releases (finish_reason set when it ends the request)."""
        if self.constraint is not None and token not in self.stop_ids:  # a stop token ends it instead
            self.constraint.advance(token)  # raises GrammarError for a token the grammar refuses
        self.generated.append(token)
        self.seen = count_token(token, self.params, self.seen, self.counts)
        text = ""
        if token in self.stop_ids and not self.params.ignore_eos:
            self.finish_reason = FINISH_EOS
        else:
            text = self._release(self.decoder.push(token) if self.decoder else "")
        if self.finish_reason is None and (len(self.generated) >= self.params.max_new_tokens
                                           or (max_len is not None and self.length >= max_len)):
            self.finish_reason = FINISH_LENGTH
        if self.finish_reason in (FINISH_EOS, FINISH_LENGTH):
            text += self._finish_text()
        return text

    def abort(self) -> None:
        self.finish_reason = self.finish_reason or FINISH_ABORTED

    # -- text and stop strings --
    def _release(self, new: str) -> str:
        """Append new text; stop at a stop string; hold back a tail that may begin one."""
        buf = self._held + new
        stops = self.params.stop
        if not stops:
            self.text += buf
            return buf
        hits = [(buf.find(s), s) for s in stops if s in buf]
        if hits:
            at = min(hits)[0]
            self.finish_reason = FINISH_STOP
            self._held = ""
            self.text += buf[:at]
            return buf[:at]
        hold = 0
        for s in stops:
            for n in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        out, self._held = buf[:len(buf) - hold], buf[len(buf) - hold:]
        self.text += out
        return out

    def _finish_text(self) -> str:
        tail = self._held + (self.decoder.flush() if self.decoder else "")
        self._held = ""
        self.text += tail
        return tail

    def result(self) -> GenerationResult:
        return GenerationResult(list(self.generated), self.text, self.finish_reason or FINISH_ABORTED,
                                len(self.prompt), self.seed)


def generate(engine, prompt: list[int], params: SamplingParams | None = None, tokenizer=None,
             slot: int = 0) -> Iterator[TokenEvent]:
    """Yield tokens of one sequence as they are decoded (greedy when temperature is 0)."""
    params = (params or SamplingParams()).validate()
    state = SequenceState(list(prompt), params, tokenizer, engine.config.vocab_size)
    engine.check_prompt(len(prompt))
    logits = engine.prefill([slot], [state.prompt])[0]
    while True:
        event = state.step(logits, engine.max_len)
        yield event
        if event.finish_reason:
            return
        logits = engine.decode([event.token_id], [state.length - 1], slots=[slot])[0]


def generate_batch(engine, prompts: list[list[int]], params: SamplingParams | None = None,
                   tokenizer=None) -> list[GenerationResult]:
    """Generate for several prompts of any lengths at once (one slot each); results in order."""
    params = (params or SamplingParams()).validate()
    if len(prompts) > engine.max_batch:
        raise ValueError(f"{len(prompts)} prompts exceed the engine's {engine.max_batch} slots")
    states = [SequenceState(list(p), params, tokenizer, engine.config.vocab_size) for p in prompts]
    logits = engine.prefill(list(range(len(prompts))), [s.prompt for s in states])
    logprobs = [[] for _ in states]
    rows = list(range(len(states)))  # the slots still generating, in the order of ``logits``
    while True:
        for i, row in zip(rows, logits):
            ev = states[i].step(row, engine.max_len)
            if ev.logprob is not None:
                logprobs[i].append(ev.logprob)
        rows = [i for i in rows if states[i].finish_reason is None]
        if not rows:
            break
        logits = engine.decode([states[i].generated[-1] for i in rows], [states[i].length - 1 for i in rows],
                               slots=rows)
    results = [s.result() for s in states]
    for r, lp in zip(results, logprobs):
        r.logprobs = lp if params.logprobs else None
    return results
