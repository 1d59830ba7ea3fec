"""Continuous batching: many sequences that come and go share one engine's decode steps.

One thread owns the engine. Between decode steps it lets waiting requests into free slots and
drops the ones that finished or were cancelled, so a request never waits for a whole batch to
end and a worker's throughput grows with the number of streams. Each iteration runs at most one
prefill step (the next ``engine.prefill_chunk`` tokens of admitted prompts), then one decode
step for the running sequences: prompts that arrive together are prefilled together, and a long
prompt goes in chunk by chunk between decode steps instead of stalling the running streams for
its whole length. While streams are decoding, a prefill step takes at most ``PREFILL_BUDGET``
prompt tokens (oldest requests first, always at least one chunk), so a burst of long prompts
costs each running stream about one budget's compute per token, not every prompt's chunk at once
(the token budget of vLLM's chunked prefill). With nothing decoding, every prompt goes at once.

Prefix reuse: a finished request's slot keeps its KV rows, and the batcher remembers which
tokens (and which adapter) they hold. A new request goes to the free slot that shares the
longest prefix with its prompt and is prefilled from there (``engine.prefill(starts=...)``), so
a system prompt or a chat history that was just served is not computed again. The reused rows
are the ones a fresh prefill would write (same tokens, positions and adapter), so the output is
the same; with dynamic NTK only rows written within the trained positions are reused (past
them a row's rotation depends on the length at the time).

Speculative decoding (``speculate="ngram"``, ``speculative.py``): a running request whose text so
far has an earlier occurrence of its last few tokens proposes the tokens that followed it, and the
decode step verifies them as extra rows of the same sequence (``Engine.verify``), beside the
requests that propose nothing; it keeps the proposals the model agrees with plus the model's own
next token, so a step gives it up to k + 1 tokens, the very tokens plain decoding gives. A
rejected proposal's KV rows lie past the sequence's new end: the next step writes over them
before any query reads that far, and a finished request's reusable rows stop at its last accepted
token, so prefix reuse never sees them. With ``speculate="draft"`` the proposals are a draft
model's tokens instead (``draft.py``: its own cache in the same slots, prefilled beside the
target's, rolled back after each verification): greedy ones verified and kept the same way, or
for a sampled request ones drawn from the draft's distribution and judged by the rejection rule.

Per-token logic is ``SequenceState.step``, the same as ``generate``; each slot's attention sees
only its own cache rows, so under greedy decoding a request gets the same tokens alone or in a
crowd.

    batcher = Batcher(engine, tokenizer, max_queue=32).start()
    handle = batcher.submit(prompt_ids, SamplingParams(max_new_tokens=16))
    for event in handle:          # TokenEvents as they are decoded
        ...
    batcher.stop()
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .draft import Drafter
from .engine_api import bucket
from .errors import QueueFull, ShuttingDown
from .generation import FINISH_ABORTED, GenerationResult, SamplingParams, SequenceState, TokenEvent
from .speculative import (K_MAX, Adaptive, DraftSampler, History, StepCost, accept, measure_step_cost, propose,
                          row_budget)

log = logging.getLogger(__name__)


class BatcherMetrics:
    """What the batcher reports as it runs; the services record it (e.g. to Prometheus)."""

    def time_to_first_token(self, seconds: float) -> None: ...
    def inter_token_latency(self, seconds: float) -> None: ...
    def batch_size(self, size: int) -> None: ...
    def prefix_cache(self, reused: int, prompt: int) -> None: ...  # tokens reused of a prompt's tokens
    def tokens(self, n: int) -> None: ...
    def finished(self, reason: str, seconds: float) -> None: ...
    # speculative decoding: one sequence's decode step, its proposals verified and those kept (the
    # step gave it accepted + 1 tokens, unless it ended sooner); method: where they came from (SPECULATION)
    def speculation(self, proposed: int, accepted: int, method: str) -> None: ...


_DONE = object()  # queued after a handle's last event
PREFILL_BUDGET = 256  # prompt tokens a prefill step takes while streams decode (~0.35 s on 2 cores, bench-serve)
# Rows a speculative decode step may fill before its cost is measured (``Batcher.measure``), and with
# a draft model: up to 8 rows (the AVX-512 tile) share each weight load, so proposals there ride on the
# step's one pass over the weights. Measured served (bench/speculative_bench.py, demo model, 8 streams
# of a copy task where the model keeps 17% of proposals): filling up to 16 rows ran 0.89x of no
# speculation; up to 8 leaves 8 streams alone. A measured cost lets proposals that pay fill more.
SPECULATE_ROWS = 8
TOKEN_SECONDS_DECAY = 0.9  # how fast the batcher's measured own time per token forgets
SPECULATION = ("off", "ngram", "draft")  # none, prompt lookup (speculative.py), a draft model (draft.py)


@dataclass(eq=False)
class Handle:
    """One submitted request: iterate it for its TokenEvents; ``cancel()`` to stop it."""
    state: SequenceState
    context: list[int]  # what the slot must hold before the next token: the prompt (+ resumed tokens)
    adapter: int = 0
    submitted: float = field(default_factory=time.monotonic)
    slot: int | None = None
    _events: queue.Queue = field(default_factory=queue.Queue)
    _cancelled: threading.Event = field(default_factory=threading.Event)
    _wake: threading.Condition | None = None
    last_token_at: float | None = None  # when its latest token was emitted (inter-token latency)
    prefilled: int = 0  # context tokens already in the slot's cache
    tenant: str = ""  # whose cached prompt rows it may reuse: only its own tenant's (see ``submit``)
    failed: bool = False  # an engine step failed while this request held its slot
    logprobs: list[float] = field(default_factory=list)
    speculation: Adaptive = field(default_factory=Adaptive)  # how many tokens it proposes (speculative.py)
    history: History | None = None  # its tokens as proposals search them (made at its first lookup)

    @property
    def seed(self) -> int:
        return self.state.seed

    @property
    def finish_reason(self) -> str | None:
        return self.state.finish_reason

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop at the next step boundary and free the slot (safe from any thread, idempotent)."""
        self._cancelled.set()
        if self._wake is not None:
            with self._wake:
                self._wake.notify()

    def put(self, item) -> None:
        """The batcher's side: a TokenEvent, an exception to raise in the reader, or the end."""
        self._events.put(item)

    def next_events(self, timeout: float | None = None) -> list[TokenEvent] | None:
        """Every event ready now (waiting for at least one); None once the request has ended.

        Joining what is ready keeps a slow reader from falling behind one message per token.
        """
        items = [self._events.get(timeout=timeout)]
        while True:
            try:
                items.append(self._events.get_nowait())
            except queue.Empty:
                break
        events = []
        for item in items:
            if isinstance(item, BaseException):
                raise item
            if item is _DONE:
                self._events.put(_DONE)  # later calls see the end too
                return events or None
            events.append(item)
        return events

    def __iter__(self) -> Iterator[TokenEvent]:
        while (events := self.next_events()) is not None:
            yield from events

    def result(self) -> GenerationResult:
        """Wait for the end; the whole generation (finish reason "aborted" if cancelled)."""
        for _ in self:
            pass
        r = self.state.result()
        r.logprobs = self.logprobs if self.state.params.logprobs else None
        return r


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """Length of the longest shared prefix of a and b, at most ``limit``."""
    n = min(len(a), len(b), limit)
    if n <= 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if len(diff) else n


