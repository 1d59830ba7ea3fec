"""A model with a preallocated, slotted KV cache and one compiled step for prefill and decode.

The cache holds ``max_batch`` slots of ``max_len`` positions per layer, stored flat as
(slots * heads * max_len, head_dim) plus one scratch slot. Each sequence owns a slot, so
sequences of different lengths sit side by side with their own positions; nothing is padded
on the left and padding never reaches a real row.

A step's cost follows the live work, not the allocation: a step runs only the rows it is
given (the batch rounded up to a power of two, padding rows pointed at the scratch slot) and
each row reads only its own positions. New k/v are written in place with ScatterUpdate on the
flat cache's first axis (measured on MindSpore 2.9 CPU: ScatterNdUpdate on a (slots, heads, L, hd)
cache copied the whole cache on every call, which made a step cost slots x L).

The cache is float16 by default where the CPU kernels serve (``cache_dtype``): the new rows are cast
to fp16 and scattered (MindSpore's CPU ScatterUpdate has fp16, not bf16), and CachedAttention widens
them to fp32 as it reads them, so a cache takes half the bytes of an fp32 one and attention reads
half as many per token; fp16's 10-bit mantissa keeps the greedy tokens of the fp32 cache on the
parity models (tests/test_engine.py, test_internlm2.py, test_batching.py). float32 is the option
(``cache_dtype="float32"``, the worker's ``--kv-cache-dtype``) and the default on MindSpore's ops.

The engine serves the fused form of its model (``InternLMForCausalLM(fused=True)``) and picks its
execution form once (``forms.serving_ops``): on CPU the project's kernels (``forms.ServingKernels``:
every linear and the head packed for a matmul that reads each weight once, attention read from
the cache where it lies, norms, rotary and SwiGLU one op each). Each (rows, new tokens) shape
compiles once. ``open_engine`` gives it a model already in that form, read from the file with
its weights in their stored precision (``loader.load_serving_model``: a bf16 checkpoint is
served from bf16 weights, one copy); for a model passed in from ``load_model`` (fp32, unfused)
the engine builds the serving form beside it (``serving_form``: the fused and packed weights
are new, the rest shared; the model passed in is not changed).

A decode-shaped step (one new token a row: ``decode`` and ``verify``) on the kernels runs as one
native call (``kernels.DecodeStep``) rather than the step graph: the same kernels in the same order on
the same weights and caches, so the same logits to the bit and the same cache rows, without the
graph's per-kernel launches and the OpenMP sleeps between them (bench-serve bf16, one row: 6.3 ->
2.6 ms a step), and it runs the rows it is given, unpadded; LoRA adapters per row as the graph adds
them (to float rounding: its own sums, not MindSpore's matmul). Prefill chunks, and models with a
linear left unpacked, run the graph (``DecodeStep.unsupported`` says why; the engine logs it once).

Where the kernels cannot be built the engine runs MindSpore's own ops, with the same results to
float rounding: a step gathers the first S positions of its rows' slots (S = the longest live
length rounded up to a power of two, at least ``MIN_ATTEND``) and masks what each row may not
see, so each (rows, new tokens, S) shape compiles once.

Prompts are prefilled in chunks of at most ``PREFILL_CHUNK`` tokens that attend the cache:
MindSpore's CPU graphs keep every intermediate of a step alive, so chunking bounds prefill
memory, and a caller may run decode steps between the chunks of a long prompt. With the kernels
every prompt's next chunk goes into one step. With MindSpore's ops, chunks that end within the
first ``MIN_ATTEND`` positions (every short prompt, the first chunk of every long one) run
together, one row each, and a chunk that ends further in runs alone: that keeps the shapes few
enough (rows x chunk at one attended length, plus chunk x attended length for one row) that
``warmup`` compiles all of them (each shape costs ~0.5 s + 0.25 s per layer to compile, measured
on the bench-serve shape, so compiling on first use put seconds into long prompts' latency).
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from . import kernels
from .checkpoint import MANIFEST_FILE
from .engine_api import EngineBase, bucket
from .errors import PromptTooLong
from .exported import ExportedEngine
from .forms import say_once, serving_ops
from .loader import load_serving_model
from .memory import CACHE_DTYPES, DTYPE_BYTES, available_memory
from .model import MS_DTYPES, NEG_INF, InternLMForCausalLM, rope_tables

log = logging.getLogger(__name__)


class _Step(nn.Cell):
    """Rows of new tokens (B, T) written into the cache, attending their slots' first S positions
    (with the CPU kernels: each row's own positions); logits (B, V) at each row's ``last_index``."""

    def __init__(self, model, caches):
        super().__init__()
        self.model, self.caches = model, caches

    @ms.jit
    def construct(self, ids, cos, sin, mask, write_index, read_index, last_index, adapters=None):
        h = self.model.hidden(ids, cos, sin, mask, self.caches, write_index, True, adapters, read_index)
        last = ops.gather(h.reshape(-1, h.shape[-1]), last_index, 0)  # (B, C)
        return self.model.lm_head(last).astype(ms.float32)


PREFILL_CHUNK = 128
PREFILL_MIN = 32  # prefill steps compute 32, 64 or 128 tokens a row
MIN_ATTEND = 128  # smallest attended cache length: fewer shapes to compile, little waste


def default_cache_dtype(cpu_kernels: bool) -> str:
    """The KV cache's dtype unless one is asked for: float16 where the CPU kernels serve (their
    attention widens its rows to fp32 as it reads them: half the bytes of an fp32 cache, the same
    greedy tokens on the parity models), float32 on MindSpore's own ops."""
    return "float16" if cpu_kernels else "float32"


