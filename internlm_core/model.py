"""The InternLM v1 decoder in MindSpore, top to bottom, plus its preallocated KV cache.

A pre-norm LLaMA: RMSNorm, rotate-half rotary, SwiGLU MLP, untied head; the 7B family adds
bias to q/k/v/o. Parameter names are MindFormers' so checkpoints load there unchanged.

How each layer computes is one object chosen when the model is built (``ops``, see ``forms``):
MindSpore's own ops (the same code on CPU, GPU and Ascend), or the project's serving or training
CPU kernels; each cell's ``construct`` is one path that calls it. Host-side numpy builds the small
per-call inputs (rotary tables, masks, cache indices) so that each graph compiles once per shape
and padding can never leak into positions or attention.

Two layouts: the unfused one (q/k/v and gate/up three and two matmuls: trained, saved, exported)
and the fused serving form (``fused=True``, ``serving_form``; the engine serves it): q/k/v and
gate/up each one matmul, rotary as one small matmul over q, k and v together, the score scale
carried by q's rope tables. On this CPU a decode step is bound by per-kernel cost as much as by
arithmetic, so fewer, larger kernels are what makes it faster (measured: 8 rows of the 512-wide
bench model 39 -> 36 ms a step, 450 -> 305 kernels).
"""
from __future__ import annotations

import math

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from . import kernels
from .config import Config
from .forms import SERVING_KERNELS, TRAINING_KERNELS, MindSporeOps

MS_DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}
NEG_INF = -1e9  # additive mask; scores are fp32 so this underflows cleanly in softmax


def compute_dtype_for(cfg: Config) -> str:
    """CPU kernels for half-precision matmuls are missing or slow: compute in fp32 there."""
    if ms.get_context("device_target") == "CPU":
        return "float32"
    return cfg.dtype


class Linear(nn.Cell):
    """y = x W^T (+ b), weight [out, in] like torch and MindFormers, computed by ``ops.linear``.

    Serving LoRA adapters without merging: ``Engine.load_adapter`` sets ``lora_a`` (n+1, r, in)
    and ``lora_b`` (n+1, out, r) (scaling folded in, row 0 all zeros = no adapter), and each
    batch row picks its adapter with ``adapters`` (B,) int32. Without them nothing changes.

    On the serving kernels (``forms.ServingKernels``) ``pack`` places the weight in the layout the
    kernel reads, once, when the weights are loaded; ``weight_scale`` is then an int8 weight's
    per-output-channel scales (N,) fp32, or an int4 weight's group scales. ``trains``: whether the weight's gradient is computed
    (``freeze`` turns it off; the training kernels then skip that GEMM).
    """

    def __init__(self, d_in: int, d_out: int, bias: bool, dtype=ms.float32, ops=None):
        super().__init__()
        self.ops = ops or MindSporeOps()
        self.d_in, self.d_out = d_in, d_out
        # Lazy initializers: no memory is taken until weights are loaded, so loading a
        # checkpoint never holds two copies of the model.
        self.weight = Parameter(initializer("zeros", (d_out, d_in), dtype), name="weight")
        self.bias = Parameter(initializer("zeros", (d_out,), dtype), name="bias") if bias else None
        self.weight_scale = None
        self.trains = True
        self.held = False  # ``hold``: a frozen weight in its stored precision
        self.lora_a = None
        self.lora_b = None

    def hold(self, weight: Tensor, scale: Tensor | None = None) -> None:
        """Hold this layer's weight frozen in another precision than its compute dtype, in its (out,
        in) layout: a bf16 or fp16 weight as the checkpoint stores it, or int8 with its per-row
        ``scale`` (N,) fp32 (``loader.load_frozen_base``, LoRA's base on the training kernels, which
        widen it inside FrozenLinear). The weight is never loaded in fp32 first."""
        if self.ops.name != TRAINING_KERNELS:
            raise ValueError(f"a weight held in its stored precision is the training kernels'; this layer runs on "
                             f"{self.ops.name}")
        if (weight.dtype == ms.int8) != (scale is not None):
            raise ValueError("an int8 weight comes with its scales, and only an int8 one")
        self.weight = parameter_of(weight, self.weight.name)
        if scale is not None:
            self.weight_scale = parameter_of(scale, self.weight.name + "_scale")
        self.held = True
        self.freeze()

    def freeze(self) -> None:
        """Not trained: no gradient is asked for its weight (or bias), nor computed by a kernel."""
        for p in (self.weight, self.bias):
            if p is not None:
                p.requires_grad = False
        self.trains = False

    @property
    def packed(self) -> bool:
        return len(self.weight.shape) == 3

    def pack(self, packed: Tensor | None = None, scale: Tensor | None = None) -> None:
        """Place the weight in ``kernels.pack``'s layout for the serving kernels (idempotent; weights
        whose rows are a multiple of 16; a once-only conversion at load, the weight replaced so there
        is still one copy). Without ``packed`` the loaded fp32 weight is packed here; ``packed`` is the
        weight already in that layout, fp32, bf16 or fp16, or int8 with its per-output-channel
        ``scale`` (N,) fp32 (int4: uint8 pairs with (P, K/32, 16) group scales) (``loader.load_serving_model`` builds it straight from the file, and this
        layer's own weight is never loaded)."""
        if self.ops.name != SERVING_KERNELS:
            raise ValueError(f"packed weights are the serving kernels' layout; this layer runs on {self.ops.name}")
        if self.packed or self.d_out % kernels.PANEL:
            return
        if packed is None:
            if self.weight.dtype != ms.float32:
                return
            packed = Tensor(kernels.pack(self.weight.asnumpy()))
        if (packed.dtype in (ms.int8, ms.uint8)) != (scale is not None):
            raise ValueError("a quantised (int8, or int4 as uint8 pairs) packed weight comes with its scales, "
                             "and only such a one")
        self.weight = parameter_of(packed, self.weight.name)
        if scale is not None:
            self.weight_scale = parameter_of(scale, self.weight.name + "_scale")

    def construct(self, x, adapters=None):
        y = self.ops.linear(x, self.weight, self.bias, self.weight_scale, self.trains)
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
    def __init__(self, dim: int, eps: float, dtype=ms.float32, ops=None):
        super().__init__()
        self.ops = ops or MindSporeOps()
        self.weight = Parameter(initializer("ones", (dim,), dtype), name="weight")
        self.eps = eps
        self.eps_tensor = Tensor([eps], ms.float32)

    def construct(self, x):
        return self.ops.rms_norm(x, self.weight, self.eps_tensor)


