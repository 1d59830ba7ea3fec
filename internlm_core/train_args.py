"""Fine-tuning's arguments: one dataclass, checked by ``validate``, whose hyperparameters (the
fields with help) the CLI's flags and the job API's fields are derived from. Free of MindSpore, so
that services check a job without loading it."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

from .config import DTYPES
from .lora import AdapterSpec, parse_targets

DTYPE_CHOICES = ("auto", *DTYPES)
QUANTIZE_CHOICES = ("none", "int8")  # a LoRA base's: FrozenLinear reads int8 at most (int4 is for serving)


def _hyper(default, help: str):
    """A hyperparameter: a field that the CLI's flags and the job API offer, with its help."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainArgs:
    """Everything a fine-tuning run needs. ``None`` for lr / weight_decay picks MindFormers'
    research/internlm default for the mode (full 1e-5 / 0.1, LoRA 5e-5 / 0.01)."""
    model: str  # base model folder
    data: str  # dataset folder (or .mindrecord file) from internlm_core.data.preprocess
    out: str  # output folder: a full model, or an adapter in LoRA mode
    mode: str = "full"  # full | lora
    lr: float | None = _hyper(None, "peak learning rate (default 1e-5 full, 5e-5 LoRA)")
    weight_decay: float | None = _hyper(None, "default 0.1 full, 0.01 LoRA")
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_ratio: float = _hyper(0.03, "share of the steps warming the learning rate up")
    min_lr_ratio: float = _hyper(0.0, "the cosine ends at lr times this")
    max_steps: int = _hyper(0, "optimiser steps; 0 = from epochs")
    epochs: float = _hyper(1.0, "passes over the training rows (when max_steps is 0)")
    batch_size: int = _hyper(1, "rows per micro-batch (per device in data parallel)")
    grad_accum: int = _hyper(1, "micro-batches per optimiser step")
    grad_clip: float = _hyper(1.0, "global-norm clip; 0 = off")
    eval_ratio: float = _hyper(0.0, "share of rows held out for eval loss and perplexity")
    eval_every: int = _hyper(0, "steps between evaluations (0 = only at the end, with an eval split)")
    save_every: int = _hyper(500, "steps between checkpoints (0 = only on cancel)")
    keep_last: int = _hyper(3, "checkpoints kept")
    seed: int = _hyper(0, "data order, initialisation and dropout seed")
    lora_rank: int = _hyper(8, "LoRA rank")
    lora_alpha: float = _hyper(16.0, "LoRA alpha (the update is scaled by alpha / rank)")
    lora_dropout: float = _hyper(0.05, "dropout on the LoRA input")
    lora_targets: str = _hyper("wq|wk|wv|wo", "regex or comma list over wq wk wv wo w1 w2 w3")
    dtype: str = _hyper("auto", f"compute dtype: {', '.join(DTYPE_CHOICES)} (auto = the model's; fp32 on CPU)")
    loss_scale: float | str = _hyper("auto", "auto (dynamic for float16), dynamic, or a fixed number (1 = off)")
    quantize: str = _hyper("none", "LoRA: hold the frozen base's linears as int8 with per-row scales (none: in the "
                                   "checkpoint's precision, bf16 stays bf16); full fine-tuning takes none")
    recompute: bool = _hyper(False, "recompute each layer's activations in the backward pass: less memory, "
                                    "~1/3 more compute")
    overwrite: bool = False  # replace an existing output folder

    def resolved(self) -> "TrainArgs":
        lora = self.mode == "lora"
        return dataclasses.replace(
            self, lr=self.lr if self.lr is not None else (5e-5 if lora else 1e-5),
            weight_decay=self.weight_decay if self.weight_decay is not None else (0.01 if lora else 0.1),
            betas=tuple(self.betas), loss_scale=_number_or_word(self.loss_scale))

    def validate(self) -> "TrainArgs":
        """Raise ValueError naming the first bad field; returns the resolved arguments."""
        a = self.resolved()

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        for name in ("model", "data", "out"):
            need(isinstance(getattr(a, name), (str, os.PathLike)) and str(getattr(a, name)).strip() != "",
                 f"{name} must be a path")
        need(a.mode in ("full", "lora"), f"mode must be 'full' or 'lora', got {a.mode!r}")
        need(_num(a.lr) and 0 < a.lr < 1, f"lr must be in (0, 1), got {a.lr!r}")
        need(_num(a.weight_decay) and a.weight_decay >= 0, f"weight_decay must be >= 0, got {a.weight_decay!r}")
        need(len(a.betas) == 2 and all(_num(b) and 0 <= b < 1 for b in a.betas), f"betas must be two numbers in [0, 1), got {a.betas!r}")
        need(_num(a.eps) and a.eps > 0, f"eps must be > 0, got {a.eps!r}")
        need(_num(a.warmup_ratio) and 0 <= a.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {a.warmup_ratio!r}")
        need(_num(a.min_lr_ratio) and 0 <= a.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {a.min_lr_ratio!r}")
        need(_int(a.max_steps) and a.max_steps >= 0, f"max_steps must be an integer >= 0, got {a.max_steps!r}")
        need(_num(a.epochs) and (a.epochs > 0 or a.max_steps > 0), f"epochs must be > 0 (or set max_steps), got {a.epochs!r}")
        for name in ("batch_size", "grad_accum", "keep_last"):
            need(_int(getattr(a, name)) and getattr(a, name) >= 1, f"{name} must be an integer >= 1, got {getattr(a, name)!r}")
        for name in ("eval_every", "save_every", "seed"):
            need(_int(getattr(a, name)) and getattr(a, name) >= 0, f"{name} must be an integer >= 0, got {getattr(a, name)!r}")
        need(_num(a.grad_clip) and a.grad_clip >= 0, f"grad_clip must be >= 0, got {a.grad_clip!r}")
        need(_num(a.eval_ratio) and 0 <= a.eval_ratio < 0.5, f"eval_ratio must be in [0, 0.5), got {a.eval_ratio!r}")
        need(a.dtype in DTYPE_CHOICES, f"dtype must be one of {DTYPE_CHOICES}, got {a.dtype!r}")
        need(a.quantize in QUANTIZE_CHOICES, f"quantize must be one of {QUANTIZE_CHOICES}, got {a.quantize!r}")
        need(a.mode == "lora" or a.quantize == "none",
             f"quantize {a.quantize} applies to LoRA fine-tuning only: full fine-tuning trains fp32 master weights "
             "(fine-tune with LoRA, or quantize none)")
        need(isinstance(a.recompute, bool), f"recompute must be true or false, got {a.recompute!r}")
        need(a.loss_scale in ("auto", "dynamic") or (_num(a.loss_scale) and a.loss_scale >= 1),
             f"loss_scale must be 'auto', 'dynamic' or a number >= 1, got {a.loss_scale!r}")
        if a.mode == "lora":
            need(_int(a.lora_rank) and a.lora_rank >= 1, f"lora_rank must be an integer >= 1, got {a.lora_rank!r}")
            need(_num(a.lora_alpha) and a.lora_alpha > 0, f"lora_alpha must be > 0, got {a.lora_alpha!r}")
            need(_num(a.lora_dropout) and 0 <= a.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {a.lora_dropout!r}")
            parse_targets(a.lora_targets)
        return a

    @property
    def quantize_method(self) -> str | None:
        """``quantize`` as the loaders take it: None for none."""
        return None if self.quantize == "none" else self.quantize

    def adapter_spec(self) -> AdapterSpec:
        return AdapterSpec(rank=self.lora_rank, alpha=float(self.lora_alpha), dropout=float(self.lora_dropout),
                           targets=parse_targets(self.lora_targets))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(d["betas"])
        return {k: str(v) if isinstance(v, os.PathLike) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainArgs":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training arguments: {', '.join(unknown)}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


def _number_or_word(x):
    """A flag's or a job field's text "1024" as the number it names; anything else as it is."""
    try:
        return float(x) if isinstance(x, str) else x
    except ValueError:
        return x


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# The fields the CLI and the job API offer, in order (derived: a hyperparameter added above reaches both).
HYPERPARAMS = tuple(f.name for f in dataclasses.fields(TrainArgs) if "help" in f.metadata)
