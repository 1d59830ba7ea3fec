"""What serving, fine-tuning or converting a model takes in memory, decided from its config
before any weight is read.

A worker started with its defaults must come up on the machine it is given: the slots and positions
it would like (``DEFAULT_SLOTS`` x the model's positions, at most ``DEFAULT_MAX_LEN``) are cut down
until the weights, the KV cache and the runtime fit the memory available, and the reason is logged.
What the caller sets explicitly is kept, or refused with the numbers and the flags that would fit;
a model whose weights and smallest cache cannot fit is refused before loading, rather than the
kernel killing the process half-way through reading its weights.

Framework-free: the job checks and the worker read it without loading MindSpore.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from .config import Config
from .errors import TooLarge

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}  # quantised weights: ``weight_bytes`` (quantize.SCHEMES)
CACHE_DTYPES = ("float32", "float16")  # what the engine's KV cache can be held in
DEFAULT_SLOTS = 8
DEFAULT_MAX_LEN = 4096  # positions per slot by default: a 32k-position model's full context per slot
# would spend the memory on room few CPU requests use (a 32k prompt takes minutes to prefill here)
MIN_LEN = 256  # the smallest cache worth serving with
RUNTIME_BYTES = 768 << 20  # MindSpore's own (~0.5 GB of RSS after import), compiled steps, logits
MARGIN = 0.9  # of the memory available: page cache and allocator slack


ENV_LIMIT = "INTERNLM_MEMORY_LIMIT"  # bytes (or with a K/M/G suffix) this process may plan to use


def _parse_bytes(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def available_memory() -> int | None:
    """Bytes a new allocation can take: the kernel's MemAvailable, less where this process's cgroup
    (a container's memory limit) leaves less, and at most ``$INTERNLM_MEMORY_LIMIT`` (an operator's
    cap, e.g. for a worker sharing its machine); None where none of them is known."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except OSError:
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read())
        if limit != "max":
            found.append(int(limit) - used)
    except (OSError, ValueError):
        pass
    if os.environ.get(ENV_LIMIT):
        try:
            found.append(_parse_bytes(os.environ[ENV_LIMIT]))
        except ValueError:
            raise ValueError(f"{ENV_LIMIT} must be a number of bytes (with K, M or G), got "
                             f"{os.environ[ENV_LIMIT]!r}") from None
    return max(min(found), 0) if found else None


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def weight_bytes(cfg: Config, dtype: str) -> int:
    """Bytes of the weights held as ``dtype``. int8 and int4 are the linears' (``quantize.quantized_names``):
    a byte (int8) or half a byte (int4) a weight and a float32 scale an output row (int8) or an output
    row's group (int4); the rest (embedding, norms, biases) stays in the folder's dtype
    (``cfg.dtype``), as ``loader.load_serving_model`` holds it."""
    from .quantize import SCHEMES, quantized_names

    if dtype not in SCHEMES:
        return cfg.num_parameters() * DTYPE_BYTES[dtype]
    scheme = SCHEMES[dtype]
    shapes = cfg.param_shapes()
    linears = [shapes[n] for n in quantized_names(cfg)]
    rest = cfg.num_parameters() - sum(math.prod(s) for s in linears)
    return sum(r * c // scheme.per_byte + 4 * r * scheme.groups(c) for r, c in linears) + rest * DTYPE_BYTES[cfg.dtype]


# Bytes a fine-tune holds per parameter, beyond the runtime. Full: fp32 master weights, AdamW's two
# fp32 moments and the gradients (fp32; with half compute a half copy of the weights and half
# gradients, the same 16 bytes). LoRA: the frozen base as held (``training_bytes``); its adapters
# are a rounding error. Activations come on top: a lower bound, so only what cannot fit is refused.
TRAIN_BYTES_PER_PARAM = {"full": 4 + 8 + 4}
# A conversion holds one tensor at a time: as read, widened to fp32, and cast (or quantised); it
# runs without MindSpore, so no runtime is counted.
CONVERT_COPIES = 3


def training_bytes(cfg: Config, mode: str, dtype: str = "float32", quantize: str | None = None) -> int:
    """At least what fine-tuning ``cfg`` (``mode`` "full" or "lora", computing in ``dtype``) holds.
    LoRA's frozen base is held in its own precision (``quantize.base_precision``: the folder's, or
    int8) where the training kernels run, else in ``dtype``: the smaller, as this is a lower bound."""
    if mode == "full":
        return cfg.num_parameters() * TRAIN_BYTES_PER_PARAM["full"] + RUNTIME_BYTES
    from .quantize import base_precision

    held = base_precision(cfg, quantize)
    return min(weight_bytes(cfg, held), weight_bytes(cfg, dtype)) + RUNTIME_BYTES


def conversion_bytes(cfg: Config) -> int:
    """At least what converting ``cfg``'s weights holds: its largest tensor, a few times, as fp32."""
    largest = max(math.prod(shape) for shape in cfg.param_shapes().values())
    return largest * DTYPE_BYTES["float32"] * CONVERT_COPIES


def require_fits(what: str, needed: int, available: int | None) -> None:
    """TooLarge, with the numbers, when ``needed`` bytes exceed ``available`` (None: unknown, passes)."""
    if available is not None and needed > available:
        raise TooLarge(f"{what} needs at least {_size(needed)} of memory, but {_size(available)} is available here")


def _size(n: int) -> str:
    return gib(n) if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def cache_bytes(cfg: Config, slots: int, positions: int, dtype: str) -> int:
    """Bytes of a KV cache of ``slots`` (plus the engine's scratch slot) x ``positions``."""
    return (slots + 1) * 2 * cfg.num_layers * positions * cfg.kv_heads * cfg.head_dim * DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class ServingPlan:
    max_batch: int
    max_len: int
    weight_bytes: int
    cache_bytes: int
    reason: str  # why these numbers (logged by the worker)


def plan_serving(cfg: Config, weights_dtype: str, cache_dtype: str, available: int | None,
                 max_batch: int | None = None, max_len: int | None = None,
                 draft: tuple[Config, str] | None = None) -> ServingPlan:
    """Slots and positions for serving ``cfg`` in ``available`` bytes (None: unknown, nothing cut).
    ``max_batch`` / ``max_len`` given are kept or refused (MemoryError naming the flags); left None,
    they start at the defaults and shrink, slots first, down to one slot of ``MIN_LEN`` positions.
    ``draft``: (config, weights dtype) of a draft model served beside it (speculative decoding,
    ``draft.py``): its weights, and its KV cache of the same slots and positions, count too; its
    engine holds as many positions as the target's, so the default positions are cut to the
    draft's limit (the reason says so) and a ``max_len`` past it is refused (ValueError)."""
    weights = weight_bytes(cfg, weights_dtype) + (weight_bytes(*draft) if draft else 0)

    def cache(slots: int, positions: int) -> int:  # the target's KV cache and the draft's
        return sum(cache_bytes(c, slots, positions, cache_dtype) for c in (cfg, *(draft or ())[:1]))

    want_len = max_len or min(cfg.max_position_embeddings, DEFAULT_MAX_LEN)
    clipped = ""  # said in the reason where the draft cut the positions
    draft_limit = draft and draft[0].position_limit
    if draft_limit and want_len > draft_limit:
        if max_len:
            raise ValueError(f"--max-len {max_len} exceeds the draft model's {draft_limit} positions (its cache "
                             f"holds the target's positions): give --max-len {draft_limit} or less, or another draft")
        want_len, clipped = draft_limit, f"; positions cut to the draft model's {draft_limit}"
    want_slots = max_batch or DEFAULT_SLOTS
    if available is None:
        return ServingPlan(want_slots, want_len, weights, cache(want_slots, want_len),
                           "memory available unknown: nothing cut" + clipped)
    budget = int(available * MARGIN) - weights - RUNTIME_BYTES
    smallest = cache(1, min(want_len, MIN_LEN))
    if budget < smallest:
        raise MemoryError(
            f"{cfg.name} cannot be served here: its weights take {gib(weights)} as {weights_dtype}"
            f"{' with the draft model' if draft else ''}, the runtime "
            f"~{gib(RUNTIME_BYTES)} and the smallest KV cache {gib(smallest)}, but only {gib(available)} of memory "
            f"is available" + ("" if weights_dtype == "int4" else " (int4 weights, --quantize int4, would take about a "
                                                     "sixth of float32's)"))

    def fits(slots: int, positions: int) -> bool:
        return cache(slots, positions) <= budget

    per_slot = cache(1, want_len) - cache(0, want_len)
    if max_batch and max_len:
        if not fits(max_batch, max_len):
            most_slots = max(budget // per_slot - 1, 0)
            raise MemoryError(f"a KV cache of {max_batch} slots x {max_len} positions needs "
                              f"{gib(cache(max_batch, max_len))} beside {gib(weights)} of "
                              f"weights, but {gib(budget)} is left of {gib(available)} available: lower --max-batch "
                              f"(at most {most_slots} at {max_len} positions) or --max-len")
        return ServingPlan(max_batch, max_len, weights, cache(max_batch, max_len), "as asked")
    slots, positions = want_slots, want_len
    if not max_batch:
        slots = max(1, min(want_slots, budget // per_slot - 1))
    if not fits(slots, positions):
        if max_len:  # the positions were asked for and even one slot of them does not fit
            raise MemoryError(f"one slot of {max_len} positions needs {gib(cache(1, max_len))} "
                              f"of KV cache, but {gib(budget)} is left of {gib(available)} available: lower --max-len")
        per_position = cache(slots, 1)
        positions = max(MIN_LEN, 2 ** int(math.log2(max(budget // per_position, 1))))
        while positions > MIN_LEN and not fits(slots, positions):
            positions //= 2
        if not fits(slots, positions):
            raise MemoryError(f"{slots} slots of {MIN_LEN} positions need "
                              f"{gib(cache(slots, MIN_LEN))} of KV cache, but {gib(budget)} "
                              f"is left of {gib(available)} available: lower --max-batch")
    total = cache(slots, positions)
    if (slots, positions) == (want_slots, want_len):
        reason = f"the defaults fit ({gib(weights)} of weights + {gib(total)} of KV cache in {gib(available)})"
    else:
        reason = (f"cut from {want_slots} slots x {want_len} positions so that {gib(weights)} of weights and "
                  f"{gib(total)} of KV cache fit in {gib(available)} available (--max-batch / --max-len to choose)")
    return ServingPlan(slots, positions, weights, total, reason + clipped)
