"""Prompt-lookup (n-gram) speculative decoding: what to propose, how many, and which to keep.

A decode step on a CPU costs reading the weights once, which all the rows of a step share, so
checking a few proposed tokens in the step that produces the next one costs little more than that
one token; past a few rows a step is bound by arithmetic instead, and ``row_budget`` verifies only
the proposals likely enough to pay for their rows (``StepCost``, measured on the engine). The
proposals come from the sequence itself (no second model): the tokens that followed the most recent earlier occurrence of its last n tokens (n from
``MAX_NGRAM`` down to ``MIN_NGRAM``), in the prompt or in what it has generated, which is what an
answer that quotes, edits or summarises a given passage repeats.

Exactness: ``accept`` feeds each verified position's logits to ``SequenceState.step``, the very
call plain decoding makes, in order, and keeps going only while the token it picks is the next
proposal. Each position's logits are those plain decoding would compute (``Engine.verify`` makes
every proposed token a decode row of its own, bit for bit decode's), and the state (penalties,
grammar, stop strings, min/max tokens, its sampling generator) has advanced exactly as plain
decoding's would by then, so the tokens are plain decoding's, greedy or sampled under a seed
alike, and so are their logprobs. For a draft that is a point mass on proposal x (prompt lookup),
this is the rejection rule of Leviathan et al. / Chen et al.: sampling y from the target and
keeping x when y == x accepts x with probability P(x), and on a rejection y follows P with x
removed and renormalised; each sampled token takes one draw, as without speculation, so a seed
gives the same tokens with and without it (and ``SequenceState.resume`` stays right).

A draft model's proposals for a sampled request are drawn from the draft's own distribution q
instead (``DraftSampler``: processed as the target's p will be at that position) and judged by
the full rule (``judge``): kept with probability min(1, p/q), else the token is drawn from
norm(max(0, p - q)); so a draft that agrees with the target's distribution has its proposals
kept, where a point mass is kept only when it is the token sampled. The output still follows the
target's distribution exactly, and a seed still fixes it, but through other draws than plain
decoding's (``SequenceState.draft_uniforms``), which a position takes when it was proposed: the
tokens depend on how many tokens each step proposed (the row budget shared with other streams,
the adaptive k), so a seeded request repeats exactly where the proposals repeat (alone on a
worker, say), and otherwise gives another sample of the same distribution. Greedy requests and
requests with a grammar keep greedy proposals and the point-mass rule (exact, token for token).
"""
from __future__ import annotations

import heapq
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from .generation import SequenceState, TokenEvent, count_token, draw, processed_probs

MAX_NGRAM, MIN_NGRAM = 3, 1  # the suffix lengths looked up, longest first
K_MIN, K_MAX = 1, 7  # proposals per step for one sequence (with its last token: up to 8 rows)
K_START = 4
MAX_PAUSE = 16  # steps without proposals, at most, after a single proposal is rejected again and again
SEARCH = 4096  # the tokens searched for a match: the most recent ones
RATE_DECAY = 0.8  # how fast a sequence's acceptance rate forgets: over its last ~5 verifications
PRIOR = (1.6, 2.0)  # (kept, checked) before any verification: a hopeful 0.8, worth ~2 positions
RATE_RELAX = 0.95  # each step without proposals moves a sequence's counts 5% of the way back to PRIOR


def propose(tokens: Sequence[int], k: int, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM) -> list[int]:
    """Up to ``k`` tokens that followed an earlier occurrence of the longest suffix of ``tokens``
    (``max_ngram`` tokens down to ``min_ngram``) that occurs before: the most recent occurrence
    with ``k`` tokens after it, else the one with the most; [] when no suffix recurs."""
    if k <= 0 or len(tokens) < 2:
        return []
    seq = np.asarray(tokens[-SEARCH:], np.int64)
    # where an earlier match would end: the last token's earlier places (each has a token after it)
    ends = np.flatnonzero(seq[:-1] == seq[-1])
    for n in range(min(max_ngram, len(seq) - 1), min_ngram - 1, -1):
        hits = ends[ends >= n - 1]
        for back in range(1, n):  # the n-gram's other tokens, on the few candidates left
            hits = hits[seq[hits - back] == seq[-1 - back]]
        if len(hits):
            full = hits[hits + 1 + k <= len(seq)]
            start = (full[-1] if len(full) else hits[0]) + 1
            return seq[start:start + k].tolist()
    return []


