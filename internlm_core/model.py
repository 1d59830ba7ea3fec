"""The InternLM v1 decoder in MindSpore, top to bottom, plus its preallocated KV cache.

A pre-norm LLaMA: RMSNorm, rotate-half rotary, SwiGLU MLP, untied head; the 7B family adds
bias to q/k/v/o. Parameter names are MindFormers' so checkpoints load there unchanged.

Only ops MindSpore has CPU kernels for are used: no fused
RMSNorm/rotary/flash attention, ``mint.nn.functional.linear`` for projections. The same
code runs on GPU/Ascend. Host-side numpy builds the small per-call inputs (rotary tables,
masks, cache indices) so that each graph compiles once per shape and padding can never leak
into positions or attention.

``fuse_projections`` turns a loaded model into its serving form (the engine does this): q/k/v
and gate/up each one matmul, rotary as one small matmul over q, k and v together, the score
scale carried by q's rope tables. On this CPU a decode step is bound by per-kernel cost as much
as by arithmetic, so fewer, larger kernels are what makes it faster (measured: 8 rows of the
512-wide bench model 39 -> 36 ms a step, 450 -> 305 kernels). ``use_cpu_kernels`` then hands
the matmuls, attention, norms, rotary and SwiGLU to the project's CPU kernels (``kernels``).

The file keeps the training form, both serving forms and the host-side inputs together (~420
lines) because the network should read in one place: each form is a branch of the same cells.
"""
from __future__ import annotations

import math

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, mint, nn, ops
from mindspore.common.initializer import initializer

from . import kernels, train_kernels
from .config import Config

MS_DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}
NEG_INF = -1e9  # additive mask; scores are fp32 so this underflows cleanly in softmax


def compute_dtype_for(cfg: Config) -> str:
    """CPU kernels for half-precision matmuls are missing or slow: compute in fp32 there."""
    if ms.get_context("device_target") == "CPU":
        return "float32"
    return cfg.dtype


class Linear(nn.Cell):
    """y = x W^T (+ b), weight [out, in] like torch and MindFormers.

    Serving LoRA adapters without merging: ``Engine.load_adapter`` sets ``lora_a`` (n+1, r, in)
    and ``lora_b`` (n+1, out, r) (scaling folded in, row 0 all zeros = no adapter), and each
    batch row picks its adapter with ``adapters`` (B,) int32. Without them nothing changes.

    ``pack`` (serving on CPU) stores the weight in ``kernels.pack``'s layout and multiplies with
    the CPU kernel instead of MindSpore's MatMul.
    """

    def __init__(self, d_in: int, d_out: int, bias: bool, dtype=ms.float32):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        # Lazy initializers: no memory is taken until weights are loaded, so loading a
        # checkpoint never holds two copies of the model.
        self.weight = Parameter(initializer("zeros", (d_out, d_in), dtype), name="weight")
        self.bias = Parameter(initializer("zeros", (d_out,), dtype), name="bias") if bias else None
        self.lora_a = None
        self.lora_b = None
        self.packed_matmul = None  # set by ``pack``
        self.weight_scale = None  # int8 packed weights: the per-output-channel scales (N,) fp32
        self.train_matmul = None  # the training kernel, set by ``InternLMForCausalLM.use_training_kernels``

    def pack(self, packed: Tensor | None = None, scale: Tensor | None = None) -> None:
        """Serve with the CPU kernel (idempotent; weights whose rows are a multiple of 16): the
        weight is replaced by its packed form, so there is still one copy. Without ``packed`` the
        loaded fp32 weight is packed here; ``packed`` is the weight already in ``kernels.pack``'s
        layout, fp32, bf16 or fp16, or int8 with its per-output-channel ``scale`` (N,) fp32
        (``loader.load_serving_model`` builds it straight from the file, and this layer's own
        weight is never loaded)."""
        if self.packed_matmul is not None or self.d_out % kernels.PANEL:
            return
        if packed is None:
            if self.weight.dtype != ms.float32:
                return
            packed = Tensor(kernels.pack(self.weight.asnumpy()))
        if (packed.dtype == ms.int8) != (scale is not None):
            raise ValueError("an int8 packed weight comes with its scales, and only an int8 one")
        self.weight = parameter_of(packed, self.weight.name)
        if scale is not None:
            self.weight_scale = parameter_of(scale, self.weight.name + "_scale")
        self.packed_matmul = kernels.linear_op(self.bias is not None, scale is not None)

    def construct(self, x, adapters=None):
        if self.train_matmul is not None:
            return self.train_matmul(x, self.weight) if self.bias is None else self.train_matmul(x, self.weight, self.bias)
        if self.packed_matmul is None:
            y = mint.nn.functional.linear(x, self.weight, self.bias)
        elif self.weight_scale is not None:
            y = (self.packed_matmul(x, self.weight, self.weight_scale) if self.bias is None
                 else self.packed_matmul(x, self.weight, self.weight_scale, self.bias))
        elif self.bias is None:
            y = self.packed_matmul(x, self.weight)
        else:
            y = self.packed_matmul(x, self.weight, self.bias)
        if self.lora_a is None or adapters is None:
            return y
        a = ops.gather(self.lora_a, adapters, 0)  # (B, r, in)
        b = ops.gather(self.lora_b, adapters, 0)  # (B, out, r)
        return y + ops.matmul(ops.matmul(x, a.swapaxes(1, 2)), b.swapaxes(1, 2))  # (B, T, out)


