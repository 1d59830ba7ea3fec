"""LoRA for training: a wrapping linear layer, adapter-only folders, and merging into a full model.

LoRA output (as MindFormers' and PEFT's): ``x W^T + b + dropout(x) A^T B^T * (alpha / rank)``,
A [rank, in], B [out, rank], B initialised to zero so training starts from the base model.

An adapter folder holds ``adapter_config.json`` (rank, alpha, dropout, targets, the base
model's shape) and ``adapter.safetensors`` with ``<module>.lora_a`` / ``<module>.lora_b`` under
the base model's MindFormers module names, e.g. ``model.layers.0.attention.wq.lora_a``.
Merging and serving (``Engine.load_adapter``) read the same folder.

Dropout draws its mask from a counter-based hash of (step seed, layer salt, element index), not
from a stateful generator, so a resumed run draws exactly the masks the uninterrupted run drew;
the hash is one definition (``forms.MindSporeOps.dropout``, HashDropout in ``train_kernels.cc``),
so both training forms draw the same masks.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checkpoint import (WEIGHTS_FILE, CheckpointError, SafetensorsFile, SafetensorsWriter, atomic_folder, confined,
                         read_config, to_float32)
from .config import Config
from .errors import AdapterError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_FORMAT = "internlm-lora/1"
ATTENTION_TARGETS = ("wq", "wk", "wv", "wo")
MLP_TARGETS = ("w1", "w2", "w3")
ALL_TARGETS = ATTENTION_TARGETS + MLP_TARGETS
DEFAULT_TARGETS = "wq|wk|wv|wo"


def parse_targets(pattern: str) -> tuple[str, ...]:
    """Module names a target pattern selects: a regex over wq/wk/wv/wo/w1/w2/w3 (``wq|wv``,
    ``w[qkvo]``, ``.*``) or a comma list (``wq,wv,w1``)."""
    if not isinstance(pattern, str) or not pattern.strip():
        raise ValueError("LoRA targets must be a non-empty pattern over wq, wk, wv, wo, w1, w2, w3")
    pattern = "|".join(p.strip() for p in pattern.split(",")) if "," in pattern else pattern.strip()
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"LoRA targets {pattern!r} is not a valid pattern: {e}") from None
    chosen = tuple(t for t in ALL_TARGETS if rx.fullmatch(t))
    if not chosen:
        raise ValueError(f"LoRA targets {pattern!r} match none of {', '.join(ALL_TARGETS)}")
    return chosen


def target_modules(cfg: Config, targets: tuple[str, ...]) -> list[str]:
    """Full module names, e.g. ``model.layers.3.attention.wq``, in a fixed order."""
    out = []
    for i in range(cfg.num_layers):
        for t in targets:
            out.append(f"model.layers.{i}.{'attention' if t in ATTENTION_TARGETS else 'feed_forward'}.{t}")
    return out


def module_shape(cfg: Config, module: str) -> tuple[int, int]:
    """(out, in) of a target linear (k and v have fewer rows under grouped-query attention; q and o
    are nh * hd wide, which is the hidden size unless the config gives head_dim)."""
    leaf = module.rsplit(".", 1)[1]
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    return {"wq": (q, h), "wk": (kv, h), "wv": (kv, h), "wo": (h, q), "w1": (i, h), "w3": (i, h), "w2": (h, i)}[leaf]


@dataclass(frozen=True)
class AdapterSpec:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ATTENTION_TARGETS

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


# ---- the training layer (MindSpore) ----------------------------------------------------------

def _lora_cell_class():
    import mindspore as ms
    from mindspore import Parameter, Tensor, nn

    from .forms import dropout_constants, dropout_cut

    class LoRALinear(nn.Cell):
        """Wraps a base ``Linear``: keeps its (frozen) weight/bias under the same names and adds
        trainable ``lora_a`` / ``lora_b``, computing with the base's ``ops`` (``forms``): on the
        training kernels the frozen base's GEMM computes no weight gradient, A and B's do. ``seed``
        is a shared scalar Parameter the trainer sets before each micro-step; a negative seed turns
        dropout off (evaluation). Dropout's mask is ``forms``' one hash of (seed, salt, index) on
        either form."""

        def __init__(self, base, rank: int, alpha: float, dropout: float, seed, salt: float, init_seed: int):
            super().__init__()
            out_f, in_f = base.weight.shape
            self.ops = base.ops
            self.weight, self.bias, self.weight_scale = base.weight, base.bias, base.weight_scale
            self.weight.requires_grad = False
            if self.bias is not None:
                self.bias.requires_grad = False
            # A like nn.Linear's default (kaiming-uniform, a=sqrt(5)); B zero so the start equals the base.
            bound = 1.0 / math.sqrt(in_f)
            a = np.random.default_rng(init_seed).uniform(-bound, bound, (rank, in_f)).astype(np.float32)
            # in the compute dtype: a base held in its stored precision (``Linear.hold``) computes in fp32
            dtype = ms.float32 if base.held else base.weight.dtype
            self.lora_a = Parameter(Tensor(a, dtype), name="lora_a")
            self.lora_b = Parameter(Tensor(np.zeros((out_f, rank), np.float32), dtype), name="lora_b")
            self.scaling = alpha / rank
            self.p = float(dropout)
            self.seed = seed
            self.dropout_cfg = Tensor([self.p, float(salt)], ms.float32)
            self.dropout_cut, self.dropout_scale = dropout_cut(self.p), dropout_constants(self.p)[1]

        def construct(self, x, adapters=None):  # ``adapters`` is the serving path's; unused in training
            y = self.ops.linear(x, self.weight, self.bias, self.weight_scale, False)
            h = x
            if self.p > 0:
                h = self.ops.dropout(x, self.seed, self.dropout_cfg, self.dropout_cut, self.dropout_scale)
            return y + self.ops.linear(self.ops.linear(h, self.lora_a, None, None, True), self.lora_b, None, None,
                                       True) * self.scaling

    return LoRALinear


def inject_lora(model, spec: AdapterSpec, seed: int = 0):
    """Replace the target linears of ``model`` by LoRA layers; freeze everything else.

    Returns the shared dropout-seed Parameter (the trainer sets it each micro-step).
    """
    import mindspore as ms
    from mindspore import Parameter, Tensor

    LoRALinear = _lora_cell_class()
    from .model import Linear

    drop_seed = Parameter(Tensor(-1.0, ms.float32), name="lora_dropout_seed", requires_grad=False)
    for p in model.get_parameters():
        p.requires_grad = False
    for _, cell in model.cells_and_names():
        if isinstance(cell, Linear):
            cell.freeze()
    for k, name in enumerate(target_modules(model.config, spec.targets)):
        parent_name, leaf = name.rsplit(".", 1)
        parent = model
        for part in parent_name.split("."):
            parent = parent[int(part)] if part.isdigit() else getattr(parent, part)
        base = getattr(parent, leaf)
        setattr(parent, leaf, LoRALinear(base, spec.rank, spec.alpha, spec.dropout, drop_seed,
                                         salt=float(k) * 1.7320508, init_seed=seed * 100003 + k))
    # Cells swapped into a built network keep short parameter names (``lora_a``): give every
    # parameter its full name again, or the optimiser sees duplicates.
    for name, p in model.parameters_and_names():
        p.name = name
    drop_seed.name = "lora_dropout_seed"  # shared by every LoRA layer: not under one module's name
    return drop_seed


def lora_state(model) -> dict[str, np.ndarray]:
    """The LoRA weights of an injected model as float32 numpy, by full name."""
    import mindspore as ms

    return {n: (p.astype(ms.float32) if p.dtype != ms.float32 else p).asnumpy()
            for n, p in model.parameters_and_names() if n.endswith((".lora_a", ".lora_b"))}


# ---- adapter folders (numpy only) -------------------------------------------------------------

def save_adapter(weights: dict[str, np.ndarray], spec: AdapterSpec, cfg: Config, folder: Path,
                 overwrite: bool = False, extra_files: dict | None = None) -> Path:
    names = [f"{m}.{ab}" for m in target_modules(cfg, spec.targets) for ab in ("lora_a", "lora_b")]
    missing = [n for n in names if n not in weights]
    if missing:
        raise AdapterError(f"adapter weights lack {missing[:3]}")
    meta = {"format": ADAPTER_FORMAT, "rank": spec.rank, "alpha": spec.alpha, "dropout": spec.dropout,
            "targets": list(spec.targets), "base": _base_shape(cfg)}
    with atomic_folder(folder, overwrite) as tmp:
        w = SafetensorsWriter(tmp / ADAPTER_WEIGHTS, [(n, "F32", tuple(weights[n].shape)) for n in names],
                              {"format": "ms"})
        for n in names:
            w.write(n, np.ascontiguousarray(weights[n], np.float32))
        w.close()
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(folder)


def _base_shape(cfg: Config) -> dict:
    # keys only where they differ from v1's shape, so v1 adapters keep their record
    gqa = {"num_kv_heads": cfg.kv_heads} if cfg.kv_heads != cfg.num_heads else {}
    head_dim = {"head_dim": cfg.head_dim} if cfg.head_dim * cfg.num_heads != cfg.hidden_size else {}
    return {"name": cfg.name, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size, "num_layers": cfg.num_layers, "num_heads": cfg.num_heads,
            **gqa, **head_dim}


def load_adapter(folder: Path, cfg: Config | None = None) -> tuple[AdapterSpec, dict[str, np.ndarray]]:
    """(spec, {name: float32 array}) of an adapter folder, checked against ``cfg`` when given."""
    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG).is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise AdapterError(f"{folder} is not an adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    try:
        meta = json.loads((folder / ADAPTER_CONFIG).read_text())
        spec = AdapterSpec(rank=int(meta["rank"]), alpha=float(meta["alpha"]), dropout=float(meta.get("dropout", 0.0)),
                           targets=tuple(meta["targets"]))
    except (ValueError, KeyError, TypeError) as e:
        raise AdapterError(f"{folder / ADAPTER_CONFIG} is malformed: {e}") from None
    if meta.get("format") != ADAPTER_FORMAT or spec.rank <= 0 or not set(spec.targets) <= set(ALL_TARGETS):
        raise AdapterError(f"{folder / ADAPTER_CONFIG}: not a {ADAPTER_FORMAT} adapter")
    if cfg is not None:
        base = meta.get("base", {})
        theirs = {k: base.get(k) for k in _base_shape(cfg) if k != "name"}
        ours = {k: v for k, v in _base_shape(cfg).items() if k != "name"}
        if theirs != ours:
            bad = sorted(k for k in ours if theirs[k] != ours[k])
            raise AdapterError(f"adapter {folder.name} was trained for a different model ({', '.join(bad)} differ)")
    try:
        f = SafetensorsFile(confined(folder, folder / ADAPTER_WEIGHTS))
    except CheckpointError as e:
        raise AdapterError(str(e)) from None
    weights = {n: to_float32(f.get(n), f.info(n)[0]).copy() for n in f.keys()}
    if cfg is not None:
        for m in target_modules(cfg, spec.targets):
            out_f, in_f = module_shape(cfg, m)
            want = {f"{m}.lora_a": (spec.rank, in_f), f"{m}.lora_b": (out_f, spec.rank)}
            for n, shape in want.items():
                if n not in weights or weights[n].shape != shape:
                    got = weights[n].shape if n in weights else "missing"
                    raise AdapterError(f"adapter {folder.name}: {n} is {got}, expected {shape}")
    return spec, weights


def merge_lora(base_folder: Path, adapter_folder: Path, out_folder: Path, overwrite: bool = False) -> Path:
    """Fold an adapter into its base: W' = W + (alpha / rank) B A, written as a full model folder
    (in the base's dtype, with the base's tokenizer). Pure numpy, tensor by tensor."""
    from .loader import save_model

    base_folder = Path(base_folder)
    cfg = read_config(base_folder)
    if not (base_folder / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{base_folder} has no {WEIGHTS_FILE}")
    spec, lw = load_adapter(adapter_folder, cfg)
    base = SafetensorsFile(confined(base_folder, base_folder / WEIGHTS_FILE))
    sd = {}
    for n in base.keys():
        sd[n] = to_float32(base.get(n), base.info(n)[0])
    for m in target_modules(cfg, spec.targets):
        w = sd[f"{m}.weight"].astype(np.float32, copy=True)
        w += spec.scaling * (lw[f"{m}.lora_b"].astype(np.float64) @ lw[f"{m}.lora_a"].astype(np.float64)).astype(np.float32)
        sd[f"{m}.weight"] = w
    return save_model(sd, cfg, out_folder, overwrite=overwrite, tokenizer_from=base_folder,
                      extra_files={"merged_from.json": json.dumps({"base": str(base_folder), "adapter": str(adapter_folder),
                                                                   "rank": spec.rank, "alpha": spec.alpha,
                                                                   "targets": list(spec.targets)}, indent=2) + "\n"})

