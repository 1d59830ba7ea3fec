"""The model's execution forms: one ops object, chosen once when a model is built, computes every
layer's linear, norm, rotary, attention, SwiGLU, embedding and (training) dropout and loss.

    MindSporeOps()         MindSpore's own ops: any device, any dtype; training, export, parity
    ServingKernels()       the serving CPU kernels (``kernels``): packed (fp32/bf16/fp16/int8)
                           linears, embedding, RmsNorm, Rope, CachedAttention, SiluMul
    TrainingKernels()      the training CPU kernels (``train_kernels``): GEMMs whose backward
                           computes a weight's gradient only where it trains, causal attention,
                           RmsNorm and SwiGLU with one-pass gradients, HashDropout, CrossEntropy

    ops = serving_ops(dtype) / training_ops(dtype)   # the one decision, logged with its reason
    InternLMForCausalLM(cfg, ops=ops, fused=...)      # every layer calls ``self.ops.<op>(...)``

Each class is an ``ms.jit_class``: its methods are compiled into the calling cell's graph (no
cost at run time), and each layer's ``construct`` is one path whatever the form. The forms give
the same results to float rounding; the name (``ops.name``) is what a fine-tune run records, so a
resume on a machine with the other form is refused rather than silently different.

LoRA dropout has ONE mask definition in both training forms (``dropout``): element i of a layer's
input is kept when the top 24 bits of splitmix64(key + i) are >= ceil(p * 2^24), key =
splitmix64((seed << 32) ^ salt), as ``train_kernels.cc``'s HashDropout computes it; MindSpore's
form computes the same hash with uint64 ops.
"""
from __future__ import annotations

import logging
import math

import mindspore as ms
import numpy as np
from mindspore import Tensor, mint, ops

from . import kernels, train_kernels

log = logging.getLogger(__name__)

MINDSPORE, SERVING_KERNELS, TRAINING_KERNELS = "mindspore", "cpu-kernels", "cpu-training-kernels"


# ---- the graph pieces every form shares ----------------------------------------------------

def split_heads(x, heads: int, head_dim: int):
    """(B, T, heads * hd) -> (B, heads, T, hd)."""
    b, t, _ = x.shape
    return x.reshape(b, t, heads, head_dim).transpose(0, 2, 1, 3)


def rotate_half(x):
    half = x.shape[-1] // 2
    return mint.cat((-x[..., half:], x[..., :half]), -1)


def expand_kv(x, n_heads: int, n_kv: int):
    """(B, n_kv, S, hd) -> (B, nh, S, hd): each k/v head repeated for its query heads
    (query head i reads k/v head i // groups)."""
    if n_heads == n_kv:
        return x
    groups = n_heads // n_kv
    b, _, s, d = x.shape
    return ops.broadcast_to(x.reshape(b, n_kv, 1, s, d), (b, n_kv, groups, s, d)).reshape(b, n_heads, s, d)


def attend(bmm_kt, q, k, v, mask, n_heads: int, n_kv: int, scale, dtype):
    """softmax(q k^T (* scale) + mask) v in fp32 scores -> (B, T, nh * hd) in ``dtype``; q (B, nh, T, hd),
    k/v (B, n_kv, S, hd), mask additive (B, 1, T, S); ``scale`` None when q carries it already."""
    k, v = expand_kv(k, n_heads, n_kv), expand_kv(v, n_heads, n_kv)
    scores = bmm_kt(q.astype(ms.float32), k.astype(ms.float32))
    if scale is not None:
        scores = scores * scale
    probs = mint.softmax(scores + mask, dim=-1).astype(v.dtype)
    out = ops.matmul(probs, v)  # (B, nh, T, hd)
    b, _, t, hd = out.shape
    return out.transpose(0, 2, 1, 3).reshape(b, t, n_heads * hd).astype(dtype)