class Batcher:
    """Owns an engine in a thread and runs continuous batching over its slots."""

    def __init__(self, engine, tokenizer=None, max_queue: int = 64, metrics: BatcherMetrics | None = None,
                 prefix_cache: bool = True, speculate: str = "off", speculate_rows: int = SPECULATE_ROWS,
                 draft=None):
        """``speculate``: "ngram" verifies prompt-lookup proposals in the decode steps, "draft" the
        greedy proposals of ``draft`` (an engine of a model with the target's tokenizer, the same
        slots and positions: ``draft.Drafter``); requests with ``SamplingParams.speculate`` False
        opt out. Up to ``speculate_rows`` rows a step; it needs an engine on the CPU kernels
        (``Engine.verify``)."""
        if speculate not in SPECULATION:
            raise ValueError(f"speculate is one of {', '.join(SPECULATION)}, not {speculate!r}")
        if (speculate == "draft") != (draft is not None):
            raise ValueError("speculate='draft' takes a draft engine, and a draft engine is used only with "
                             f"speculate='draft' (got speculate={speculate!r}, draft {draft is not None})")
        if speculate != "off" and not engine.kernels:
            # On MindSpore's ops a verification step attends another length than decode does, so its
            # logits, hence greedy near-ties, could differ from plain decoding's: not exact.
            raise ValueError("speculative decoding needs an engine on the CPU kernels")
        self.speculate, self.speculate_rows = speculate != "off", speculate_rows
        # the engine's step cost (``measure``); None: up to speculate_rows rows a step, as a draft model's
        self.step_cost: StepCost | None = None
        self.token_seconds = 0.0  # the engine thread's own time per token decoded, outside the engine
        self.method = speculate
        self.drafter = Drafter(draft, engine) if draft is not None else None
        self.engine, self.tokenizer = engine, tokenizer
        self.max_queue = max_queue
        self.metrics = metrics or BatcherMetrics()
        self.vocab_size = engine.config.vocab_size
        self._wake = threading.Condition()
        self._waiting: deque[Handle] = deque()
        self._slots: list[Handle | None] = [None] * engine.max_batch
        # What each slot's cache rows hold: (adapter, adapters_version, tokens) after its last request.
        # An engine that prefills whole prompts only (prefill_chunk None) cannot start mid-prompt.
        self.prefix_cache = prefix_cache and engine.prefill_chunk is not None
        # per slot, what its cache rows hold: (adapter, adapters version, tenant, tokens)
        self._resident: list[tuple[int, int, str, list[int]] | None] = [None] * engine.max_batch
        self._freed: list[int] = [0] * engine.max_batch  # when each slot was last freed (LRU order)
        self._clock = 0
        self._accepting = True
        self._drain = True
        self._thread: threading.Thread | None = None
        self.requests_finished = 0

    # ---- the public side (any thread) --------------------------------------------------------
    def start(self) -> "Batcher":
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self._thread.start()
        return self

    def submit(self, prompt: list[int], params: SamplingParams, adapter: str | None = None,
               resume: list[int] = (), tenant: str = "") -> Handle:
        """Queue a request; raises ValueError / PromptTooLong / AdapterNotFound for bad input and
        QueueFull when the waiting queue is at its bound. ``resume``: tokens the request already
        produced elsewhere; it continues after them (``SequenceState.resume``) and streams only
        what follows. ``tenant``: who sent it (the services pass a digest of its API key); a
        prompt reuses only KV rows its own tenant's requests left, so that how fast a prompt is
        answered never tells one user what another one asked."""
        self.engine.check_prompt(len(prompt) + len(resume))  # first: a long one costs nothing more
        prompt, resume = [int(t) for t in prompt], [int(t) for t in resume]
        bad = [t for t in prompt + resume if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} outside the model's vocabulary (0..{self.vocab_size - 1})")
        index = self.engine.adapter_index(adapter)
        state = SequenceState(prompt, params, self.tokenizer, self.vocab_size)  # validates params
        state.resume(resume, self.engine.max_len)
        handle = Handle(state, prompt + resume, index, _wake=self._wake, tenant=tenant)
        with self._wake:
            if not self._accepting:
                raise ShuttingDown("the worker is shutting down")
            # Requests bound for a free slot are not waiting for one, so they don't count.
            waiting = sum(not h.cancelled for h in self._waiting)  # cancelled ones leave at the next step
            if waiting - self._slots.count(None) >= self.max_queue:
                raise QueueFull(f"all {self.engine.max_batch} slots are busy and {self.max_queue} requests "
                                "are waiting; retry later")
            self._waiting.append(handle)
            self._wake.notify()
        return handle

    @property
    def active(self) -> int:
        return sum(h is not None for h in self._slots)

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def load(self) -> int:
        return self.active + self.queued

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new requests; finish the running ones (drain) or abort them; end the thread."""
        with self._wake:
            self._accepting, self._drain = False, drain
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive() and drain:  # out of patience: abort what is left
                self.stop(drain=False, timeout=timeout)

    # ---- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while self._accepting and not self._waiting and self.active == 0:
                    self._wake.wait()
                if not self._accepting and not self._drain:
                    for h in list(self._waiting) + [h for h in self._slots if h]:
                        h.cancel()
                gone = [h for h in self._waiting if h.cancelled]
                self._waiting = deque(h for h in self._waiting if not h.cancelled)
                while self._waiting and None in self._slots:  # admitted: prefilled from the next step on
                    h = self._waiting.popleft()
                    h.slot, h.prefilled = self._place(h)
                    self._slots[h.slot] = h
                    if self.drafter:
                        self.drafter.place(h.slot, h.prefilled)
                    self.metrics.prefix_cache(h.prefilled, len(h.context))
            for h in gone:
                self._end(h)
            for h in self._slots:
                if h is not None and h.cancelled:
                    self._end(h)
            prefilling = [h for h in self._slots if h is not None and h.prefilled < len(h.context)]
            # Only the live slots run: a step costs the sequences in it, not the slots allocated.
            live = [h for h in self._slots if h is not None and h.prefilled == len(h.context)]
            if prefilling and live:
                prefilling = self._within_budget(prefilling)
            if prefilling:
                self._guard(prefilling, lambda: self._prefill(prefilling))
                live = [h for h in self._slots if h is not None and h.prefilled == len(h.context)]
            if not live:
                if not prefilling:
                    with self._wake:
                        if not self._accepting and not self._waiting:
                            return
                continue
            slots = [h.slot for h in live]
            tokens = np.array([h.state.generated[-1] for h in live], np.int32)
            positions = np.array([h.state.length - 1 for h in live], np.int64)
            adapters = np.array([h.adapter for h in live], np.int32)
            self.metrics.batch_size(len(live))

            def step():  # a draft model's steps go in the guard too: its failure fails this step's requests
                began = time.perf_counter()
                proposals, draft_probs = self._proposals(live)
                engine_began = time.perf_counter()
                if any(proposals):  # each row's last token and its proposals, every one a row of the step
                    chunks = [[int(t)] + p for t, p in zip(tokens, proposals)]
                    logits = self.engine.verify(slots, chunks, positions, adapters=adapters)
                else:
                    logits = self.engine.decode(tokens, positions, adapters=adapters, slots=slots)[:, None]
                engine_seconds = time.perf_counter() - engine_began
                before = sum(len(h.state.generated) for h in live)
                self._after_decode(live, logits, proposals, draft_probs)
                made = sum(len(h.state.generated) for h in live) - before
                if self.step_cost and made:  # the row budget's per-token cost
                    own = (time.perf_counter() - began - engine_seconds) / made
                    self.token_seconds += (1 - TOKEN_SECONDS_DECAY) * (own - self.token_seconds)
            self._guard(live, step)

    def _place(self, h: Handle) -> tuple[int, int]:
        """A free slot for ``h`` and how many of its prompt tokens that slot already holds: the
        longest shared prefix (with the same adapter, left by the same tenant), else the
        longest-free slot."""
        free = [s for s, x in enumerate(self._slots) if x is None]
        best, reuse = min(free, key=lambda s: self._freed[s]), 0
        if not self.prefix_cache:
            return best, 0
        prompt = h.context
        for s in free:
            held = self._resident[s]
            if held is None or held[:3] != (h.adapter, self.engine.adapters_version, h.tenant):
                continue
            n = common_prefix(held[3], prompt, len(prompt) - 1)  # the last token is always computed
            if n > reuse:
                best, reuse = s, n
        return best, reuse

    def _reusable(self, h: Handle) -> list[int] | None:
        """The tokens whose KV rows ``h`` left in its slot, or None if none can be trusted."""
        if h.failed:
            return None  # an engine step failed: the slot's rows are in an unknown state
        written = h.context[:h.prefilled]
        if h.prefilled == len(h.context):
            written = (h.state.prompt + h.state.generated)[:h.state.length - 1]  # the last token was never fed
        cfg = self.engine.config
        if cfg.rope_scaling == "dynamic":
            written = written[:cfg.max_position_embeddings]
        return written or None

    def _within_budget(self, handles: list[Handle]) -> list[Handle]:
        """The oldest prompts whose next chunks fit ``PREFILL_BUDGET`` tokens (at least one)."""
        chunk = self.engine.prefill_chunk
        if chunk is None:
            return handles
        taken, spent = [], 0
        for h in sorted(handles, key=lambda h: h.submitted):
            cost = min(chunk, len(h.context) - h.prefilled)
            if taken and spent + cost > PREFILL_BUDGET:
                break
            taken.append(h)
            spent += cost
        return taken

    def _prefill(self, handles: list[Handle]) -> None:
        """The next chunk of every prompt still going in, in one engine call; a prompt that is
        complete emits its first token."""
        chunk = self.engine.prefill_chunk
        ends = None if chunk is None else [min(h.prefilled + chunk, len(h.context)) for h in handles]
        logits = self.engine.prefill([h.slot for h in handles], [h.context for h in handles],
                                     adapters=[h.adapter for h in handles], starts=[h.prefilled for h in handles],
                                     ends=ends)
        drafted = [i for i, h in enumerate(handles) if self._drafts(h)]
        if drafted:  # the draft's rows of the same tokens (from as far as its slot holds them)
            self.drafter.prefill([handles[i].slot for i in drafted], [handles[i].context for i in drafted],
                                 None if ends is None else [ends[i] for i in drafted])
        for i, (h, row) in enumerate(zip(handles, logits)):
            h.prefilled = len(h.context) if ends is None else ends[i]
            if h.prefilled == len(h.context):
                self._advance(h, [row])

    def _drafts(self, h: Handle) -> bool:
        """Whether ``h``'s tokens go into the draft model's cache (it may take its proposals)."""
        return self.drafter is not None and h.state.params.speculate

    def _samples_draft(self, h: Handle) -> bool:
        """Whether ``h``'s draft proposals are sampled and judged by the rejection rule
        (``speculative.judge``): a sampled request without a grammar (``speculative.DraftSampler``
        says why); the others take the draft's greedy tokens as point masses."""
        st = h.state
        return self._drafts(h) and not st.params.greedy and st.constraint is None

    def measure(self) -> StepCost | None:
        """Measure the engine's decode step cost, so that prompt lookup's proposals fill the rows
        that pay for themselves (``speculative.row_budget``) instead of up to ``speculate_rows``;
        None where that does not apply: no prompt lookup, or an engine whose decode steps are
        graphs (a step of another row count would compile one while serving). Call it before
        serving: it writes KV rows no sequence holds yet."""
        if self.method == "ngram" and getattr(self.engine, "decodes_natively", False):
            self.step_cost = measure_step_cost(self.engine)
        return self.step_cost

    def _proposals(self, live: list[Handle]) -> tuple[list[list[int]], list[list | None]]:
        """Each live request's proposals for this step ([] for none), and the draft distributions
        they were sampled from (None: point masses): up to its adaptive
        ``speculation.wanted()``, no more than it may still generate. Prompt lookup's fill the rows
        that pay for themselves once the step's cost is measured (``speculative.row_budget``), else
        up to ``speculate_rows`` rows a step (or the rows it runs anyway: padding to a power of two),
        as a draft model's do (it runs a step for each proposal it makes, so the row budget is
        shared out before it runs)."""
        if not self.speculate:
            return [[] for _ in live], [None] * len(live)
        ks = []
        for h in live:
            st = h.state
            room = min(h.speculation.wanted(), st.params.max_new_tokens - len(st.generated) - 1,
                       self.engine.max_len - st.length)  # the last proposal's position < max_len
            ks.append(max(room, 0) if st.params.speculate else 0)
        if self.step_cost and not self.drafter:
            cost = StepCost(self.step_cost.fixed, self.step_cost.per_row, self.token_seconds)
            ks = row_budget(ks, [h.speculation.rate for h in live], cost, len(live) * (K_MAX + 1))
            spare = sum(ks)
        else:
            spare = max(self.speculate_rows, bucket(len(live), self.engine.max_batch, start=1)) - len(live)
        if self.drafter:
            while sum(ks) > spare:  # the longest give way first
                ks[ks.index(max(ks))] -= 1
            samplers = [DraftSampler(h.state) if self._samples_draft(h) else None for h in live]
            proposals = self.drafter.propose([h.slot for h in live], [h.state.prompt + h.state.generated for h in live],
                                             ks, samplers)
            return proposals, [s and s.q for s in samplers]
        out = []
        for h, k in zip(live, ks):
            if k:
                h.history = h.history or History(self.engine.max_len)
            out.append(propose(h.history.update(h.state.prompt, h.state.generated), k) if k else [])
        while sum(map(len, out)) > spare:  # the longest give way first
            max(out, key=len).pop()
        return out, [None] * len(live)

    def _after_decode(self, live: list[Handle], logits, proposals: list[list[int]], draft_probs: list) -> None:
        """``logits[i]``: request i's rows, after its last token then after each of ``proposals[i]``
        (drawn from ``draft_probs[i]``, or None: point masses)."""
        for h, rows, proposed, q in zip(live, logits, proposals, draft_probs):
            events = self._advance(h, rows, proposed, q)
            if self.speculate and h.state.params.speculate:
                accepted = sum(e.token_id == p for e, p in zip(events, proposed))  # a prefix: accept stops at a miss
                h.speculation.update(len(proposed), accepted)
                self.metrics.speculation(len(proposed), accepted, self.method)
            if self._drafts(h):  # the draft's rows of rejected proposals are past its new end
                self.drafter.rollback(h.slot, h.state.length)

    def _advance(self, h: Handle, rows, proposals=(), draft_probs=None) -> list[TokenEvent]:
        """One request's next token(s) from its rows of the step's logits (``speculative.accept``:
        one row, or one after each proposal kept); the events emitted. Its sampling, penalties, stop
        strings and detokenising are its own: a failure there ends this request alone, with its own
        error, and the rest of the step goes on for everyone else (its KV rows were written by a
        step that succeeded, so its slot stays reusable)."""
        events, steps = [], accept(h.state, rows, proposals, self.engine.max_len, draft_probs)
        while True:
            try:
                ev = next(steps, None)
            except Exception as e:  # noqa: BLE001 - handed to this request's caller, who reports it
                log.warning("request failed in its own sampling (%s: %s); the others in the step go on",
                            type(e).__name__, e)
                h.put(e)
                self._end(h)
                return events
            if ev is None:
                return events
            events.append(ev)
            self._emit(h, ev)

    def _emit(self, h: Handle, ev: TokenEvent) -> None:
        now = time.monotonic()
        if h.last_token_at is None:
            self.metrics.time_to_first_token(now - h.submitted)
        else:
            self.metrics.inter_token_latency(now - h.last_token_at)
        h.last_token_at = now
        if ev.logprob is not None:
            h.logprobs.append(ev.logprob)
        self.metrics.tokens(1)
        h.put(ev)
        if ev.finish_reason:
            self._end(h)

    def _end(self, h: Handle) -> None:
        """Free the request's slot and close its event stream."""
        if h.state.finish_reason is None:
            h.state.abort()
        if h.slot is not None and self._slots[h.slot] is h:
            tokens = self._reusable(h)
            self._clock += 1
            with self._wake:
                self._resident[h.slot] = tokens and (h.adapter, self.engine.adapters_version, h.tenant, tokens)
                self._freed[h.slot] = self._clock
                self._slots[h.slot] = None
        self.requests_finished += 1
        self.metrics.finished(h.state.finish_reason or FINISH_ABORTED, time.monotonic() - h.submitted)
        h.put(_DONE)

    def _guard(self, handles: list[Handle], fn) -> None:
        """Run an engine step; if it fails, fail the requests in it (not the whole worker)."""
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - handed to each waiting caller, who reports it
            log.exception("engine step failed; failing %d request(s)", len(handles))
            for h in handles:
                if h.slot is not None and self._slots[h.slot] is h:
                    h.put(e)
                    h.state.abort()
                    h.failed = True
                    self._end(h)