def parameter_of(data: Tensor, name: str) -> Parameter:
    """A frozen Parameter holding ``data``'s memory: ``Parameter(tensor)`` copies the tensor (seen on
    MindSpore 2.9), ``set_data`` on a not yet loaded Parameter of the same shape and dtype does not."""
    p = Parameter(initializer("zeros", data.shape, data.dtype), name=name, requires_grad=False)
    return p.set_data(data)


class RMSNorm(nn.Cell):
    def __init__(self, dim: int, eps: float, dtype=ms.float32):
        super().__init__()
        self.weight = Parameter(initializer("ones", (dim,), dtype), name="weight")
        self.eps = eps
        self.kernel = None  # the CPU kernel, set by ``InternLMForCausalLM.use_cpu_kernels`` / ``use_training_kernels``
        self.eps_tensor = Tensor([eps], ms.float32)

    def construct(self, x):
        if self.kernel is not None:
            return self.kernel(x, self.weight, self.eps_tensor)
        xf = x.astype(ms.float32)
        xf = xf * ops.rsqrt(mint.mean(xf * xf, -1, keepdim=True) + self.eps)
        return xf.astype(x.dtype) * self.weight


def rotate_half(x):
    half = x.shape[-1] // 2
    return mint.cat((-x[..., half:], x[..., :half]), -1)


def rotate_half_matrix(d: int) -> np.ndarray:
    """R with x @ R == rotate_half(x), exactly (one +-1 per column): one matmul instead of
    two slices, a negation and a concat."""
    r, half = np.zeros((d, d), np.float32), d // 2
    r[np.arange(half, d), np.arange(half)] = -1.0
    r[np.arange(half), np.arange(half, d)] = 1.0
    return r


def fuse_linears(parts, name: str, loaded: bool = True) -> "Linear":
    """One Linear whose output rows are ``parts``' rows in order; the parts give up their weights,
    so the model never holds two copies. With ``loaded`` False the parts' weights were never
    loaded (``loader.load_serving_model`` reads the fused ones from the file): nothing is
    concatenated, the fused weights are left to be set."""
    first = parts[0]
    fused = Linear(first.d_in, sum(p.d_out for p in parts), first.bias is not None, first.weight.dtype)
    fused.parts = [p.d_out for p in parts]  # output rows of each part, in order (LoRA stacks per part)
    fused.part_names = [p.weight.name.rsplit(".", 1)[0] for p in parts]  # their modules, e.g. ...attention.wq
    for attr in ("weight", "bias") if first.bias is not None else ("weight",):
        p = getattr(fused, attr)
        data = ops.cat([getattr(part, attr) for part in parts]) if loaded else initializer("zeros", p.shape, p.dtype)
        setattr(fused, attr, Parameter(data, name=f"{name}.{attr}", requires_grad=False))
    return fused