def flat_cache(k, v, k_cache, v_cache, cache_index, read_index, dtype):
    """The engine's flat cache (slots * n_kv * L, hd): the new k/v rows (B, n_kv, T, hd) written at
    ``cache_index`` (B*n_kv*T,), then each row's first S positions per head gathered by
    ``read_index`` (B, n_kv, S). ScatterUpdate on the first axis writes in place (0.4 ms);
    ScatterNdUpdate on a (slots, nh, L, hd) cache copied the whole cache per call (8 ms per layer
    and k/v at 9 x 2048 positions), so a step cost the allocated cache."""
    b, n_kv, t, hd = k.shape
    flat = (b * n_kv * t, hd)
    k_new = ops.scatter_update(k_cache, cache_index, k.reshape(flat).astype(k_cache.dtype))
    v_new = ops.scatter_update(v_cache, cache_index, v.reshape(flat).astype(v_cache.dtype))
    # read after the write: depend on the update, gather only the live rows and positions
    k = ops.gather(ops.depend(k_cache, k_new), read_index, 0)  # (B, n_kv, S, hd)
    v = ops.gather(ops.depend(v_cache, v_new), read_index, 0)
    if k_cache.dtype != dtype:  # an fp16 cache on this path: attention in the compute dtype
        k, v = k.astype(dtype), v.astype(dtype)
    return k, v


SPLITMIX = (0xbf58476d1ce4e5b9, 0x94d049bb133111eb)  # splitmix64's finaliser multipliers


def dropout_constants(p: float) -> tuple[int, float]:
    """(cut, scale) of a keep probability 1 - p as HashDropout computes them in float32: keep when
    the 24-bit draw is >= cut = ceil(p * 2^24), kept values times 1 / (1 - p)."""
    p32 = np.float32(p)
    return math.ceil(float(p32) * 16777216.0), float(np.float32(1.0) / (np.float32(1.0) - p32))


def _u64(value: int) -> Tensor:
    return Tensor(np.array(value, np.uint64))


def dropout_cut(p: float) -> Tensor:
    """``dropout_constants``' cut as the uint64 tensor ``dropout`` compares with."""
    return _u64(dropout_constants(p)[0])


# ---- the forms ----------------------------------------------------------------------------------

