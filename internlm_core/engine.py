"""A model with a preallocated, slotted KV cache and two compiled steps: prefill and decode.

The cache holds ``max_batch`` slots of ``max_len`` positions per layer, (slots, nh, L, hd).
Each sequence owns a slot, so sequences of different lengths sit side by side with their
own positions; nothing is padded on the left and padding never reaches a real row. Decode
always runs every slot (one static shape, one compile); idle slots compute garbage that
nobody reads. Prefill lengths are rounded up to a few buckets so they compile a few times.

Long prompts are prefilled in chunks of ``PREFILL_CHUNK`` tokens that attend their slot's
cache: MindSpore's CPU graphs keep every intermediate of a step alive (a 512-token prefill
of a 100M model took 1.3 GB in one piece), so chunking bounds prefill memory by the chunk.
"""
from __future__ import annotations

import threading

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from .model import NEG_INF, InternLMForCausalLM, causal_mask, rope_tables


class PromptTooLong(ValueError):
    pass


class AdapterNotFound(KeyError):
    """A request named a LoRA adapter that this engine does not hold (never fall back silently)."""

    def __str__(self):
        return f"unknown adapter {self.args[0]!r}"


class _PrefillStep(nn.Cell):
    def __init__(self, model, caches):
        super().__init__()
        self.model, self.caches = model, caches

    @ms.jit
    def construct(self, ids, cos, sin, mask, cache_index, last_index, adapters=None):
        h = self.model.hidden(ids, cos, sin, mask, self.caches, cache_index, False, adapters)
        last = ops.gather(h.reshape(-1, h.shape[-1]), last_index, 0)  # (B, C) at each row's last token
        return self.model.lm_head(last).astype(ms.float32)


class _DecodeStep(nn.Cell):
    def __init__(self, model, caches):
        super().__init__()
        self.model, self.caches = model, caches

    @ms.jit
    def construct(self, ids, cos, sin, mask, cache_index, adapters=None):
        h = self.model.hidden(ids, cos, sin, mask, self.caches, cache_index, True, adapters)
        return self.model.lm_head(h[:, 0]).astype(ms.float32)


class _ChunkStep(nn.Cell):
    def __init__(self, model, caches):
        super().__init__()
        self.model, self.caches = model, caches

    @ms.jit
    def construct(self, ids, cos, sin, mask, cache_index, last_index, rows, adapters=None):
        h = self.model.hidden(ids, cos, sin, mask, self.caches, cache_index, True, adapters, rows)
        last = ops.gather(h.reshape(-1, h.shape[-1]), last_index, 0)
        return self.model.lm_head(last).astype(ms.float32)


PREFILL_CHUNK = 128


def prefill_inputs(cfg, slots, prompts: list[list[int]], t: int):
    """Host-side inputs of a one-piece prefill of right-padded prompts into their slots:
    ids (B, t), cos/sin, causal mask, cache index (B, nh, t, 3) and each row's last-token index."""
    b = len(prompts)
    lengths = np.array([len(p) for p in prompts])
    ids = np.zeros((b, t), np.int32)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = p
    positions = np.broadcast_to(np.arange(t), (b, t))
    cos, sin = rope_tables(cfg, positions, lengths)
    heads = np.arange(cfg.num_heads)[None, :, None]
    index = np.stack(np.broadcast_arrays(np.asarray(slots)[:, None, None], heads, positions[:, None, :]),
                     -1).astype(np.int32)
    last = (np.arange(b) * t + lengths - 1).astype(np.int32)
    return ids, cos, sin, causal_mask(lengths, t), index, last


def decode_inputs(cfg, tokens, positions, cache_len: int):
    """Host-side inputs of a decode step over every slot: ids (S, 1), cos/sin, a mask that lets
    slot s see cache positions 0..positions[s], and the cache index (S, nh, 1, 3)."""
    positions = np.asarray(positions, np.int64)
    cos, sin = rope_tables(cfg, positions[:, None], positions + 1)
    ok = np.arange(cache_len)[None, :] <= positions[:, None]
    mask = np.where(ok, 0.0, NEG_INF).astype(np.float32)[:, None, None, :]
    heads = np.arange(cfg.num_heads)[None, :, None]
    index = np.stack(np.broadcast_arrays(np.arange(len(positions))[:, None, None], heads,
                                         positions[:, None, None]), -1).astype(np.int32)
    return np.asarray(tokens, np.int32).reshape(-1, 1), cos, sin, mask, index