class Attention(nn.Cell):
    def __init__(self, cfg: Config, dtype):
        super().__init__()
        h = cfg.hidden_size
        self.n_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        # Grouped-query attention (InternLM2): n_kv k/v heads, each shared by ``groups`` query heads
        # (query head i reads k/v head i // groups); v1 is the case n_kv == n_heads.
        self.n_kv = cfg.kv_heads
        self.groups = self.n_heads // self.n_kv
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        # nh * hd is the hidden size except where the config gives head_dim (InternLM3 may)
        self.wq = Linear(h, self.n_heads * self.head_dim, cfg.bias, dtype)
        self.wk = Linear(h, self.n_kv * self.head_dim, cfg.bias, dtype)
        self.wv = Linear(h, self.n_kv * self.head_dim, cfg.bias, dtype)
        self.wo = Linear(self.n_heads * self.head_dim, h, cfg.out_bias, dtype)
        self.wqkv = None  # set by ``fuse``
        self.cached_attention = self.rope = None  # the CPU kernels, set by ``use_cpu_kernels``
        self.train_attention = None  # the CPU kernel, set by ``use_training_kernels``
        self.q_scale = Tensor([self.scale], ms.float32)
        self.head_counts = Tensor([self.n_heads, self.n_kv], ms.int32)  # the Rope kernel's q and k/v heads
        self.rot = Tensor(rotate_half_matrix(cfg.head_dim), dtype)
        self.bmm_kt = ops.BatchMatMul(transpose_b=True)  # q k^T without materialising k^T

    def fuse(self, name: str, loaded: bool = True) -> None:
        """The serving form: q, k and v from one matmul of ((nh + 2 n_kv) hd, h) (one weight read and
        one kernel instead of three); ``wq``/``wk``/``wv`` are replaced. Its rope tables come from
        ``fused_rope_tables``, which also carry the 1/sqrt(hd) score scale into q."""
        if self.wqkv is None:
            self.wqkv = fuse_linears([self.wq, self.wk, self.wv], f"{name}.wqkv", loaded)
            self.wq = self.wk = self.wv = None

    def _heads(self, x, b, t, heads):
        return x.reshape(b, t, heads, self.head_dim).transpose(0, 2, 1, 3)  # (B, heads, T, hd)

    def _expand(self, x):
        """(B, n_kv, S, hd) -> (B, nh, S, hd): each k/v head repeated for its query heads."""
        if self.groups == 1:
            return x
        b, _, s, d = x.shape
        return ops.broadcast_to(x.reshape(b, self.n_kv, 1, s, d), (b, self.n_kv, self.groups, s, d)).reshape(
            b, self.n_heads, s, d)

    def construct(self, x, cos, sin, mask, k_cache=None, v_cache=None, cache_index=None, attend_cache=False,
                  adapters=None, read_index=None):
        """x (B, T, C); cos/sin (B, 1, T, hd), fused form (B, nh + 2 n_kv, T, hd); mask (B, 1, T, S)
        additive; adapters (B,) or None. The caches hold the n_kv k/v heads.

        The engine's cache (``read_index`` given) is flat, (slots * n_kv * L, hd), float32 or float16 (the
        new rows cast to it; the kernel widens fp16 rows as it reads them): the new k/v rows are
        written at ``cache_index`` (B*n_kv*T,) = (slot * n_kv + head) * L + position, then each row
        attends the cache rows ``read_index`` (B, n_kv, S) = its slot's first S positions per head. ScatterUpdate on the first axis writes
        in place (0.4 ms); ScatterNdUpdate on a (slots, nh, L, hd) cache copied the whole cache
        per call (8 ms per layer and k/v at 9 x 2048 positions), so a step cost the allocated cache.

        With the CPU kernels (``cached_attention`` set) the engine passes ``read_index`` (B, n_kv), each
        (row, head)'s first cache row, and ``mask`` (B, T) int32, each query's position: one kernel
        writes the new rows at ``cache_index`` and query t attends rows first .. first + position,
        read where they lie (no scatter op, no gather, no mask tensor).

        The exported graphs' cache (no ``read_index``) is (slots, n_kv, L, hd) with ``cache_index``
        (B, n_kv, T, 3) = (slot, head, position): prefill attends within x (S == T), decode
        (``attend_cache``, one row per slot) attends the whole cache.
        """
        b, t, _ = x.shape
        if self.train_attention is not None:  # training: rotary, causal attention and layouts in one kernel
            return self.wo(self.train_attention(self.wq(x), self.wk(x), self.wv(x), cos, sin)[0])
        parts = [self.n_heads, self.n_kv, self.n_kv]
        if self.rope is not None:  # the CPU kernel: cos/sin are rope_tables' (B, T, hd), q scaled here
            qkv = self.rope(self.wqkv(x, adapters), cos, sin, self.q_scale, self.head_counts)
            if read_index is not None:  # one kernel writes the new k/v rows into the caches and attends
                out = self.cached_attention(qkv, k_cache, v_cache, cache_index, read_index, mask)  # (B, T, nh, hd)
                return self.wo(out.reshape(b, t, self.n_heads * self.head_dim), adapters)
            q, k, v = ops.split(qkv, parts, 1)
        elif self.wqkv is not None:
            # (B, nh + 2 n_kv, T, hd); cos/sin alike: q's scaled, v's 1 and 0, so one rotary pass
            # covers q and k and leaves v exactly as it was
            y = self._heads(self.wqkv(x, adapters), b, t, sum(parts))
            turned = ops.matmul(y.reshape(-1, self.head_dim), self.rot).reshape(y.shape)  # 2-D: no broadcast copy
            q, k, v = ops.split(y * cos + turned * sin, parts, 1)
        else:
            q = self._heads(self.wq(x, adapters), b, t, self.n_heads)
            k = self._heads(self.wk(x, adapters), b, t, self.n_kv)
            v = self._heads(self.wv(x, adapters), b, t, self.n_kv)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        if read_index is not None:
            flat = (b * self.n_kv * t, self.head_dim)
            k_new = ops.scatter_update(k_cache, cache_index, k.reshape(flat).astype(k_cache.dtype))
            v_new = ops.scatter_update(v_cache, cache_index, v.reshape(flat).astype(v_cache.dtype))
            # read after the write: depend on the update, gather only the live rows and positions
            k = ops.gather(ops.depend(k_cache, k_new), read_index, 0)  # (B, n_kv, S, hd)
            v = ops.gather(ops.depend(v_cache, v_new), read_index, 0)
            if k_cache.dtype != x.dtype:  # an fp16 cache asked for on this path: attention in x's dtype
                k, v = k.astype(x.dtype), v.astype(x.dtype)
        elif k_cache is not None:
            # In-place update of the preallocated cache; using the op's output orders the read after the write.
            k_all = ops.scatter_nd_update(k_cache, cache_index, k.astype(k_cache.dtype))
            v_all = ops.scatter_nd_update(v_cache, cache_index, v.astype(v_cache.dtype))
            if attend_cache:
                k, v = k_all, v_all
            else:  # keep the writes in the graph
                k, v = ops.depend(k, k_all), ops.depend(v, v_all)
        k, v = self._expand(k), self._expand(v)
        scores = self.bmm_kt(q.astype(ms.float32), k.astype(ms.float32))
        if self.wqkv is None:  # the fused path scaled q already
            scores = scores * self.scale
        probs = mint.softmax(scores + mask, dim=-1).astype(v.dtype)
        out = ops.matmul(probs, v)  # (B, nh, T, hd)
        out = out.transpose(0, 2, 1, 3).reshape(b, t, self.n_heads * self.head_dim)
        return self.wo(out.astype(x.dtype), adapters)