@ms.jit_class
class MindSporeOps:
    """MindSpore's own ops (every device; the training, export and reference form). Linear
    weights as they are loaded ((out, in), any float dtype)."""
    name = MINDSPORE
    cpu_kernels = False  # the engine's steps take MindSpore's cache inputs (see ``Engine._run``)

    def __init__(self):
        self.bmm_kt = ops.BatchMatMul(transpose_b=True)  # q k^T without materialising k^T
        self.m1, self.m2 = _u64(SPLITMIX[0]), _u64(SPLITMIX[1])
        self.s27, self.s30, self.s31, self.s32, self.s40 = (_u64(s) for s in (27, 30, 31, 32, 40))

    def linear(self, x, w, b, scale, trains):
        """x W^T (+ b); ``scale`` (int8 weights' per-channel scales) is the kernels' only."""
        return mint.nn.functional.linear(x, w, b)

    def rms_norm(self, x, w, eps):
        xf = x.astype(ms.float32)
        xf = xf * ops.rsqrt(mint.mean(xf * xf, -1, keepdim=True) + eps)
        return xf.astype(x.dtype) * w

    def embedding(self, ids, table):
        return ops.gather(table, ids, 0)

    def swiglu(self, gate, up):
        return ops.silu(gate) * up

    def silu_mul(self, gate_up):
        """[gate | up] (..., 2F) -> silu(gate) * up (..., F)."""
        gate, up = ops.split(gate_up, gate_up.shape[-1] // 2, -1)
        return ops.silu(gate) * up

    def attention(self, q, k, v, cos, sin, mask, k_cache, v_cache, cache_index, attend_cache, shape):
        """The unfused form: q (B, T, nh hd), k/v (B, T, n_kv hd) projections, cos/sin (B, 1, T, hd),
        mask (B, 1, T, S) additive; ``shape`` = (nh, n_kv, hd). With caches (the exported graphs':
        (slots, n_kv, L, hd), ``cache_index`` (B, n_kv, T, 3) = (slot, head, position)) the new rows
        are written in place; prefill attends within x (S == T), decode (``attend_cache``) the whole
        cache. -> (B, T, nh hd)."""
        n_heads, n_kv, hd = shape
        dtype = q.dtype
        q, k, v = split_heads(q, n_heads, hd), split_heads(k, n_kv, hd), split_heads(v, n_kv, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if k_cache is not None:
            # In place; using the op's output orders the read after the write.
            k_all = ops.scatter_nd_update(k_cache, cache_index, k.astype(k_cache.dtype))
            v_all = ops.scatter_nd_update(v_cache, cache_index, v.astype(v_cache.dtype))
            if attend_cache:
                k, v = k_all, v_all
            else:  # keep the writes in the graph
                k, v = ops.depend(k, k_all), ops.depend(v, v_all)
        return attend(self.bmm_kt, q, k, v, mask, n_heads, n_kv, 1.0 / math.sqrt(hd), dtype)

    def fused_attention(self, y, cos, sin, rot, mask, k_cache, v_cache, cache_index, read_index, q_scale, counts,
                        shape):
        """The serving form: y (B, T, (nh + 2 n_kv) hd) = the fused q/k/v projection; cos/sin
        ``fused_rope_tables``' (B, nh + 2 n_kv, T, hd) (q's scaled, v's 1 and 0, so one rotary
        pass covers q and k and leaves v as it was); ``rot`` the rotate-half matrix. With the
        engine's flat cache (``read_index`` given, see ``flat_cache``) mask is (B, 1, T, S)
        additive; without a cache (B, 1, T, T). -> (B, T, nh hd)."""
        n_heads, n_kv, hd = shape
        dtype = y.dtype
        y = split_heads(y, n_heads + 2 * n_kv, hd)
        turned = ops.matmul(y.reshape(-1, hd), rot).reshape(y.shape)  # 2-D: no broadcast copy
        q, k, v = ops.split(y * cos + turned * sin, [n_heads, n_kv, n_kv], 1)
        if read_index is not None:
            k, v = flat_cache(k, v, k_cache, v_cache, cache_index, read_index, dtype)
        return attend(self.bmm_kt, q, k, v, mask, n_heads, n_kv, None, dtype)

    def _mix(self, z):
        z = ops.bitwise_xor(z, ops.bitwise_right_shift(z, self.s30)) * self.m1
        z = ops.bitwise_xor(z, ops.bitwise_right_shift(z, self.s27)) * self.m2
        return ops.bitwise_xor(z, ops.bitwise_right_shift(z, self.s31))

    def dropout(self, x, seed, cfg, cut, scale):
        """x with element i kept (times ``scale``) where the hash draw of (seed, salt = cfg[1], i) is
        >= ``cut`` (a uint64 tensor; ``dropout_constants``); seed < 0: x unchanged. HashDropout's
        mask, in uint64 ops."""
        key = self._mix(ops.bitwise_xor(ops.bitwise_left_shift(seed.astype(ms.uint64), self.s32),
                                        cfg[1].astype(ms.uint64)))
        index = ops.arange(0, x.size, dtype=ms.int64).astype(ms.uint64).reshape(x.shape)
        draw = ops.bitwise_right_shift(self._mix(key + index), self.s40)
        keep = ops.logical_or(draw >= cut, seed < 0)
        factor = ops.where(seed < 0, 1.0, scale)
        return ops.where(keep, x, ops.zeros_like(x)) * factor.astype(x.dtype)

    def cross_entropy(self, logits, labels, ignore):
        """Mean over the labels that are not ``ignore``."""
        return ops.cross_entropy(logits, labels, ignore_index=ignore)


@ms.jit_class
class ServingKernels(MindSporeOps):
    """The serving CPU kernels: linears packed (``Linear.pack``: fp32, bf16, fp16 or int8 with
    per-channel scales; a layer whose outputs are not a multiple of 16 rows keeps its (out, in)
    weight and MindSpore's matmul), the embedding rows gathered by a kernel, rotary by one kernel,
    attention read from the engine's cache where it lies. Fused float32 form only."""
    name = SERVING_KERNELS
    cpu_kernels = True  # the engine's steps take the kernels' cache inputs (see ``Engine._run``)

    def __init__(self):
        super().__init__()
        self.packed = kernels.linear_op(False), kernels.linear_op(True)
        self.packed_int8 = kernels.linear_op(False, True), kernels.linear_op(True, True)
        self.norm, self.gather, self.gate = kernels.rms_norm_op(), kernels.embedding_op(), kernels.silu_mul_op()
        self.rope, self.cached_attention = kernels.rope_op(), kernels.attention_op()

    def linear(self, x, w, b, scale, trains):
        if len(w.shape) == 2:  # not packed (its rows are not a multiple of 16)
            return mint.nn.functional.linear(x, w, b)
        if scale is not None:
            return self.packed_int8[0](x, w, scale) if b is None else self.packed_int8[1](x, w, scale, b)
        return self.packed[0](x, w) if b is None else self.packed[1](x, w, b)

    def rms_norm(self, x, w, eps):
        return self.norm(x, w, eps)

    def embedding(self, ids, table):
        return self.gather(ids, table)

    def silu_mul(self, gate_up):
        return self.gate(gate_up)

    def fused_attention(self, y, cos, sin, rot, mask, k_cache, v_cache, cache_index, read_index, q_scale, counts,
                        shape):
        """cos/sin are ``rope_tables``' (B, T, hd), q scaled by ``q_scale`` in the Rope kernel. With the
        engine's cache ``read_index`` is (B, n_kv), each (row, head)'s first cache row, and ``mask``
        (B, T) int32, each query's position: one kernel writes the new rows at ``cache_index`` and
        query t attends rows first .. first + position, read where they lie (no scatter op, no
        gather, no mask tensor). Without a cache, MindSpore's attention over x (mask additive)."""
        n_heads, n_kv, hd = shape
        qkv = self.rope(y, cos, sin, q_scale, counts)  # (B, nh + 2 n_kv, T, hd)
        if read_index is not None:
            out = self.cached_attention(qkv, k_cache, v_cache, cache_index, read_index, mask)  # (B, T, nh, hd)
            b, t = out.shape[0], out.shape[1]
            return out.reshape(b, t, n_heads * hd)
        q, k, v = ops.split(qkv, [n_heads, n_kv, n_kv], 1)
        return attend(self.bmm_kt, q, k, v, mask, n_heads, n_kv, None, y.dtype)


@ms.jit_class
class TrainingKernels(MindSporeOps):
    """The training CPU kernels (each op's backward pass a kernel too). Unfused float32 form only.
    Attention runs on the kernel where each head is whole vectors (hd a multiple of 16), and
    causal only: training's right-padded rows never see their padding anyway. A LoRA base may be
    held in its stored precision (``loader.load_frozen_base``: bf16, fp16, or int8 with per-row
    scales): its linears run on FrozenLinear and its embedding table on the serving gather, both
    widening inside the kernel, the arithmetic fp32."""
    name = TRAINING_KERNELS
    cpu_kernels = True

    def __init__(self):
        super().__init__()
        self.frozen = train_kernels.train_linear_op(False, False), train_kernels.train_linear_op(True, False)
        self.trained = train_kernels.train_linear_op(False, True), train_kernels.train_linear_op(True, True)
        self.held = train_kernels.frozen_linear_op(False, False), train_kernels.frozen_linear_op(True, False)
        self.held_int8 = train_kernels.frozen_linear_op(False, True), train_kernels.frozen_linear_op(True, True)
        self.held_table = train_kernels.frozen_embedding_op()
        self.norm, self.gate = train_kernels.train_rms_norm_op(), train_kernels.swiglu_op()
        self.causal = train_kernels.causal_attention_op()
        self.hash_dropout, self.loss = train_kernels.dropout_op(), train_kernels.cross_entropy_op()

    def linear(self, x, w, b, scale, trains):
        """``trains``: the weight's gradient is computed (a frozen layer's is not). A weight held in
        another precision than float32 (a frozen base's; ``scale`` with int8) is FrozenLinear's."""
        if scale is not None:
            return self.held_int8[0](x, w, scale) if b is None else self.held_int8[1](x, w, scale, b)
        if w.dtype != ms.float32:
            return self.held[0](x, w) if b is None else self.held[1](x, w, b)
        gemm = self.trained if trains else self.frozen
        return gemm[0](x, w) if b is None else gemm[1](x, w, b)

    def embedding(self, ids, table):
        if table.dtype != ms.float32:  # a frozen base's table in its stored precision
            return self.held_table(ids, table)
        return ops.gather(table, ids, 0)

    def rms_norm(self, x, w, eps):
        return self.norm(x, w, eps)

    def swiglu(self, gate, up):
        return self.gate(gate, up)

    def attention(self, q, k, v, cos, sin, mask, k_cache, v_cache, cache_index, attend_cache, shape):
        if shape[2] % kernels.PANEL or k_cache is not None:
            return MindSporeOps.attention(self, q, k, v, cos, sin, mask, k_cache, v_cache, cache_index, attend_cache,
                                          shape)
        return self.causal(q, k, v, cos, sin)[0]

    def dropout(self, x, seed, cfg, cut, scale):
        return self.hash_dropout(x, seed, cfg)

    def cross_entropy(self, logits, labels, ignore):
        """Labels < 0 are left out (``ignore`` is data.IGNORE, negative)."""
        return self.loss(logits, labels)[0].reshape(())


# ---- the one decision -------------------------------------------------------------------------

_said: set = set()


def say_once(level: int, message: str) -> None:
    """Log a form decision once per process (every engine and loader asks the same question)."""
    if message not in _said:
        _said.add(message)
        log.log(level, message)


def serving_ops(dtype: str = "float32", kernels_wanted: bool = True):
    """The serving form for a model computing in ``dtype``: the CPU kernels where they can run
    (float32 compute, the library built here), else MindSpore's ops, with the reason logged."""
    why = ("not asked for" if not kernels_wanted else
           f"compute dtype {dtype} (the kernels compute in float32)" if dtype != "float32" else
           kernels.unavailable())
    if why is None:
        say_once(logging.INFO, f"serving form: {SERVING_KERNELS}")
        return ServingKernels()
    say_once(logging.WARNING if kernels_wanted and dtype == "float32" else logging.INFO,
             f"CPU kernels not used ({why}): serving form {MINDSPORE}, slower")
    return MindSporeOps()


def training_ops(dtype: str = "float32"):
    """The training form for a model computing in ``dtype``: the training CPU kernels where they can
    run (float32 compute, both libraries built here), else MindSpore's ops, with the reason logged.
    A fine-tune records the form's name in its checkpoints."""
    if dtype != "float32":
        why = f"compute dtype {dtype} (the kernels compute in float32)"
    elif not train_kernels.available():
        why = kernels.unavailable() or kernels.training_unavailable()
    else:
        say_once(logging.INFO, f"training form: {TRAINING_KERNELS}")
        return TrainingKernels()
    say_once(logging.INFO, f"training form: {MINDSPORE} (training kernels not used: {why})")
    return MindSporeOps()