class History:
    """A sequence's tokens (prompt, then generated) in one array that grows, so that each step's
    lookup copies only the tokens new since the last."""

    def __init__(self, capacity: int):
        self.tokens, self.n, self.prompt = np.zeros(capacity, np.int64), 0, 0

    def update(self, prompt: Sequence[int], generated: Sequence[int]) -> np.ndarray:
        if self.n == 0:
            self.prompt = self.n = len(prompt)
            self.tokens[:self.n] = prompt
        new = generated[self.n - self.prompt:]
        self.tokens[self.n:self.n + len(new)] = new
        self.n += len(new)
        return self.tokens[:self.n]


@dataclass
class Adaptive:
    """How many tokens one sequence proposes at its next step: ``k`` grows by one after a run kept
    whole and drops to the kept length plus one after a rejection (K_MIN..K_MAX); a single
    proposal rejected pauses proposing for ``backoff`` steps, a pause that doubles each time (up
    to MAX_PAUSE) until a proposal is kept, so text that does not repeat itself costs few rows.
    ``rate``: the chance that its next proposal is kept, from its recent verifications (each
    position checked counts, the ones after a rejection were never checked), which ``row_budget``
    weighs against what a row costs. It starts hopeful, and drifts back there while the sequence
    proposes nothing, so a sequence whose proposals were not worth their rows is tried again now
    and then (its text may have come to a passage it repeats)."""
    k: int = K_START
    skip: int = 0  # steps left in the current pause
    backoff: int = 1
    kept: float = PRIOR[0]  # decayed counts of the positions kept and checked
    checked: float = PRIOR[1]

    @property
    def rate(self) -> float:
        return self.kept / self.checked

    def wanted(self) -> int:
        """Tokens to propose now (0 in a pause); call once a step."""
        if self.skip:
            self.skip -= 1
            return 0
        return self.k

    def update(self, proposed: int, accepted: int) -> None:
        if proposed == 0:
            self.kept += (1 - RATE_RELAX) * (PRIOR[0] - self.kept)
            self.checked += (1 - RATE_RELAX) * (PRIOR[1] - self.checked)
            return
        self.kept = RATE_DECAY * self.kept + accepted
        self.checked = RATE_DECAY * self.checked + accepted + (accepted < proposed)
        self.k = min(self.k + 1, K_MAX) if accepted == proposed else max(K_MIN, min(accepted + 1, K_MAX))
        if accepted:
            self.backoff = 1
        elif proposed <= K_MIN:
            self.skip, self.backoff = self.backoff, min(2 * self.backoff, MAX_PAUSE)


@dataclass(frozen=True)
class StepCost:
    """What a decode step costs: ``fixed`` seconds (reading the weights once, which the rows of a
    step share) plus ``per_row`` seconds a row (its arithmetic, its attention, its logits), plus
    ``per_token`` seconds of the batcher's own work for each token a step gives (sampling,
    detokenising, streaming). ``measure_step_cost`` measures the first two on the engine."""
    fixed: float
    per_row: float
    per_token: float = 0.0

    def seconds(self, rows: int, tokens: float) -> float:
        return self.fixed + self.per_row * rows + self.per_token * tokens


def row_budget(wanted: Sequence[int], rates: Sequence[float], cost: StepCost, cap: int) -> list[int]:
    """How many of its ``wanted`` proposals each of a step's sequences verifies: the ones that pay
    for their rows. Proposal j of sequence i is kept with probability ``rates[i] ** j`` (only after
    the ones before it), so it adds that many tokens, expected, for one more row; proposals are
    taken most likely first while each adds more tokens per second than the step gives on average
    (then the step's tokens per second rise), and at most ``cap`` rows in all.

    On a CPU a step with few rows is bound by reading the weights, so a row is cheap and a proposal
    kept one time in five pays; with many rows a step is bound by arithmetic (bench-serve bf16: 4.2 ms
    for 8 rows, 0.29 ms for each one more), and a proposal must be likely to pay."""
    take = [0] * len(wanted)
    tokens, seconds = float(len(wanted)), cost.seconds(len(wanted), len(wanted))
    room = cap - len(wanted)
    heap = [(-rates[i], i) for i in range(len(wanted)) if wanted[i] > 0 and rates[i] > 0]
    heapq.heapify(heap)
    while heap and room > 0:
        p, i = heapq.heappop(heap)
        p = -p
        extra = cost.per_row + cost.per_token * p
        if p * seconds <= tokens * extra:  # p / extra <= tokens / seconds: it would lower the rate
            break
        take[i], tokens, seconds, room = take[i] + 1, tokens + p, seconds + extra, room - 1
        if take[i] < wanted[i]:
            heapq.heappush(heap, (-p * rates[i], i))
    return take


