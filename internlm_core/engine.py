"""A model with a preallocated, slotted KV cache and two compiled steps: prefill and decode.

The cache holds ``max_batch`` slots of ``max_len`` positions per layer, (slots, nh, L, hd).
Each sequence owns a slot, so sequences of different lengths sit side by side with their
own positions; nothing is padded on the left and padding never reaches a real row. Decode
always runs every slot (one static shape, one compile); idle slots compute garbage that
nobody reads. Prefill lengths are rounded up to a few buckets so they compile a few times.
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
    def construct(self, ids, cos, sin, mask, cache_index, last_index):
        h = self.model.hidden(ids, cos, sin, mask, self.caches, cache_index, False)
        last = ops.gather(h.reshape(-1, h.shape[-1]), last_index, 0)  # (B, C) at each row's last token
        return self.model.lm_head(last).astype(ms.float32)


class _DecodeStep(nn.Cell):
    def __init__(self, model, caches):
        super().__init__()
        self.model, self.caches = model, caches

    @ms.jit
    def construct(self, ids, cos, sin, mask, cache_index):
        h = self.model.hidden(ids, cos, sin, mask, self.caches, cache_index, True)
        return self.model.lm_head(h[:, 0]).astype(ms.float32)


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
        self._decode = _DecodeStep(model, self.caches)
        self._heads = np.arange(cfg.num_heads)[None, :, None]
        self.lock = threading.Lock()  # one step at a time: the cache is shared state
        self.adapters: dict[str, int] = {}  # LoRA adapter name -> index (0 is "no adapter")

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

    def prefill(self, slots: list[int], prompts: list[list[int]]) -> np.ndarray:
        """Write each prompt into its slot's cache; logits (B, V) after each prompt's last token."""
        for p in prompts:
            self.check_prompt(len(p))
        b = len(prompts)
        lengths = np.array([len(p) for p in prompts])
        t = _bucket(int(lengths.max()), self.max_len)
        ids = np.zeros((b, t), np.int32)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = p
        positions = np.broadcast_to(np.arange(t), (b, t))
        cos, sin = rope_tables(self.config, positions, lengths)
        index = np.stack(np.broadcast_arrays(np.asarray(slots)[:, None, None], self._heads,
                                             positions[:, None, :]), -1).astype(np.int32)
        last = (np.arange(b) * t + lengths - 1).astype(np.int32)
        with self.lock:
            out = self._prefill(Tensor(ids), Tensor(cos), Tensor(sin), Tensor(causal_mask(lengths, t)),
                                Tensor(index), Tensor(last))
            return out.asnumpy()

    def decode(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One token per slot at ``positions`` (max_batch,); logits (max_batch, V).

        Slot s sees cache positions 0..positions[s]; give idle slots position 0.
        """
        positions = np.asarray(positions, np.int64)
        if positions.max() >= self.max_len:
            raise PromptTooLong("sequence reached the cache length")
        cos, sin = rope_tables(self.config, positions[:, None], positions + 1)
        ok = np.arange(self.max_len)[None, :] <= positions[:, None]
        mask = np.where(ok, 0.0, NEG_INF).astype(np.float32)[:, None, None, :]
        index = np.stack(np.broadcast_arrays(np.arange(self.max_batch)[:, None, None], self._heads,
                                             positions[:, None, None]), -1).astype(np.int32)
        with self.lock:
            out = self._decode(Tensor(np.asarray(tokens, np.int32).reshape(-1, 1)), Tensor(cos), Tensor(sin),
                               Tensor(mask), Tensor(index))
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