def check_cache_dtype(cache_dtype: str) -> str:
    if cache_dtype not in CACHE_DTYPES:
        raise ValueError(f"the KV cache is float32 or float16, not {cache_dtype!r}")
    return cache_dtype


def serving_dtypes(cfg, quantize: str | None = None, cache_dtype: str | None = None) -> tuple[str, str]:
    """(weights, KV cache) dtypes ``open_engine`` holds for ``cfg`` on this machine, which
    ``memory.plan_serving`` sizes a worker by before loading: where the CPU kernels serve
    (``load_serving_model``) the weights as the checkpoint stores them, int8 for an int8 folder or
    one quantised at load (``quantize``), else float32; the cache ``cache_dtype`` where given, else
    ``default_cache_dtype`` (float16 on the CPU kernels)."""
    served = kernels.library() is not None
    cache = check_cache_dtype(cache_dtype) if cache_dtype else default_cache_dtype(served)
    return (cfg.quantization or quantize or cfg.dtype) if served else "float32", cache


class Engine(EngineBase):
    """Runs a model over a slotted KV cache; all inputs and outputs are numpy."""

    def __init__(self, model: InternLMForCausalLM, max_batch: int = 1, max_len: int | None = None,
                 cpu_kernels: bool = True, cache_dtype: str | None = None, native_step: bool = True):
        """``cache_dtype``: the KV cache's, "float32" or "float16"; None: float16 on the CPU kernels
        (``default_cache_dtype``), the model's compute dtype on MindSpore's ops (float32 on CPU).
        ``native_step``: decode-shaped steps as one native call where the model allows it
        (``kernels.DecodeStep``: the same logits as the step graph, without its per-kernel costs);
        False keeps every step on the graph (the parity tests compare the two)."""
        cfg = model.config
        # The serving form is decided once, here: the fused model on the CPU kernels where they run,
        # else on MindSpore's ops (``forms.serving_ops`` logs which and why). A model in that form
        # already (``load_serving_model``'s) is served as it is; a model in another form is left as
        # it is, and the engine serves a new one sharing its weights (``serving_form``).
        self.model, self.config = model.serving_form(serving_ops(model.compute_dtype, cpu_kernels)), cfg
        # Steps with the kernels attend each row's own positions, so their graphs do not depend on
        # the attended length: one compiled shape per (rows, tokens).
        self.kernels = self.model.ops.cpu_kernels
        self.max_batch = max_batch
        self.max_len = max_len or cfg.max_position_embeddings
        if cfg.position_limit is not None and self.max_len > cfg.position_limit:
            raise ValueError(f"max_len {self.max_len} exceeds the model's {cfg.max_position_embeddings} positions")
        # Without the kernels the default is the model's compute dtype, as before (float32 on CPU)
        self.cache_dtype = (check_cache_dtype(cache_dtype) if cache_dtype else
                            default_cache_dtype(True) if self.kernels else model.compute_dtype)
        self.scratch = max_batch  # padding rows write and read this extra slot, never a real one
        shape = ((max_batch + 1) * cfg.kv_heads * self.max_len, cfg.head_dim)
        free = available_memory()
        if free is not None and self.cache_bytes > free:
            raise MemoryError(f"a KV cache of {max_batch} slots x {self.max_len} positions needs "
                              f"{self.cache_bytes / 2**30:.1f} GiB but only {free / 2**30:.1f} GiB of memory is "
                              "available; lower max_batch or max_len")
        self.caches = ms.ParameterTuple([
            Parameter(ops.zeros(shape, MS_DTYPES[self.cache_dtype]), name=f"kv_cache.{i // 2}.{'kv'[i % 2]}",
                      requires_grad=False)
            for i in range(2 * cfg.num_layers)])
        self.native_step = native_step
        self._build_steps()
        self.shapes_run: set[tuple[int, int, int]] = set()  # (rows, tokens, attended) shapes the graph ran
        self.lock = threading.Lock()  # one step at a time: the cache is shared state
        self.prefill_chunk = PREFILL_CHUNK  # a caller may run decode steps between a prompt's chunks
        self.adapters: dict[str, int] = {}  # LoRA adapter name -> index (0 is "no adapter")
        self.adapters_version = 0  # bumped by every load: KV rows computed before may be stale
        self._adapter_weights: list = []  # (AdapterSpec, {name: array}) for index 1, 2, ...
        self._targets: tuple = ()  # LoRA target names (wq, ...) that have adapter stacks

    @property
    def cache_bytes_per_slot(self) -> int:
        cfg = self.config
        return 2 * cfg.num_layers * self.max_len * cfg.kv_heads * cfg.head_dim * DTYPE_BYTES[self.cache_dtype]

    @property
    def quantization(self) -> str | None:
        """"int8" or "int4" where the linears are served so, with their scales (a quantised folder,
        or one quantised at load), else None (the weights in ``config.dtype`` or fp32)."""
        import mindspore as ms

        from .model import Linear

        held = {c.weight.dtype for _, c in self.model.cells_and_names()
                if isinstance(c, Linear) and c.weight_scale is not None}
        return "int4" if ms.uint8 in held else "int8" if held else None

    @property
    def weight_bytes(self) -> int:
        """Bytes of the model's parameters as held (packed weights, scales, adapters; not the cache)."""
        return sum(p.nbytes for p in self.model.get_parameters())

    @property
    def cache_bytes(self) -> int:
        """Bytes of KV cache allocated (the slots plus the scratch slot)."""
        return (self.max_batch + 1) * self.cache_bytes_per_slot

    def load_adapter(self, name: str, folder) -> int:
        """Serve the LoRA adapter in ``folder`` as ``name`` (replacing one of that name); its index.

        Every adapter's A/B are stacked per target linear (row 0 zeros, ranks padded to the
        largest, alpha/rank folded into B), so one batch mixes adapters row by row. The steps
        recompile once for the new shapes. Raises ``lora.AdapterError`` for a folder that is
        not an adapter of this model.
        """
        from .lora import load_adapter

        if not name or not isinstance(name, str):
            raise ValueError("an adapter needs a non-empty name")
        spec, weights = load_adapter(folder, self.config)
        with self.lock:
            if name in self.adapters:
                self._adapter_weights[self.adapters[name] - 1] = (spec, weights)
            else:
                self._adapter_weights.append((spec, weights))
                self.adapters[name] = len(self._adapter_weights)
            self._install_adapters()
            self.adapters_version += 1
        return self.adapters[name]

    def _install_adapters(self) -> None:
        from .lora import target_modules

        # Every target any adapter has used keeps its stacks (zeros where no adapter has it now), so a
        # replaced adapter leaves nothing of itself behind.
        self._targets = tuple(sorted(set(self._targets) |
                                     {t for spec, _ in self._adapter_weights for t in spec.targets}))
        targets = self._targets
        rank = max(spec.rank for spec, _ in self._adapter_weights)
        n = len(self._adapter_weights) + 1
        # A fused projection (wqkv, w13) takes its parts' A stacked and their B block-diagonal, so
        # each part's rows see only its own adapter: one LoRA matmul pair per fused matmul.
        groups: dict[int, tuple] = {}
        for module in target_modules(self.config, targets):
            lin, part, sizes = self.model.linear_for(module)
            groups.setdefault(id(lin), (lin, sizes, []))[2].append((module, part))
        for lin, sizes, members in groups.values():
            out_f, in_f, parts = lin.d_out, lin.d_in, len(sizes)
            a = np.zeros((n, parts * rank, in_f), np.float32)
            b = np.zeros((n, out_f, parts * rank), np.float32)
            for module, part in members:
                r0, o0, rows = part * rank, sum(sizes[:part]), sizes[part]
                for i, (spec, w) in enumerate(self._adapter_weights, 1):
                    if f"{module}.lora_a" in w and module.rsplit(".", 1)[1] in spec.targets:
                        a[i, r0:r0 + spec.rank] = w[f"{module}.lora_a"]
                        b[i, o0:o0 + rows, r0:r0 + spec.rank] = w[f"{module}.lora_b"] * spec.scaling
            for attr, value in (("lora_a", a), ("lora_b", b)):
                old = getattr(lin, attr)
                if old is not None and tuple(old.shape) == value.shape:
                    # in place: compiled graphs keep reading this memory (set_data would leave them stale)
                    ops.assign(old, Tensor(value, self.model.dtype))
                else:
                    name = f"{lin.weight.name.rsplit('.', 1)[0]}.{attr}"  # e.g. model.layers.0.attention.wqkv.lora_a
                    setattr(lin, attr, Parameter(Tensor(value, self.model.dtype), name=name, requires_grad=False))
        self._build_steps()

    def _build_steps(self) -> None:
        # New parameter shapes (adapters): fresh step cells compile for them (the KV cache is shared, not copied).
        self._step = _Step(self.model, self.caches)
        # Decode-shaped steps as one native call where the model allows it (decided once per build, the
        # reason logged once; rebuilt with every adapter load, whose stacks it copies)
        why = "not asked for" if not self.native_step else kernels.DecodeStep.unsupported(self.model)
        self._native = None if why else kernels.DecodeStep(self.model, self.caches)
        say_once(logging.INFO, "decode steps: one native call" if why is None else
                 f"decode steps: the step graph ({why})")

    @property
    def decodes_natively(self) -> bool:
        """Whether decode-shaped steps run as one native call, which compiles nothing for a new row
        count (else a step of rows not warmed up compiles a graph first)."""
        return self._native is not None

    def _adapter_indices(self, adapters, n: int):
        """None when no adapter is loaded (the plain graphs, bit-identical to an engine without
        LoRA), else the (n,) int32 indices (numpy), checked."""
        idx = np.zeros(n, np.int32) if adapters is None else np.asarray(adapters, np.int32).reshape(-1)
        if idx.shape != (n,):
            raise ValueError(f"expected {n} adapter indices, got {idx.size}")
        if idx.min() < 0 or idx.max() > len(self._adapter_weights):
            raise ValueError(f"adapter index out of range 0..{len(self._adapter_weights)}")
        return idx if self._adapter_weights else None

    def warmup(self, verify_rows: int = 0) -> int:
        """Compile every shape serving can meet now, so that no request waits for a compile later:
        decode and prefill chunks for each rows bucket (with MindSpore's ops also per attended
        length, and chunks further in than ``MIN_ATTEND`` one row each), and decode-shaped steps of
        up to ``verify_rows`` rows (``verify``: speculative decoding); with the native decode step no
        decode shape (it compiles nothing). Returns the number of shapes. Writes only positions that
        no sequence holds yet (call it before serving)."""
        graph_decode = self._native is None
        extra = sorted({self._rows(n) for n in range(self.max_batch + 1, verify_rows + 1)}) if graph_decode else []
        for b in extra:  # every row the first position of slot 0
            self._run([0] * b, [[0]] * b, np.zeros(b, np.int64), np.ones(b, np.int64))
        rows = sorted({self._rows(n) for n in range(1, self.max_batch + 1)})
        chunks = sorted({self._chunk(n) for n in range(2, min(PREFILL_CHUNK, self.max_len - 1) + 1)})
        lengths = [0] if self.kernels else sorted({self._attend(n) for n in range(1, self.max_len + 1)})
        for b in rows:
            for a in lengths if graph_decode else []:
                self.decode(np.zeros(b, np.int32), np.full(b, max(a, 1) - 1), slots=list(range(b)))
            for t in chunks:
                self.prefill(list(range(b)), [[0] * min(t, self.max_len - 1)] * b)  # same bucket as t
        far = [a for a in lengths if a > MIN_ATTEND]
        for a in far:
            for t in chunks:  # one row, its chunk ending at the last position of the attended length
                end = min(a, self.max_len - 1)
                self._run([0], [[0] * t], [end - t], [end])
        return len(rows) * (len(lengths) * graph_decode + len(chunks)) + len(far) * len(chunks) + len(extra)

    def _chunk(self, n: int) -> int:
        """Tokens a prefill step computes for a chunk of n (> 1) tokens: few shapes to compile."""
        return bucket(n, PREFILL_CHUNK, start=PREFILL_MIN)

    def _attend(self, end: int) -> int:
        """Cache positions a step attends when its longest row ends at ``end``."""
        return min(bucket(end, self.max_len, start=MIN_ATTEND), self.max_len)

    def _rows(self, n: int) -> int:
        """Rows a step runs for n sequences: a power of two, at most the slots (more only for a
        ``verify`` step, whose rows are tokens: several of one slot)."""
        return min(bucket(n, self.max_batch, start=1), self.max_batch) if n <= self.max_batch else bucket(n, 2 * n, 1)

    def _run(self, slots, chunks, starts, seq_lens, adapters=None) -> np.ndarray:
        """One compiled step: ``chunks[i]`` (new tokens) go into slot ``slots[i]`` at positions
        ``starts[i]``...; logits (n, V) after each chunk's last token."""
        cfg, L = self.config, self.max_len
        n = len(chunks)
        extra = self._adapter_indices(adapters, n)
        longest = max(len(c) for c in chunks)
        t = 1 if longest == 1 else self._chunk(longest)  # decode, or a prefill bucket
        native = self._native is not None and t == 1
        b = n if native else self._rows(n)  # the native step runs the rows it is given: no compiled shapes
        ends = np.array([s + len(c) for s, c in zip(starts, chunks)])
        if ends.max() > L:
            raise PromptTooLong("sequence reached the cache length")
        attend = 0 if self.kernels else self._attend(int(ends.max()))  # the kernels read each row's own
        slots_b = np.full(b, self.scratch, np.int64)
        slots_b[:n] = slots
        starts_b = np.zeros(b, np.int64)
        starts_b[:n] = starts
        lens = np.ones(b, np.int64)
        lens[:n] = [len(c) for c in chunks]
        seq_b = np.ones(b, np.int64)
        seq_b[:n] = seq_lens
        ids = np.zeros((b, t), np.int32)
        for i, c in enumerate(chunks):
            ids[i, :len(c)] = c
        j = np.arange(t)
        positions = starts_b[:, None] + j[None, :]  # (b, t)
        cos, sin = rope_tables(cfg, positions, seq_b)  # (b, 1, t, hd)
        cos, sin = self.model.rope_inputs(cos, sin)
        valid = j[None, :] < lens[:, None]
        # (slot * heads + head) * L + position over the k/v heads, in the (rows, heads, tokens) order of
        # the new k/v; padding tokens go to distinct scratch positions (never a live slot or past the cache)
        nh = cfg.kv_heads
        heads = np.arange(nh)[None, :, None]
        base = (slots_b[:, None, None] * nh + heads) * L  # (b, nh, 1)
        scratch = (self.scratch * nh + heads) * L + (np.arange(b * t) % L).reshape(b, 1, t)
        write = np.where(valid[:, None, :], base + np.minimum(positions, L - 1)[:, None, :], scratch).reshape(-1)
        if self.kernels:  # each (row, head)'s first cache row, and each query's position (forms.ServingKernels)
            read = base[:, :, 0]
            mask = np.minimum(positions, L - 1).astype(np.int32)
            if native:  # the same inputs, one token a row, to the one native call
                with self.lock:
                    return self._native(ids[:, 0], cos.reshape(b, -1), sin.reshape(b, -1), write, read, mask, extra)
            mask = Tensor(mask)
        else:
            read = base + np.arange(attend)[None, None, :]  # (b, nh, S)
            ok = np.arange(attend)[None, None, :] <= positions[:, :, None]  # key j <= query position
            mask = Tensor(np.where(ok, 0.0, NEG_INF).astype(np.float32)[:, None])  # (b, 1, t, S)
        last = (np.arange(b) * t + lens - 1).astype(np.int32)
        args = (Tensor(ids), Tensor(cos), Tensor(sin), mask, Tensor(write.astype(np.int32)),
                Tensor(read.astype(np.int32)), Tensor(last))
        if extra is not None:  # padding rows use no adapter
            args += (Tensor(np.pad(extra, (0, b - n))),)
        with self.lock:
            self.shapes_run.add((b, t, attend))
            return self._step(*args).asnumpy()[:n]

    def prefill(self, slots: list[int], prompts: list[list[int]], adapters=None, starts=None,
                ends=None) -> np.ndarray:
        """Write each prompt into its slot's cache; logits (B, V) after each prompt's last token.

        ``adapters`` (B,) picks each row's LoRA adapter by index (0 or None: the base model).
        ``starts`` (B,): the first ``starts[i]`` tokens of prompt i are already in its slot (only
        the rest is computed). ``ends`` (B,): compute only up to there now (a caller feeding a long
        prompt in pieces; rows that do not reach their prompt's end get zero logits). The rotary
        tables always see the whole prompt's length, so with dynamic NTK a prompt fed in pieces
        gets the rotation a one-pass forward gives it. Prompts go through in chunks of
        ``PREFILL_CHUNK`` tokens."""
        for p in prompts:
            self.check_prompt(len(p))
        self._check_slots(slots)
        starts = np.zeros(len(prompts), np.int64) if starts is None else np.asarray(starts, np.int64)
        lengths = np.array([len(p) for p in prompts])
        stop = lengths if ends is None else np.minimum(np.asarray(ends, np.int64), lengths)
        out = np.zeros((len(prompts), self.config.vocab_size), np.float32)
        pos = starts.copy()
        while (pos < stop).any():
            going = np.flatnonzero(pos < stop)
            near = going[np.minimum(pos[going] + PREFILL_CHUNK, stop[going]) <= MIN_ATTEND]
            # chunks near the start together, each chunk further in alone (see the module docstring)
            groups = [going] if self.kernels else [near] * bool(len(near)) + [np.array([i]) for i in going
                                                                                if i not in near]
            for rows in groups:
                chunks = [prompts[i][pos[i]:min(pos[i] + PREFILL_CHUNK, stop[i])] for i in rows]
                logits = self._run([slots[i] for i in rows], chunks, pos[rows], lengths[rows],
                                   None if adapters is None else np.asarray(adapters)[rows])
                pos[rows] += [len(c) for c in chunks]
                done = pos[rows] >= lengths[rows]
                out[rows[done]] = logits[done]
        return out

    def decode(self, tokens: np.ndarray, positions: np.ndarray, adapters=None, slots=None) -> np.ndarray:
        """One token per row at ``positions``; logits (rows, V).

        Without ``slots`` the rows are every slot (0..max_batch-1); with ``slots`` only those
        slots run, so a step costs the live sequences. Slot s sees cache positions 0..positions[s].
        ``adapters`` picks each row's LoRA adapter by index (0 or None: the base).
        """
        tokens = np.asarray(tokens, np.int32).reshape(-1)
        positions = np.asarray(positions, np.int64).reshape(-1)
        slots = list(range(self.max_batch)) if slots is None else [int(s) for s in slots]
        if not len(tokens) == len(positions) == len(slots):
            raise ValueError(f"decode takes one token and position per slot, got {len(tokens)}, {len(positions)}, "
                             f"{len(slots)}")
        self._check_slots(slots)
        if positions.max() >= self.max_len:
            raise PromptTooLong("sequence reached the cache length")
        return self._run(slots, [[int(t)] for t in tokens], positions, positions + 1, adapters)


    def verify(self, slots: list[int], chunks: list[list[int]], starts, adapters=None) -> list[np.ndarray]:
        """Speculative decoding's check: ``chunks[i]`` (the slot's last token, then proposed ones) go
        into slot ``slots[i]`` at positions ``starts[i]``...; the logits (len(chunks[i]), V) after
        each of their tokens.

        Every token is a row of its own in one decode-shaped step (one query, ``Tq == 1``): the
        kernels write all the step's new k/v rows before any query reads, so a row attends its
        slot's positions up to its own, the ones this step wrote included, exactly as a decode of
        that token would, and its logits are decode's to the bit (a chunk of ``Tq > 1`` would take
        ``attend_block``'s online softmax and round differently). ``adapters[i]``: slot i's."""
        if not self.kernels:  # MindSpore's ops attend a length that follows the step's longest row
            raise NotImplementedError("verify needs the CPU kernels (on MindSpore's ops the attended length, "
                                      "hence the rounding, would differ from decode's)")
        self._check_slots(slots)
        rows = [(s, int(t), int(p) + j) for s, c, p in zip(slots, chunks, starts) for j, t in enumerate(c)]
        if not rows:
            return []
        row_slots, tokens, positions = (list(x) for x in zip(*rows))
        positions = np.asarray(positions, np.int64)
        if positions.max() >= self.max_len:
            raise PromptTooLong("sequence reached the cache length")
        row_adapters = None if adapters is None else np.repeat(np.asarray(adapters, np.int32),
                                                               [len(c) for c in chunks])
        logits = self._run(row_slots, [[t] for t in tokens], positions, positions + 1, row_adapters)
        return np.split(logits, np.cumsum([len(c) for c in chunks])[:-1])


def open_engine(folder, max_batch: int = 1, max_len: int | None = None, quantize: str | None = None,
                cache_dtype: str | None = None) -> EngineBase:
    """An engine for a model folder: a checkpoint folder (its weights held in the precision the file
    stores, on the CPU kernels: ``loader.load_serving_model``; ``quantize="int8"`` quantises a float
    folder's linears to int8 while loading; its KV cache ``cache_dtype``, by default float16 on the
    kernels), or an exported MindIR pair (its cache in the dtype it was exported with)."""
    folder = Path(folder)
    if (folder / MANIFEST_FILE).is_file():
        if quantize:
            raise ValueError(f"{folder} is an exported model: it cannot be quantised at load")
        if cache_dtype:
            log.info("an exported model keeps the KV cache dtype it was exported with; %s not used", cache_dtype)
        return ExportedEngine(folder, max_batch=max_batch, max_len=max_len)
    return Engine(load_serving_model(folder, quantize), max_batch=max_batch, max_len=max_len, cache_dtype=cache_dtype)