def measure_step_cost(engine, rows: tuple[int, int] = (8, 16), repeats: int = 7) -> StepCost:
    """``engine``'s decode step cost, fixed and per row, from the fastest of ``repeats`` verification
    steps of ``rows[0]`` and of ``rows[1]`` rows, taken in turn (noise from the rest of the machine
    only ever adds): the rows where the choice is made (below ~8 a row costs little beside the
    weights' read), in as few slots as hold them, each slot's rows a quarter of the way into its
    positions (at most 512 in), as served rows attend a context (the demo model's rows cost 0.05 ms
    at position 0, 0.08 ms at 256). It writes KV rows that no sequence holds: call it before
    serving begins."""
    per_slot = -(-rows[1] // engine.max_batch)
    start = min(engine.max_len // 4, 512)
    if start + per_slot > engine.max_len:
        raise ValueError(f"{rows[1]} rows do not fit {engine.max_batch} slots of {engine.max_len} positions")

    def seconds(n: int) -> float:
        slots = list(range(-(-n // per_slot)))
        chunks = [[0] * min(per_slot, n - i * per_slot) for i in slots]
        began = time.perf_counter()
        engine.verify(slots, chunks, [start] * len(slots))
        return time.perf_counter() - began

    seconds(rows[1])  # the first step of a shape may pay for allocations
    few, many = (min(ts) for ts in zip(*((seconds(rows[0]), seconds(rows[1])) for _ in range(repeats))))
    per_row = max(many - few, 0.0) / (rows[1] - rows[0])
    return StepCost(fixed=max(few - per_row * rows[0], 0.0), per_row=per_row)


def accept(state: SequenceState, rows: np.ndarray, proposals: Sequence[int],
           max_len: int | None = None, draft_probs: Sequence[np.ndarray] | None = None) -> Iterator[TokenEvent]:
    """The tokens one verification gives a sequence: ``rows[j]`` are the logits after its last
    token (j = 0) and after proposal j (j >= 1), ``len(proposals) + 1`` rows. Steps ``state`` on
    each row in turn, yielding each event, and stops after the first token that is not the next
    proposal (the model's own), after the one that ends the request, or after the last row (every
    proposal kept: the model's next token comes free). ``proposals`` empty: one plain step.

    ``draft_probs`` None: each proposal is a point mass (the module docstring). Else proposal j
    was drawn from the draft's distribution ``draft_probs[j]`` (``DraftSampler``) and is judged by
    the rejection rule (``judge``); the bonus token after a run kept whole is a plain step."""
    for j, row in enumerate(rows):
        judged = draft_probs is not None and j < len(proposals)
        event = state.step(row, max_len, judge(state, row, proposals[j], draft_probs[j]) if judged else None)
        yield event
        if event.finish_reason or j == len(proposals) or event.token_id != proposals[j]:
            return


def judge(state: SequenceState, row: np.ndarray, x: int, q: np.ndarray) -> int:
    """The token at the next position where a draft proposed ``x`` drawn from ``q`` (Leviathan et
    al. 2023, Chen et al. 2023): ``x`` kept with probability min(1, p(x)/q(x)), p the target's
    distribution there (``SequenceState.probs``: processed as a plain step's); else a draw from
    norm(max(0, p - q)). Over the draft's draw and these, the token follows p exactly, and it is
    ``x`` with probability sum(min(p, q)): all of it for a draft that is the target."""
    p = state.probs(row)
    _, u_keep, u_residual = state.draft_uniforms(len(state.generated))
    if u_keep * q[x] < p[x]:
        return x
    residual = np.maximum(p - q, 0.0)
    residual[x] = 0.0  # it is 0 (only q(x) > p(x) gets here), rounding aside: a rejected x never comes back
    if not residual.sum() > 0:  # p == q but for rounding: p itself is the residual's limit
        residual = p
    return draw(residual, u_residual)


class DraftSampler:
    """A sampled request's draft proposals (``draft.Drafter.propose`` calls it with the draft's
    logits at each proposal in turn): each drawn from q_j, the draft's logits processed as the
    target's will be at that position by ``SequenceState.probs`` (``processed_probs``, with the
    penalties and min_tokens' stop mask as they stand after the proposals before it); ``q`` keeps
    each q_j for ``judge``. Not for a request with a grammar: its matcher cannot take proposals
    ahead of the sequence (it would have to consume them and roll back while its mask thread may be
    computing the next mask), so such a request keeps greedy proposals and the point-mass rule."""

    def __init__(self, state: SequenceState):
        self.state, self.q = state, []
        self.seen, self.counts = state.seen, state.counts.copy()

    def __call__(self, logits: np.ndarray) -> int:
        st, n = self.state, len(self.state.generated) + len(self.q)
        q = processed_probs(st.logits(logits), st.params, self.seen, self.counts, st.masked_ids(n))
        x = draw(q, st.draft_uniforms(n)[0])
        self.q.append(q)
        self.seen = count_token(x, st.params, self.seen, self.counts)
        return x