class FeedForward(nn.Cell):
    def __init__(self, cfg: Config, dtype):
        super().__init__()
        self.w1 = Linear(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, dtype)  # gate
        self.w2 = Linear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias, dtype)  # down
        self.w3 = Linear(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, dtype)  # up
        self.w13 = None  # set by ``fuse``
        self.silu_mul = None  # the CPU kernel, set by ``use_cpu_kernels`` (fused [gate | up]) or ``use_training_kernels``

    def fuse(self, name: str, loaded: bool = True) -> None:
        """The serving form: gate and up from one matmul; ``w1``/``w3`` are replaced."""
        if self.w13 is None:
            self.w13 = fuse_linears([self.w1, self.w3], f"{name}.w13", loaded)
            self.w1 = self.w3 = None

    def construct(self, x, adapters=None):
        if self.silu_mul is not None:
            if self.w13 is None:  # training (``use_training_kernels``): gate and up as separate layers
                return self.w2(self.silu_mul(self.w1(x), self.w3(x)))
            return self.w2(self.silu_mul(self.w13(x, adapters)), adapters)
        if self.w13 is not None:
            gate, up = ops.split(self.w13(x, adapters), self.w2.d_in, -1)
        else:
            gate, up = self.w1(x, adapters), self.w3(x, adapters)
        return self.w2(ops.silu(gate) * up, adapters)