def rotate_half_matrix(d: int) -> np.ndarray:
    """R with x @ R == rotate_half(x), exactly (one +-1 per column): one matmul instead of
    two slices, a negation and a concat."""
    r, half = np.zeros((d, d), np.float32), d // 2
    r[np.arange(half, d), np.arange(half)] = -1.0
    r[np.arange(half), np.arange(half, d)] = 1.0
    return r


def fused_linear(parts: list[tuple[str, int]], d_in: int, bias: bool, dtype, ops) -> Linear:
    """One Linear whose output rows are the named parts' rows in order, e.g. [("wq", h), ("wk", kv),
    ("wv", kv)]: one weight read and one kernel instead of several. ``parts`` (rows of each) and
    ``part_names`` (their MindFormers modules, set once the model names its cells) say where each
    part's rows come from (loading, LoRA stacks per part)."""
    fused = Linear(d_in, sum(n for _, n in parts), bias, dtype, ops)
    fused.parts = [n for _, n in parts]
    fused.part_leaves = [leaf for leaf, _ in parts]
    return fused


class Attention(nn.Cell):
    """q/k/v as three matmuls (the trained, saved and exported form): ``ops.attention``."""

    def __init__(self, cfg: Config, dtype, ops):
        super().__init__()
        h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        # Grouped-query attention (InternLM2): n_kv k/v heads, each shared by nh / n_kv query heads
        # (query head i reads k/v head i // groups); v1 is the case n_kv == n_heads.
        self.shape, self.ops = (cfg.num_heads, cfg.kv_heads, cfg.head_dim), ops  # (nh, n_kv, hd)
        # q is nh * hd wide: the hidden size except where the config gives head_dim (InternLM3 may)
        self.wq = Linear(h, q, cfg.bias, dtype, ops)
        self.wk = Linear(h, kv, cfg.bias, dtype, ops)
        self.wv = Linear(h, kv, cfg.bias, dtype, ops)
        self.wo = Linear(q, h, cfg.out_bias, dtype, ops)

    def construct(self, x, cos, sin, mask, k_cache=None, v_cache=None, cache_index=None, attend_cache=False,
                  adapters=None, read_index=None):
        """x (B, T, C); cos/sin (B, 1, T, hd); mask (B, 1, T, S) additive; the exported graphs' caches
        (``forms.MindSporeOps.attention``)."""
        out = self.ops.attention(self.wq(x, adapters), self.wk(x, adapters), self.wv(x, adapters), cos, sin, mask,
                                 k_cache, v_cache, cache_index, attend_cache, self.shape)
        return self.wo(out, adapters)


