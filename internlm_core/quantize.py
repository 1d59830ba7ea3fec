"""int8 weight-only quantisation: symmetric, one scale per output channel (gpt-fast's and
LMDeploy's W8A16), framework-free.

    q, scale = quantize_int8(w)        # w (N, K) float -> q (N, K) int8, scale (N,) float32
    w_hat = dequantize_int8(q, scale)  # q * scale[:, None]

In a model folder a quantised linear's ``<module>.weight`` is stored as I8 beside
``<module>.weight_scale`` (F32, (N,)), and ``config.json`` says ``"quantization": "int8"``; every
other tensor (embedding, norms, biases) keeps the folder's dtype. Which tensors are quantised is
``quantized_names``: every linear of the decoder and the head, the weights a decode step streams.
The layout leaves room for int4 (per group of K, as llama.cpp's Q4 and LMDeploy's W4A16): its scales
would be (N, K / group) and its weight two values a byte.
"""
from __future__ import annotations

import numpy as np

from .config import Config

METHODS = ("int8",)
SCALE_SUFFIX = "_scale"  # <module>.weight -> <module>.weight_scale
LINEAR_LEAVES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def quantized_names(cfg: Config) -> list[str]:
    """The weights that are int8 in a quantised folder: the decoder's linears and the head."""
    return [n for n in cfg.param_shapes() if n == "lm_head.weight"
            or (n.endswith(".weight") and n.rsplit(".", 2)[-2] in LINEAR_LEAVES)]


def base_precision(cfg: Config, quantize: str | None) -> str:
    """The precision of a model's linear weights as loaded: ``int8`` for an int8 folder or with
    ``quantize``, else the folder's dtype (what LoRA's frozen base is held in, and a fine-tune records)."""
    return cfg.quantization or quantize or cfg.dtype


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
