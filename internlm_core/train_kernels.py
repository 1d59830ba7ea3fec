"""The training kernels (``train_kernels.cc``) as MindSpore ops whose backward passes are kernels
too: the GEMMs of the linears (oneDNN's, as the mindspore wheel ships it), causal attention with
rotary, SwiGLU, RMSNorm's gradient, hashed dropout, cross-entropy, and the optimizer's sum of
squares and AdamW step. Built as their own library (``kernels.training_library``): serving needs
none of them, nor oneDNN. ``available()`` says whether training can use them here.
"""
from __future__ import annotations

import functools

from . import kernels


def available() -> bool:
    """Both libraries built here (the training graphs use the serving RmsNorm forward too)."""
    return kernels.library() is not None and kernels.training_library() is not None


GEMM_KINDS = ("forward", "input_grad", "weight_grad")


def gemm_flops() -> dict[str, int]:
    """Floating-point operations the training GEMMs did in this process, by kind: what a test reads
    to see that a LoRA step computes no gradient for the frozen weights."""
    import ctypes

    fn = ctypes.CDLL(kernels.training_library()).internlm_gemm_flops
    fn.restype, fn.argtypes = ctypes.c_int64, [ctypes.c_int]
    return {kind: fn(i) for i, kind in enumerate(GEMM_KINDS)}


@functools.cache
def train_linear_op(bias: bool, trains: bool):
    """y (..., N) = x (..., K) @ W^T (+ b), W (N, K) as it lies. Backward: dx = dy W; dW = dy^T x and
    db = the sum of dy's rows only when the layer ``trains`` (a frozen layer's are zeros that
    nothing reads, which the graph compiler drops)."""
    from mindspore import ops

    grad_x = kernels._op("LinearGradX", lambda dy, w: dy[:-1] + [w[1]], lambda dy, w: dy, training=True)
    grad_w = kernels._op("LinearGradW", lambda dy, x: [dy[-1], x[-1]], lambda dy, x: dy, training=True)

    def weight_grads(x, w, dout):
        return grad_w(dout, x) if trains else ops.zeros_like(w)

    if bias:
        def bprop(x, w, b, out, dout):
            db = ops.reduce_sum(dout.reshape((-1, dout.shape[-1])), 0) if trains else ops.zeros_like(b)
            return grad_x(dout, w), weight_grads(x, w, dout), db

        return kernels._op("LinearFwd", lambda x, w, b: x[:-1] + [w[0]], lambda x, w, b: x, bprop, f"bias, trains={trains}", training=True)

    def bprop(x, w, out, dout):
        return grad_x(dout, w), weight_grads(x, w, dout)

    return kernels._op("LinearFwd", lambda x, w: x[:-1] + [w[0]], lambda x, w: x, bprop, f"no bias, trains={trains}", training=True)


@functools.cache
def frozen_linear_op(bias: bool, quantized: bool):
    """y (..., N) = x (..., K) @ W^T (+ b) for a frozen weight W (N, K) held in its stored precision
    (bf16, fp16; fp32 too) or, ``quantized``, as int8 with per-row scales (N,) fp32: inputs (x, w[,
    scale][, b]). LoRA's base (QLoRA-like): W is widened a block at a time inside the kernel, never
    whole. Backward: dx = dy W the same way; nothing for W, its scales or the bias, which do not
    train (zeros that nothing reads, which the graph compiler drops)."""
    from mindspore import ops

    variant = f"{'bias' if bias else 'no bias'}, {'int8' if quantized else 'stored'}"
    if quantized:
        grad_x = kernels._op("FrozenLinearGradX", lambda dy, w, s: dy[:-1] + [w[1]], lambda dy, w, s: dy,
                             variant=variant, training=True)
        if bias:
            def bprop(x, w, s, b, out, dout):
                return grad_x(dout, w, s), ops.zeros_like(w), ops.zeros_like(s), ops.zeros_like(b)

            return kernels._op("FrozenLinear", lambda x, w, s, b: x[:-1] + [w[0]], lambda x, w, s, b: x, bprop,
                               variant, training=True)

        def bprop(x, w, s, out, dout):
            return grad_x(dout, w, s), ops.zeros_like(w), ops.zeros_like(s)

        return kernels._op("FrozenLinear", lambda x, w, s: x[:-1] + [w[0]], lambda x, w, s: x, bprop, variant,
                           training=True)
    grad_x = kernels._op("FrozenLinearGradX", lambda dy, w: dy[:-1] + [w[1]], lambda dy, w: dy, variant=variant,
                         training=True)
    if bias:
        def bprop(x, w, b, out, dout):
            return grad_x(dout, w), ops.zeros_like(w), ops.zeros_like(b)

        return kernels._op("FrozenLinear", lambda x, w, b: x[:-1] + [w[0]], lambda x, w, b: x, bprop, variant,
                           training=True)

    def bprop(x, w, out, dout):
        return grad_x(dout, w), ops.zeros_like(w)

    return kernels._op("FrozenLinear", lambda x, w: x[:-1] + [w[0]], lambda x, w: x, bprop, variant, training=True)