class FusedAttention(nn.Cell):
    """The serving form: q, k and v from one matmul of ((nh + 2 n_kv) hd, h) (``wqkv``), the score
    scale carried by q's rope tables (``InternLMForCausalLM.rope_inputs``): ``ops.fused_attention``
    over the engine's flat KV cache (see ``forms``)."""

    def __init__(self, cfg: Config, dtype, ops):
        super().__init__()
        h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        self.shape, self.ops = (cfg.num_heads, cfg.kv_heads, cfg.head_dim), ops  # (nh, n_kv, hd)
        self.wqkv = fused_linear([("wq", q), ("wk", kv), ("wv", kv)], h, cfg.bias, dtype, ops)
        self.wo = Linear(q, h, cfg.out_bias, dtype, ops)
        self.q_scale = Tensor([1.0 / math.sqrt(cfg.head_dim)], ms.float32)
        self.head_counts = Tensor([cfg.num_heads, cfg.kv_heads], ms.int32)  # the Rope kernel's q and k/v heads
        self.rot = Tensor(rotate_half_matrix(cfg.head_dim), dtype)

    def construct(self, x, cos, sin, mask, k_cache=None, v_cache=None, cache_index=None, attend_cache=False,
                  adapters=None, read_index=None):
        """x (B, T, C); the cache (``read_index`` given) is flat, (slots * n_kv * L, hd), float32 or
        float16, the new k/v rows written at ``cache_index`` (B*n_kv*T,) = (slot * n_kv + head) * L +
        position; what ``read_index``, ``mask`` and cos/sin hold depends on the form (``Engine._run``
        builds them, ``forms`` reads them)."""
        out = self.ops.fused_attention(self.wqkv(x, adapters), cos, sin, self.rot, mask, k_cache, v_cache,
                                       cache_index, read_index, self.q_scale, self.head_counts, self.shape)
        return self.wo(out, adapters)


class FeedForward(nn.Cell):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: Config, dtype, ops):
        super().__init__()
        self.ops = ops
        self.w1 = Linear(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, dtype, ops)  # gate
        self.w2 = Linear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias, dtype, ops)  # down
        self.w3 = Linear(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, dtype, ops)  # up

    def construct(self, x, adapters=None):
        return self.w2(self.ops.swiglu(self.w1(x, adapters), self.w3(x, adapters)), adapters)


class FusedFeedForward(nn.Cell):
    """The serving form: gate and up from one matmul (``w13``)."""

    def __init__(self, cfg: Config, dtype, ops):
        super().__init__()
        self.ops = ops
        i = cfg.intermediate_size
        self.w13 = fused_linear([("w1", i), ("w3", i)], cfg.hidden_size, cfg.mlp_bias, dtype, ops)
        self.w2 = Linear(i, cfg.hidden_size, cfg.mlp_bias, dtype, ops)  # down

    def construct(self, x, adapters=None):
        return self.w2(self.ops.silu_mul(self.w13(x, adapters)), adapters)


class Block(nn.Cell):
    def __init__(self, cfg: Config, dtype, ops, fused: bool):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, ops)
        self.attention = (FusedAttention if fused else Attention)(cfg, dtype, ops)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, ops)
        self.feed_forward = (FusedFeedForward if fused else FeedForward)(cfg, dtype, ops)

    def construct(self, x, cos, sin, mask, k_cache=None, v_cache=None, cache_index=None, attend_cache=False,
                  adapters=None, read_index=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, k_cache, v_cache, cache_index, attend_cache,
                               adapters, read_index)
        return x + self.feed_forward(self.ffn_norm(x), adapters)


class Embedding(nn.Cell):
    def __init__(self, vocab: int, dim: int, dtype, ops):
        super().__init__()
        self.ops = ops
        self.embedding_weight = Parameter(initializer("zeros", (vocab, dim), dtype), name="embedding_weight")

    def construct(self, ids):
        return self.ops.embedding(ids, self.embedding_weight)


class InternLMModel(nn.Cell):
    def __init__(self, cfg: Config, dtype, ops, fused: bool):
        super().__init__()
        self.tok_embeddings = Embedding(cfg.vocab_size, cfg.hidden_size, dtype, ops)
        self.layers = nn.CellList([Block(cfg, dtype, ops, fused) for _ in range(cfg.num_layers)])
        self.norm_out = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, ops)