class Block(nn.Cell):
    def __init__(self, cfg: Config, dtype):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.attention = Attention(cfg, dtype)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.feed_forward = FeedForward(cfg, dtype)

    def construct(self, x, cos, sin, mask, k_cache=None, v_cache=None, cache_index=None, attend_cache=False,
                  adapters=None, read_index=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, k_cache, v_cache, cache_index, attend_cache,
                               adapters, read_index)
        return x + self.feed_forward(self.ffn_norm(x), adapters)


class Embedding(nn.Cell):
    def __init__(self, vocab: int, dim: int, dtype):
        super().__init__()
        self.embedding_weight = Parameter(initializer("zeros", (vocab, dim), dtype), name="embedding_weight")
        self.kernel = None  # the CPU kernel (any table dtype), set by ``InternLMForCausalLM.use_cpu_kernels``

    def construct(self, ids):
        if self.kernel is not None:
            return self.kernel(ids, self.embedding_weight)
        return ops.gather(self.embedding_weight, ids, 0)


class InternLMModel(nn.Cell):
    def __init__(self, cfg: Config, dtype):
        super().__init__()
        self.tok_embeddings = Embedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.layers = nn.CellList([Block(cfg, dtype) for _ in range(cfg.num_layers)])
        self.norm_out = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


class InternLMForCausalLM(nn.Cell):
    """``construct(ids, cos, sin, mask) -> logits (B, T, V)`` with no cache (training, parity)."""

    def __init__(self, cfg: Config, dtype: str | None = None):
        super().__init__()
        self.config = cfg
        dtype = dtype or compute_dtype_for(cfg)
        if dtype == "bfloat16" and ms.get_context("device_target") == "CPU":
            # Seen on MindSpore 2.9: bf16 matmuls have no CPU kernel. Stored bf16 weights are fine.
            raise ValueError("bfloat16 compute has no CPU kernels; compute in float32 (default) or float16")
        self.dtype = MS_DTYPES[dtype]
        self.model = InternLMModel(cfg, self.dtype)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, False, self.dtype)
        self.training_kernels = False  # set by ``use_training_kernels``
        # Sub-cells built before being attached keep short names; give every parameter its full name.
        for name, p in self.parameters_and_names():
            p.name = name

    @property
    def fused(self) -> bool:
        return self.model.layers[0].attention.wqkv is not None

    def fuse_projections(self, loaded: bool = True) -> "InternLMForCausalLM":
        """Switch to the serving form (idempotent): q/k/v and w1/w3 each become one matmul, the
        separate weights are dropped. The rope tables it takes are ``fused_rope_tables``'.
        ``loaded=False``: no weights were loaded yet, and the fused ones are left to be set (what
        ``loader.load_serving_model`` does; the unfused weights never take memory).
        Outputs stay the same; parameter names become
        ``...attention.wqkv`` and ``...feed_forward.w13``, so save and train the unfused form
        (checkpoints keep MindFormers' names)."""
        for i, layer in enumerate(self.model.layers):
            layer.attention.fuse(f"model.layers.{i}.attention", loaded)
            layer.feed_forward.fuse(f"model.layers.{i}.feed_forward", loaded)
        for name, p in self.parameters_and_names():  # the fused cells were attached with short names
            p.name = name
        return self

    def use_cpu_kernels(self) -> bool:
        """Serve with the CPU kernels (``kernels``): every linear of the fused form and the head
        packed (fp32 here; ``loader.load_serving_model`` packs them from the file in the stored
        dtype), the embedding rows gathered by a kernel, attention read from the cache where it
        lies, norms, rotary and SwiGLU one kernel each; the rope tables it takes are then ``rope_tables``' (B, T, hd), not the fused ones.
        Needs the fused form; False (and nothing changed) where the kernels are unavailable
        (``kernels.unavailable()`` says why)."""
        if not self.fused or self.dtype != ms.float32 or kernels.library() is None:
            return False
        for _, cell in self.cells_and_names():
            if isinstance(cell, Linear):
                cell.pack()
            elif isinstance(cell, RMSNorm):
                cell.kernel = kernels.rms_norm_op()
            elif isinstance(cell, FeedForward):
                cell.silu_mul = kernels.silu_mul_op()
            elif isinstance(cell, Attention):
                cell.cached_attention, cell.rope = kernels.attention_op(), kernels.rope_op()
            elif isinstance(cell, Embedding):
                cell.kernel = kernels.embedding_op()
        return True

    @property
    def uses_cpu_kernels(self) -> bool:
        return self.model.layers[0].attention.rope is not None

    def use_training_kernels(self) -> bool:
        """Train with the CPU kernels (``train_kernels``): every linear a oneDNN GEMM
        whose backward pass computes the weight's gradient only where the weight trains, rotary
        and causal attention in one kernel each way (the mask is taken to be causal, as training's
        right-padded rows are), RMSNorm and SwiGLU with one-pass gradients, LoRA dropout by a
        hashed mask. Call it once what trains is
        settled (after ``inject_lora``). Unfused float32 form only; False (nothing changed) where
        the kernels are unavailable (``kernels.training_unavailable()`` says why)."""
        if self.fused or self.dtype != ms.float32 or not train_kernels.available():
            return False
        for _, cell in self.cells_and_names():
            if isinstance(cell, Linear):
                cell.train_matmul = train_kernels.train_linear_op(cell.bias is not None, cell.weight.requires_grad)
            elif isinstance(cell, RMSNorm):
                cell.kernel = train_kernels.train_rms_norm_op()
            elif isinstance(cell, FeedForward):
                cell.silu_mul = train_kernels.swiglu_op()
            elif isinstance(cell, Attention) and cell.head_dim % kernels.PANEL == 0:  # whole vectors per head
                cell.train_attention = train_kernels.causal_attention_op()
            elif cell is not self and hasattr(cell, "use_training_kernels"):  # LoRA layers (lora.py)
                cell.use_training_kernels()
        self.training_kernels = True
        return True

    def linear_for(self, module: str):
        """(Linear, part, part sizes): the layer computing a MindFormers module's outputs, which are
        that layer's output rows of part ``part``, e.g. ``model.layers.0.attention.wk`` -> (that
        layer's wqkv, 1, [q rows, k rows, v rows]) in the fused form, (wk, 0, [k rows]) unfused."""
        layer, leaf = module.rsplit(".", 1)
        cell = self
        for part in layer.split("."):
            cell = cell[int(part)] if part.isdigit() else getattr(cell, part)
        for fused, members in (("wqkv", ("wq", "wk", "wv")), ("w13", ("w1", "w3"))):
            if leaf in members and getattr(cell, fused, None) is not None:
                lin = getattr(cell, fused)
                return lin, members.index(leaf), lin.parts
        lin = getattr(cell, leaf)
        return lin, 0, [lin.d_out]

    def hidden(self, ids, cos, sin, mask, caches=None, cache_index=None, attend_cache=False, adapters=None,
               read_index=None):
        """Final hidden states; in the fused form cos/sin are ``fused_rope_tables``'."""
        x = self.model.tok_embeddings(ids)
        for i, layer in enumerate(self.model.layers):
            if caches is None:
                x = layer(x, cos, sin, mask, adapters=adapters)
            else:
                x = layer(x, cos, sin, mask, caches[2 * i], caches[2 * i + 1], cache_index, attend_cache, adapters,
                          read_index)
        return self.model.norm_out(x)

    def construct(self, ids, cos, sin, mask):
        # PyNative only (parity checks on a served model); the engine builds its tables itself
        if self.uses_cpu_kernels:
            cos, sin = (Tensor(t.asnumpy()[:, 0]) for t in (cos, sin))
        elif self.fused:
            cos, sin = (Tensor(t) for t in fused_rope_tables(cos.asnumpy(), sin.asnumpy(), self.config.num_heads,
                                                              self.config.kv_heads))
        return self.lm_head(self.hidden(ids, cos, sin, mask)).astype(ms.float32)