def _bucket(n: int, cap: int) -> int:
    b = 16
    while b < n:
        b *= 2
    return min(b, cap)


class Engine:
    """Runs a model over a slotted KV cache; all inputs and outputs are numpy."""

    def __init__(self, model: InternLMForCausalLM, max_batch: int = 1, max_len: int | None = None):
        cfg = model.config
        self.model, self.config = model, cfg
        self.max_batch = max_batch
        self.max_len = max_len or cfg.max_position_embeddings
        if self.max_len > cfg.max_position_embeddings and cfg.rope_scaling != "dynamic":
            raise ValueError(f"max_len {self.max_len} exceeds the model's {cfg.max_position_embeddings} positions")
        shape = (max_batch, cfg.num_heads, self.max_len, cfg.head_dim)
        self.caches = ms.ParameterTuple([
            Parameter(ops.zeros(shape, model.dtype), name=f"kv_cache.{i // 2}.{'kv'[i % 2]}", requires_grad=False)
            for i in range(2 * cfg.num_layers)])
        self._prefill = _PrefillStep(model, self.caches)
        self._chunk = _ChunkStep(model, self.caches)
        self._decode = _DecodeStep(model, self.caches)
        self._heads = np.arange(cfg.num_heads)[None, :, None]
        self.lock = threading.Lock()  # one step at a time: the cache is shared state
        self.adapters: dict[str, int] = {}  # LoRA adapter name -> index (0 is "no adapter")
        self._adapter_weights: list = []  # (AdapterSpec, {name: array}) for index 1, 2, ...
        self._targets: tuple = ()  # LoRA target names (wq, ...) that have adapter stacks

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
        for module in target_modules(self.config, targets):
            lin = self.model
            for part in module.split("."):
                lin = lin[int(part)] if part.isdigit() else getattr(lin, part)
            out_f, in_f = lin.weight.shape
            a, b = np.zeros((n, rank, in_f), np.float32), np.zeros((n, out_f, rank), np.float32)
            for i, (spec, w) in enumerate(self._adapter_weights, 1):
                if f"{module}.lora_a" in w and module.rsplit(".", 1)[1] in spec.targets:
                    a[i, :spec.rank] = w[f"{module}.lora_a"]
                    b[i, :, :spec.rank] = w[f"{module}.lora_b"] * spec.scaling
            for attr, value in (("lora_a", a), ("lora_b", b)):
                old = getattr(lin, attr)
                if old is not None and tuple(old.shape) == value.shape:
                    # in place: compiled graphs keep reading this memory (set_data would leave them stale)
                    ops.assign(old, Tensor(value, self.model.dtype))
                else:
                    setattr(lin, attr, Parameter(Tensor(value, self.model.dtype), name=f"{module}.{attr}",
                                                 requires_grad=False))
        # New parameter shapes: fresh step cells compile for them (the KV cache is shared, not copied).
        self._prefill = _PrefillStep(self.model, self.caches)
        self._chunk = _ChunkStep(self.model, self.caches)
        self._decode = _DecodeStep(self.model, self.caches)

    def _adapter_tensor(self, adapters, n: int):
        """None when no adapter is loaded (the plain graphs, bit-identical to an engine without
        LoRA), else the (n,) int32 indices, checked."""
        idx = np.zeros(n, np.int32) if adapters is None else np.asarray(adapters, np.int32).reshape(-1)
        if idx.shape != (n,):
            raise ValueError(f"expected {n} adapter indices, got {idx.size}")
        if idx.min() < 0 or idx.max() > len(self._adapter_weights):
            raise ValueError(f"adapter index out of range 0..{len(self._adapter_weights)}")
        return Tensor(idx) if self._adapter_weights else None

    def adapter_index(self, name: str | None) -> int:
        if not name:
            return 0
        if name not in self.adapters:
            raise AdapterNotFound(name)
        return self.adapters[name]

    def check_prompt(self, n: int) -> None:
        if n == 0:
            raise PromptTooLong("empty prompt")
        if n >= self.max_len:
            raise PromptTooLong(f"prompt of {n} tokens leaves no room in the model's {self.max_len} positions")

    def prefill(self, slots: list[int], prompts: list[list[int]], adapters=None) -> np.ndarray:
        """Write each prompt into its slot's cache; logits (B, V) after each prompt's last token.

        ``adapters`` (B,) picks each row's LoRA adapter by index (0 or None: the base model)."""
        for p in prompts:
            self.check_prompt(len(p))
        b = len(prompts)
        extra = self._adapter_tensor(adapters, b)
        lengths = np.array([len(p) for p in prompts])
        if lengths.max() > PREFILL_CHUNK:
            return self._prefill_chunked(slots, prompts, lengths, extra)
        t = _bucket(int(lengths.max()), self.max_len)
        args = tuple(Tensor(a) for a in prefill_inputs(self.config, slots, prompts, t))
        with self.lock:
            out = self._prefill(*args) if extra is None else self._prefill(*args, extra)
            return out.asnumpy()

    def _prefill_chunked(self, slots, prompts, lengths, extra) -> np.ndarray:
        """Prefill chunk by chunk; each chunk attends the cache written so far for its slots."""
        b, c, L = len(prompts), PREFILL_CHUNK, self.max_len
        slots = np.asarray(slots)
        out = None
        for start in range(0, int(lengths.max()), c):
            positions = np.broadcast_to(start + np.arange(c), (b, c))
            ids = np.zeros((b, c), np.int32)
            for i, p in enumerate(prompts):
                part = p[start:start + c]
                ids[i, :len(part)] = part
            cos, sin = rope_tables(self.config, positions, lengths)
            # key j is visible to the query at position q if j <= q and j is a real token of the row
            j = np.arange(L)
            ok = (j[None, None, :] <= positions[:, :, None]) & (j[None, None, :] < lengths[:, None, None])
            mask = np.where(ok, 0.0, NEG_INF).astype(np.float32)[:, None]
            # padding past the cache end is parked on its last position, which no real token uses yet
            write = np.minimum(positions, L - 1)
            index = np.stack(np.broadcast_arrays(slots[:, None, None], self._heads, write[:, None, :]),
                             -1).astype(np.int32)
            last = (np.arange(b) * c + np.clip(lengths - 1 - start, 0, c - 1)).astype(np.int32)
            with self.lock:
                args = (Tensor(ids), Tensor(cos), Tensor(sin), Tensor(mask), Tensor(index), Tensor(last),
                        Tensor(slots.astype(np.int32)))
                logits = (self._chunk(*args) if extra is None else self._chunk(*args, extra)).asnumpy()
            out = logits if out is None else out
            done_here = (lengths - 1 >= start) & (lengths - 1 < start + c)
            out[done_here] = logits[done_here]
        return out

    def decode(self, tokens: np.ndarray, positions: np.ndarray, adapters=None) -> np.ndarray:
        """One token per slot at ``positions`` (max_batch,); logits (max_batch, V).

        Slot s sees cache positions 0..positions[s]; give idle slots position 0.
        ``adapters`` (max_batch,) picks each slot's LoRA adapter by index (0 or None: the base).
        """
        extra = self._adapter_tensor(adapters, self.max_batch)
        positions = np.asarray(positions, np.int64)
        if positions.max() >= self.max_len:
            raise PromptTooLong("sequence reached the cache length")
        args = tuple(Tensor(a) for a in decode_inputs(self.config, tokens, positions, self.max_len))
        with self.lock:
            out = self._decode(*args) if extra is None else self._decode(*args, extra)
            return out.asnumpy()


def open_engine(folder, max_batch: int = 1, max_len: int | None = None):
    """An engine for a model folder: a checkpoint folder, or an exported MindIR pair."""
    from pathlib import Path

    from .loader import load_model

    folder = Path(folder)
    if (folder / "mindir_manifest.json").is_file():
        from .export import ExportedEngine

        return ExportedEngine(folder, max_batch=max_batch, max_len=max_len)
    return Engine(load_model(folder), max_batch=max_batch, max_len=max_len)
