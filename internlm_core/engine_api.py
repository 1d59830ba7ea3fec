"""The engine interface: what the batcher, ``generate`` and the worker call, which ``Engine``
(a checkpoint, compiled steps over a slotted KV cache) and ``ExportedEngine`` (an exported MindIR
pair) both implement in full; and the host-side step inputs both build.

    logits = engine.prefill(slots, prompts, adapters=None, starts=None, ends=None)  # (B, V) after each prompt
    logits = engine.decode(tokens, positions, adapters=None, slots=None)  # (rows, V), one token a row

Callers never probe for capabilities: an engine that cannot do something (an exported one with
adapters or with a prompt started mid-way) refuses it with an error that says so.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from .config import Config
from .errors import AdapterError, AdapterNotFound, PromptTooLong
from .model import NEG_INF, causal_mask, rope_tables


class EngineBase(ABC):
    config: Config
    max_batch: int                # slots: sequences that can be in flight at once
    max_len: int                  # positions per slot: prompt + generated tokens
    prefill_chunk: int | None     # tokens a prefill step takes from each prompt (None: whole prompts)
    adapters: dict[str, int]      # LoRA adapter name -> index (0: the base model)
    adapters_version: int         # bumped by every adapter load (KV rows computed before may be stale)
    kernels: bool = False         # steps run the project's CPU kernels (``kernels``), not only MindSpore's ops
    cache_dtype: str = "float32"  # the KV cache's dtype (``Engine``: float16 by default on the CPU kernels)

    @property
    @abstractmethod
    def cache_bytes(self) -> int:
        """KV cache bytes allocated."""

    @property
    @abstractmethod
    def cache_bytes_per_slot(self) -> int:
        """KV cache bytes of one sequence of ``max_len`` positions."""

    @abstractmethod
    def prefill(self, slots: list[int], prompts: list[list[int]], adapters=None, starts=None,
                ends=None) -> np.ndarray:
        """Write each prompt (from ``starts[i]`` on: the rows before are already in the slot; up to
        ``ends[i]`` if given: a piece of a long prompt now, the rest later) into its slot's cache;
        logits (B, V) after each prompt's last token."""

    @abstractmethod
    def decode(self, tokens: np.ndarray, positions: np.ndarray, adapters=None, slots=None) -> np.ndarray:
        """One token per row at ``positions`` of ``slots`` (default: every slot); logits (rows, V)."""

    @abstractmethod
    def warmup(self) -> int:
        """Compile (or otherwise prepare) the step shapes serving will use; how many."""

    def load_adapter(self, name: str, folder) -> int:
        """Serve a LoRA adapter under ``name``; its index. Engines without adapter support refuse."""
        raise AdapterError(f"{type(self).__name__} cannot serve LoRA adapters (an exported model has none)")

    def adapter_index(self, name: str | None) -> int:
        if not name:
            return 0
        if name not in self.adapters:
            raise AdapterNotFound(name)
        return self.adapters[name]

    def _check_slots(self, slots) -> None:
        if any(not 0 <= s < self.max_batch for s in slots) or len(set(slots)) != len(slots):
            raise ValueError(f"slots {list(slots)} must be distinct and in 0..{self.max_batch - 1}")

    def check_prompt(self, n: int) -> None:
        if n == 0:
            raise ValueError("empty prompt: at least one token is needed")
        if n >= self.max_len:
            raise PromptTooLong(f"prompt of {n} tokens leaves no room in the model's {self.max_len} positions")


# ---- host-side step inputs ------------------------------------------------------------------

def prefill_inputs(cfg, slots, prompts: list[list[int]], t: int):
    """Host-side inputs of a one-piece prefill of right-padded prompts into their slots:
    ids (B, t), cos/sin, causal mask, cache index (B, n_kv, t, 3) and each row's last-token index."""
    b = len(prompts)
    lengths = np.array([len(p) for p in prompts])
    ids = np.zeros((b, t), np.int32)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = p
    positions = np.broadcast_to(np.arange(t), (b, t))
    cos, sin = rope_tables(cfg, positions, lengths)
    heads = np.arange(cfg.kv_heads)[None, :, None]
    index = np.stack(np.broadcast_arrays(np.asarray(slots)[:, None, None], heads, positions[:, None, :]),
                     -1).astype(np.int32)
    last = (np.arange(b) * t + lengths - 1).astype(np.int32)
    return ids, cos, sin, causal_mask(lengths, t), index, last


def decode_inputs(cfg, tokens, positions, cache_len: int):
    """Host-side inputs of a decode step over every slot: ids (S, 1), cos/sin, a mask that lets
    slot s see cache positions 0..positions[s], and the cache index (S, n_kv, 1, 3)."""
    positions = np.asarray(positions, np.int64)
    cos, sin = rope_tables(cfg, positions[:, None], positions + 1)
    ok = np.arange(cache_len)[None, :] <= positions[:, None]
    mask = np.where(ok, 0.0, NEG_INF).astype(np.float32)[:, None, None, :]
    heads = np.arange(cfg.kv_heads)[None, :, None]
    index = np.stack(np.broadcast_arrays(np.arange(len(positions))[:, None, None], heads,
                                         positions[:, None, None]), -1).astype(np.int32)
    return np.asarray(tokens, np.int32).reshape(-1, 1), cos, sin, mask, index


def bucket(n: int, cap: int, start: int = 16) -> int:
    """The smallest power-of-two multiple of ``start`` that holds n, at most ``cap``."""
    b = start
    while b < n:
        b *= 2
    return min(b, cap)