@functools.cache
def frozen_embedding_op():
    """The serving ``embedding_op`` (rows of a bf16, fp16 or fp32 table widened to fp32) with a
    backward pass for a table that does not train (LoRA's base): nothing flows into it."""
    import mindspore as ms
    from mindspore import ops

    def bprop(ids, table, out, dout):
        return ops.zeros_like(ids), ops.zeros_like(table)

    return kernels._op("Embedding", lambda ids, t: ids + [t[1]], lambda ids, t: ms.float32, bprop, "frozen")


@functools.cache
def causal_attention_op():
    """(out (B, T, H*D), lse (B, H, T)) from the projections q (B, T, H*D), k, v (B, T, Hkv*D) and the
    rotary tables cos, sin (B, 1, T, D): q and k rotated, causal softmax(q k^T / sqrt(D)) v per head
    (query head h reads k/v head h // (H / Hkv)); out is wo's input as it lies. Causal only: a
    right-padded row's real positions never see its padding anyway. Backward: one kernel, the
    probabilities recomputed from lse."""
    from mindspore import ops

    grad = kernels._op("CausalAttentionGrad", lambda q, k, v, c, s, o, lse, d: (q, k, v),
               lambda q, k, v, c, s, o, lse, d: (q, k, v), training=True)

    def bprop(q, k, v, cos, sin, out, dout):
        dq, dk, dv = grad(q, k, v, cos, sin, out[0], out[1], dout[0])
        return dq, dk, dv, ops.zeros_like(cos), ops.zeros_like(sin)

    return kernels._op("CausalAttention", lambda q, k, v, c, s: (q, [q[0], q[2] // c[-1], q[1]]),
               lambda q, k, v, c, s: (q, q), bprop, "training", training=True)


@functools.cache
def swiglu_op():
    """silu(gate) * up from (gate, up), with its backward pass in one kernel."""
    grad = kernels._op("SwiGluGrad", lambda g, u, dy: (g, g), lambda g, u, dy: (g, g), training=True)

    def bprop(gate, up, out, dout):
        return grad(gate, up, dout)

    return kernels._op("SwiGlu", lambda g, u: g, lambda g, u: g, bprop, "training", training=True)


@functools.cache
def train_rms_norm_op():
    """``rms_norm_op`` with its backward pass (dx, dw) in one kernel: inputs (x, w, eps (1,))."""
    from mindspore import ops

    grad = kernels._op("RmsNormGrad", lambda x, w, eps, dy: (x, w), lambda x, w, eps, dy: (x, w), training=True)

    def bprop(x, w, eps, out, dout):
        dx, dw = grad(x, w, eps, dout)
        return dx, dw, ops.zeros_like(eps)

    return kernels._op("RmsNorm", lambda x, w, eps: x, lambda x, w, eps: x, bprop)


@functools.cache
def dropout_op():
    """Inputs (x, seed (), cfg (2,) = (p, salt)): x with each element kept with probability 1 - p
    (and scaled by 1 / (1 - p)) by a hash of (seed, salt, its index); seed < 0 turns it off. The
    gradient applies the same mask to dy."""
    from mindspore import ops

    def bprop(x, seed, cfg, out, dout):
        return op(dout, seed, cfg), ops.zeros_like(seed), ops.zeros_like(cfg)

    op = kernels._op("HashDropout", lambda x, seed, cfg: x, lambda x, seed, cfg: x, bprop, training=True)
    return op


@functools.cache
def cross_entropy_op():
    """Inputs (logits (M, V) f32, labels (M,) int32, negative = not counted); outputs (mean loss (1,)
    over the counted rows, each row's log-sum-exp (M,)). Backward from the saved log-sum-exp."""
    from mindspore import ops

    grad = kernels._op("CrossEntropyGrad", lambda z, y, lse, d: z, lambda z, y, lse, d: z, training=True)

    def bprop(z, labels, out, dout):
        return grad(z, labels, out[1], dout[0]), ops.zeros_like(labels)

    return kernels._op("CrossEntropy", lambda z, y: ([1], [z[0]]), lambda z, y: (z, z), bprop, training=True)


@functools.cache
def sum_squares_op():
    """sum((g / loss_scale)^2) (1,) of a float32 tensor g and loss_scale (1,)."""
    return kernels._op("SumSquares", lambda g, s: [1], lambda g, s: g, training=True)


@functools.cache
def adamw_op():
    """AdamWeightDecay's step IN PLACE on (p, m, v) from (g, hyper (8,) = lr, beta1, beta2, eps,
    weight_decay, loss_scale, clip, apply), on g / loss_scale * clip; returns (1,) = apply. See
    train_kernels.cc."""
    return kernels._op("AdamW", lambda p, m, v, g, h: [1], lambda p, m, v, g, h: p, training=True)