class InternLMForCausalLM(nn.Cell):
    """``construct(ids, cos, sin, mask) -> logits (B, T, V)`` with no cache (training, parity).

    ``ops`` (``forms``) is how every layer computes, fixed here: MindSpore's ops by default, the
    serving or training CPU kernels where chosen (``forms.serving_ops`` / ``training_ops``).
    ``fused``: the serving form (q/k/v and gate/up each one matmul, parameters ``...attention.wqkv``
    and ``...feed_forward.w13``); the unfused form is the one trained, saved and exported
    (checkpoints keep MindFormers' names). ``serving_form`` makes the one from the other.
    """

    def __init__(self, cfg: Config, dtype: str | None = None, ops=None, fused: bool = False):
        super().__init__()
        self.config = cfg
        dtype = dtype or compute_dtype_for(cfg)
        if dtype == "bfloat16" and ms.get_context("device_target") == "CPU":
            # Seen on MindSpore 2.9: bf16 matmuls have no CPU kernel. Stored bf16 weights are fine.
            raise ValueError("bfloat16 compute has no CPU kernels; compute in float32 (default) or float16")
        self.ops = ops = ops or MindSporeOps()
        if ops.cpu_kernels and dtype != "float32":
            raise ValueError(f"the {ops.name} form computes in float32, not {dtype}")
        if (ops.name == SERVING_KERNELS and not fused) or (ops.name == TRAINING_KERNELS and fused):
            raise ValueError(f"the {ops.name} form runs the {'un' if fused else ''}fused model")
        self.dtype, self.fused = MS_DTYPES[dtype], fused
        self.model = InternLMModel(cfg, self.dtype, ops, fused)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, False, self.dtype, ops)
        # Sub-cells built before being attached keep short names; give every parameter its full name.
        for name, p in self.parameters_and_names():
            p.name = name
        for name, cell in self.cells_and_names():
            if isinstance(cell, Linear) and hasattr(cell, "part_leaves"):  # e.g. ...attention.wq for wqkv
                cell.part_names = [f"{name.rsplit('.', 1)[0]}.{leaf}" for leaf in cell.part_leaves]

    @property
    def compute_dtype(self) -> str:
        return next(name for name, dt in MS_DTYPES.items() if dt == self.dtype)

    def serving_form(self, form) -> "InternLMForCausalLM":
        """This model's weights in the fused serving form on ``form`` (``forms``), as a new model (this one is
        left as it is): q/k/v and gate/up concatenated, every other weight shared; on the serving
        kernels each linear then packed (an fp32 copy). ``self`` when it is that form already."""
        if self.fused and self.ops.name == form.name:
            return self
        if self.fused and any(isinstance(c, Linear) and c.packed for _, c in self.cells_and_names()):
            raise ValueError(f"this model's weights are packed for {self.ops.name}: it cannot serve on {form.name} "
                             "(load it with loader.load_model)")
        out = InternLMForCausalLM(self.config, self.compute_dtype, ops=form, fused=True)
        mine = dict(self.parameters_and_names())
        for name, cell in out.cells_and_names():
            if isinstance(cell, Linear):
                sources = [name] if f"{name}.weight" in mine else cell.part_names
                for attr in ("weight", "bias") if cell.bias is not None else ("weight",):
                    parts = [mine[f"{s}.{attr}"] for s in sources]
                    setattr(cell, attr, parts[0] if len(parts) == 1 else
                            Parameter(ops.cat(parts), name=f"{name}.{attr}", requires_grad=False))
                if form.name == SERVING_KERNELS:
                    cell.pack()
            elif isinstance(cell, RMSNorm):
                cell.weight = mine[f"{name}.weight"]
            elif isinstance(cell, Embedding):
                cell.embedding_weight = mine[f"{name}.embedding_weight"]
        return out

    def rope_inputs(self, cos: np.ndarray, sin: np.ndarray):
        """``rope_tables``' (B, 1, T, hd) tables as this form's attention takes them: the serving
        kernels (B, T, hd), MindSpore's fused form ``fused_rope_tables``', the unfused form as they are."""
        if not self.fused:
            return cos, sin
        if self.ops.cpu_kernels:
            return cos[:, 0], sin[:, 0]
        return fused_rope_tables(cos, sin, self.config.num_heads, self.config.kv_heads)

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
        """Final hidden states; cos/sin as ``rope_inputs`` gives them."""
        x = self.model.tok_embeddings(ids)
        for i, layer in enumerate(self.model.layers):
            if caches is None:
                x = layer(x, cos, sin, mask, adapters=adapters)
            else:
                x = layer(x, cos, sin, mask, caches[2 * i], caches[2 * i + 1], cache_index, attend_cache, adapters,
                          read_index)
        return self.model.norm_out(x)

    def construct(self, ids, cos, sin, mask):
        if self.fused:  # PyNative only (parity checks on a served model); the engine builds its tables itself
            cos, sin = (Tensor(t) for t in self.rope_inputs(cos.asnumpy(), sin.asnumpy()))
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