# ---- host-side inputs ---------------------------------------------------------------------

def rope_base(cfg: Config, seq_len: int) -> float:
    """Dynamic NTK (20B): the base grows once a sequence passes max positions."""
    if cfg.rope_scaling == "dynamic" and seq_len > cfg.max_position_embeddings:
        f, d = cfg.rope_scaling_factor, cfg.head_dim
        return cfg.rope_base * ((f * seq_len / cfg.max_position_embeddings) - (f - 1)) ** (d / (d - 2))
    return cfg.rope_base


def rope_tables(cfg: Config, positions: np.ndarray, seq_lens=None):
    """cos, sin (B, 1, T, hd) float32 for integer positions (B, T).

    ``seq_lens`` (B,) is each row's total length, which sets the dynamic-NTK base (as HF
    does, the current length rescales the new tokens; cached keys keep their rotation).
    """
    positions = np.asarray(positions)
    if seq_lens is None:
        seq_lens = positions.max(-1) + 1
    d = cfg.head_dim
    bases = np.array([rope_base(cfg, int(n)) for n in np.asarray(seq_lens).reshape(-1)], np.float64)
    inv_freq = 1.0 / (bases[:, None] ** (np.arange(0, d, 2, dtype=np.float64) / d))  # (B, hd/2)
    freqs = positions[..., None].astype(np.float64) * inv_freq[:, None, :]  # (B, T, hd/2)
    emb = np.concatenate([freqs, freqs], -1)[:, None]
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def fused_rope_tables(cos: np.ndarray, sin: np.ndarray, num_heads: int, kv_heads: int):
    """(B, 1, T, hd) tables -> (B, nh + 2 n_kv, T, hd) for the fused q/k/v heads: q's scaled by
    1/sqrt(hd) (the score scale, applied here once instead of on every layer's scores), k's as
    they are, v's cos 1 and sin 0 (v passes unrotated)."""
    scale = np.float32(1.0 / math.sqrt(cos.shape[-1]))
    q_c, q_s = np.tile(cos, (1, num_heads, 1, 1)), np.tile(sin, (1, num_heads, 1, 1))
    k_c, k_s = np.tile(cos, (1, kv_heads, 1, 1)), np.tile(sin, (1, kv_heads, 1, 1))
    return (np.concatenate([q_c * scale, k_c, np.ones_like(k_c)], 1),
            np.concatenate([q_s * scale, k_s, np.zeros_like(k_s)], 1))


