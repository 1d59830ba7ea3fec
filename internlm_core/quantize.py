"""Weight-only quantisation, framework-free: symmetric int8 with one scale per output channel
(gpt-fast's and LMDeploy's W8A16), and symmetric int4 with one scale per output channel and group
of GROUP inputs (llama.cpp's Q4_0 rule and block).

    q, scale = quantize_int8(w)        # w (N, K) float -> q (N, K) int8, scale (N,) float32
    w_hat = dequantize_int8(q, scale)  # q * scale[:, None]
    q, scale = quantize_int4(w)        # w (N, K) -> q (N, K) int8 in -8..7, scale (N, K / GROUP) float32
    w_hat = dequantize_int4(q, scale)  # q * scale repeated over each group
    SCHEMES["int4"].quantize(w)        # the stored form: two values a byte (pack_int4), and the scales

In a model folder a quantised linear's ``<module>.weight`` is stored beside
``<module>.weight_scale`` (F32), and ``config.json`` says ``"quantization": "int8"`` or ``"int4"``:
int8 as I8 (N, K) with (N,) scales; int4 as U8 (N, K / 2), the even k's value in the low nibble and
the odd k's in the high one, each as q + 8, with (N, K / GROUP) scales. Every other tensor
(embedding, norms, biases) keeps the folder's dtype. Which tensors are quantised is
``quantized_names``: every linear of the decoder and the head, the weights a decode step streams.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from .errors import CheckpointError

if TYPE_CHECKING:
    from .config import Config

GROUP = 32  # int4: inputs sharing a scale (Q4_0's block; a multiple of 32 divides every InternLM width)
SCALE_SUFFIX = "_scale"  # <module>.weight -> <module>.weight_scale
LINEAR_LEAVES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def quantized_names(cfg: Config) -> list[str]:
    """The weights that are quantised in a quantised folder: the decoder's linears and the head."""
    return [n for n in cfg.param_shapes() if n == "lm_head.weight"
            or (n.endswith(".weight") and n.rsplit(".", 2)[-2] in LINEAR_LEAVES)]


def base_precision(cfg: Config, quantize: str | None) -> str:
    """The precision of a model's linear weights as loaded: a quantised folder's method or
    ``quantize``, else the folder's dtype (what LoRA's frozen base is held in, and a fine-tune records)."""
    return cfg.quantization or quantize or cfg.dtype


def check_quantizable(cfg: Config, method: str) -> None:
    """CheckpointError (a ValueError) naming the first weight ``method`` cannot quantise (int4:
    inputs not a multiple of GROUP); checked before any weight is read or written."""
    group = SCHEMES[method].group
    shapes = cfg.param_shapes()
    for name in quantized_names(cfg):
        if group and shapes[name][1] % group:
            raise CheckpointError(f"{method} quantises {group} inputs to a scale, and {name} has {shapes[name][1]}")


def scale_name(weight_name: str) -> str:
    return weight_name + SCALE_SUFFIX


def quantize_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8: scale = max|w_row| / 127 (1 for an all-zero row),
    q = round(w / scale) in [-127, 127] (-128 unused, so the range is symmetric)."""
    w = np.asarray(w, np.float32)
    if w.ndim != 2:
        raise ValueError(f"int8 quantisation takes a 2-D weight, got shape {list(w.shape)}")
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * np.asarray(scale, np.float32)[:, None]


def quantize_int4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int4 per output channel and group of GROUP inputs, by llama.cpp's Q4_0 rule: the
    group's largest-magnitude value m maps to -8 exactly (scale = m / -8, so the scale carries the
    sign; 1 for an all-zero group) and q = round(w / scale) in [-8, 7], all 16 levels used. As int8
    (N, K); scales (N, K / GROUP) float32. K must be a multiple of GROUP. (Measured on the demo
    model's WikiText-2 perplexity: +8.3% with scale = max|w| / 7 and 15 levels, -1.6% with this.)"""
    w = np.asarray(w, np.float32)
    if w.ndim != 2 or w.shape[1] % GROUP:
        raise ValueError(f"int4 quantisation takes a 2-D weight whose inputs are a multiple of {GROUP}, "
                         f"got shape {list(w.shape)}")
    g = w.reshape(w.shape[0], -1, GROUP)
    m = np.take_along_axis(g, np.abs(g).argmax(axis=2)[..., None], axis=2)[..., 0]
    scale = np.where(m != 0, m / -8.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(g / scale[:, :, None]), -8, 7).astype(np.int8)
    return q.reshape(w.shape), scale


def dequantize_int4(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """q (N, K) * its group's scale, in float32 (the value the int4 kernel widens each weight to)."""
    n, k = q.shape
    return (q.reshape(n, k // GROUP, GROUP).astype(np.float32) * np.asarray(scale, np.float32)[:, :, None]).reshape(n, k)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """q (N, K) in -8..7 -> (N, K / 2) uint8: k = 2j in byte j's low nibble, 2j + 1 in its high
    one, each as q + 8."""
    b = (np.asarray(q, np.int16) + 8).astype(np.uint8)
    return b[:, 0::2] | (b[:, 1::2] << 4)


def unpack_int4(b: np.ndarray) -> np.ndarray:
    """The inverse of ``pack_int4``: (N, K / 2) uint8 -> q (N, K) int8."""
    q = np.empty((b.shape[0], b.shape[1] * 2), np.int8)
    q[:, 0::2] = (b & 15).astype(np.int8) - 8
    q[:, 1::2] = (b >> 4).astype(np.int8) - 8
    return q


@dataclass(frozen=True)
class Scheme:
    """One quantisation as a folder stores it and the kernels read it: ``quantize`` a float (N, K)
    weight into (stored weight, scales), ``dequantize`` them back into float32 (the values the
    kernels compute with); ``stored``: the weight's safetensors dtype; ``group``: inputs a scale
    covers (None: the whole row); ``per_byte``: values a stored byte holds."""
    name: str
    stored: str
    group: int | None
    per_byte: int
    quantize: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
    dequantize: Callable[[np.ndarray, np.ndarray], np.ndarray]

    def shapes(self, n: int, k: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The stored weight's and its scales' shapes for an (n, k) weight."""
        return (n, k // self.per_byte), ((n,) if self.group is None else (n, k // self.group))

    def groups(self, k: int) -> int:
        """Scales a row has."""
        return 1 if self.group is None else k // self.group


def _quantize_int4_stored(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    q, scale = quantize_int4(w)
    return pack_int4(q), scale


def _dequantize_int4_stored(b: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return dequantize_int4(unpack_int4(b), scale)


SCHEMES = {s.name: s for s in (
    Scheme("int8", "I8", None, 1, quantize_int8, dequantize_int8),
    Scheme("int4", "U8", GROUP, 2, _quantize_int4_stored, _dequantize_int4_stored),
)}
METHODS = tuple(SCHEMES)