def causal_mask(lengths: np.ndarray, t: int) -> np.ndarray:
    """(B, 1, T, T) additive: query i sees keys j <= i that are inside the row's length."""
    j = np.arange(t)
    ok = (j[None, :] <= j[:, None])[None] & (j[None, None, :] < np.asarray(lengths)[:, None, None])
    return np.where(ok, 0.0, NEG_INF).astype(np.float32)[:, None]


def forward_inputs(cfg: Config, ids: np.ndarray, lengths=None):
    """Tensors for a cache-free forward of right-padded ids (B, T)."""
    ids = np.asarray(ids, dtype=np.int32)
    b, t = ids.shape
    lengths = np.full(b, t) if lengths is None else np.asarray(lengths)
    positions = np.broadcast_to(np.arange(t), (b, t))
    cos, sin = rope_tables(cfg, positions, lengths)
    return Tensor(ids), Tensor(cos), Tensor(sin), Tensor(causal_mask(lengths, t))


def init_weights(model: InternLMForCausalLM, seed: int = 0, std: float = 0.02) -> None:
    """Random normal init (norms stay 1, biases small) for tests and training from scratch."""
    rng = np.random.default_rng(seed)
    for name, p in model.parameters_and_names():
        if name.endswith("norm.weight") or name.endswith("norm_out.weight"):
            continue
        scale = std if name.endswith("weight") else std / 4
        p.set_data(Tensor(rng.normal(0.0, scale, p.shape).astype(np.float32), p.dtype))
