"""One config dataclass for every InternLM model (v1, InternLM2 / 2.5, InternLM3), with named presets.

Importing this module needs no deep-learning framework, so services and job
validators can check a request without loading MindSpore.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .quantize import METHODS

CONFIG_FILE = "config.json"
# Marks a folder written by this project (MindSpore weights, MindFormers names).
FORMAT_TAG = "internlm-mindspore/1"


def is_own_config(path: str | Path) -> bool:
    """Whether the JSON file at ``path`` is a config this project wrote (its ``format`` is
    ``FORMAT_TAG``), as opposed to an HF config or anything else (unreadable or not JSON: False)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):  # ValueError: not JSON, or not UTF-8
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT_TAG


@dataclass(frozen=True)
class Config:
    name: str = "custom"
    vocab_size: int = 103168
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    bias: bool = True  # q/k/v/o projection bias: the one difference from LLaMA (7B family)
    o_bias: bool | None = None  # the o projection's bias where it differs from q/k/v's (InternLM3's ``qkv_bias``
    #                             and ``bias`` are two switches); None: as ``bias``
    mlp_bias: bool = False  # gate/up/down bias (InternLM3's ``bias`` covers o and the MLP)
    attn_head_dim: int | None = None  # InternLM3's ``head_dim`` where the config gives one; None: hidden / heads
    rope_base: float = 10000.0
    rope_scaling: str | None = None  # None or "dynamic" (20B's dynamic NTK past max positions)
    rope_scaling_factor: float = 1.0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = 2  # HF InternLMTokenizer pads with </s>
    dtype: str = "float32"  # storage dtype of the weights: float32 | float16 | bfloat16
    num_kv_heads: int | None = None  # grouped-query attention (InternLM2: 8); None = num_heads
    family: str = "internlm"  # internlm (v1) | internlm2 | internlm3: HF layout, chat template and stops
    quantization: str | None = None  # None | "int8" | "int4": the linears' weights quantised (quantize.py)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"family must be one of {list(FAMILIES)}, got {self.family!r}")
        if self.num_kv_heads is not None and (self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads):
            raise ConfigError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.attn_head_dim is None and self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.attn_head_dim is not None and self.attn_head_dim <= 0:
            raise ConfigError(f"attn_head_dim must be positive, got {self.attn_head_dim}")
        if self.head_dim % 2:
            raise ConfigError("head_dim must be even for rotary embeddings")
        if self.num_kv_heads is not None and self.num_kv_heads != self.num_heads and not FAMILIES[self.family].gqa:
            raise ConfigError(f"grouped-query attention is not part of the {self.family} family "
                              f"(num_kv_heads {self.num_kv_heads} != num_heads {self.num_heads})")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.quantization not in (None, *METHODS):
            raise ConfigError(f"quantization must be None or one of {list(METHODS)}, got {self.quantization!r}")
        if self.rope_scaling not in (None, "dynamic"):
            raise ConfigError(f"unsupported rope_scaling {self.rope_scaling!r} (None or 'dynamic')")
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                      "max_position_embeddings"):
            if getattr(self, field) <= 0:
                raise ConfigError(f"{field} must be positive, got {getattr(self, field)}")

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim or self.hidden_size // self.num_heads

    @property
    def out_bias(self) -> bool:
        """Whether the o projection has a bias."""
        return self.bias if self.o_bias is None else self.o_bias

    @property
    def position_limit(self) -> int | None:
        """The most positions an engine of this model may hold: its trained ones, or None where
        dynamic NTK rotates positions past them."""
        return None if self.rope_scaling == "dynamic" else self.max_position_embeddings

    @property
    def kv_heads(self) -> int:
        """Heads of k and v (and of the KV cache): fewer than the query heads under GQA."""
        return self.num_kv_heads or self.num_heads

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter of the model, by MindFormers name (what checkpoints hold), with its shape."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.kv_heads * self.head_dim
        shapes = {"model.tok_embeddings.embedding_weight": (self.vocab_size, h),
                  "model.norm_out.weight": (h,), "lm_head.weight": (self.vocab_size, h)}
        for n in range(self.num_layers):
            p = f"model.layers.{n}."
            # (module, weight shape, has a bias)
            linears = (("attention.wq", (q, h), self.bias), ("attention.wk", (kv, h), self.bias),
                       ("attention.wv", (kv, h), self.bias), ("attention.wo", (h, q), self.out_bias),
                       ("feed_forward.w1", (i, h), self.mlp_bias), ("feed_forward.w2", (h, i), self.mlp_bias),
                       ("feed_forward.w3", (i, h), self.mlp_bias))
            for name, shape, bias in linears:
                shapes[f"{p}{name}.weight"] = shape
                if bias:
                    shapes[f"{p}{name}.bias"] = (shape[0],)
            shapes.update({f"{p}attention_norm.weight": (h,), f"{p}ffn_norm.weight": (h,)})
        return shapes

    def num_parameters(self) -> int:
        return sum(math.prod(s) for s in self.param_shapes().values())

    # ---- constructors ---------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "Config":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return cls(name=name, **{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, data: dict) -> "Config":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_file(cls, path: str | Path) -> "Config":
        data = json.loads(Path(path).read_text())
        if data.get("format") == FORMAT_TAG:
            return cls.from_dict(data)
        return cls.from_hf_config(data)

    @classmethod
    def from_checkpoint(cls, folder: str | Path) -> "Config":
        path = Path(folder) / CONFIG_FILE
        if not path.is_file():
            raise ConfigError(f"{folder} has no {CONFIG_FILE}")
        return cls.from_file(path)

    @classmethod
    def from_hf_config(cls, hf: dict | str | Path) -> "Config":
        """From an HF InternLM, InternLM2 (model_type internlm2) or LLaMA config.json."""
        if not isinstance(hf, dict):
            hf = json.loads(Path(hf).read_text())
        try:
            rotary = hf.get("rotary") or {}
            scaling = hf.get("rope_scaling") or {}
            rope_type = rotary.get("type") or scaling.get("type") or scaling.get("rope_type")
            if rope_type in ("origin", "default", None):
                rope_type = None
            family = hf_family(hf)
            if family == "internlm3":  # two switches: qkv_bias for q/k/v, bias for o and the MLP
                bias, o_bias, mlp_bias = hf.get("qkv_bias", False), hf.get("bias", False), hf.get("bias", False)
            else:  # InternLM's bias (q/k/v/o), LLaMA's attention_bias / mlp_bias
                bias, o_bias, mlp_bias = hf.get("bias", hf.get("attention_bias", False)), None, hf.get("mlp_bias", False)
            heads = hf["num_attention_heads"]
            kv_heads = hf.get("num_key_value_heads", heads)
            head_dim = hf.get("head_dim")
            if head_dim is not None and (not isinstance(head_dim, int) or isinstance(head_dim, bool)):
                raise ConfigError(f"head_dim must be an integer, got {head_dim!r}")
            return cls(
                num_kv_heads=kv_heads if kv_heads != heads else None,
                family=family,
                name=hf.get("_name_or_path") or "hf",
                vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"],
                intermediate_size=hf["intermediate_size"],
                num_layers=hf["num_hidden_layers"],
                num_heads=heads,
                max_position_embeddings=hf.get("max_position_embeddings", 2048),
                rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                bias=bool(bias),
                o_bias=None if o_bias is None or bool(o_bias) == bool(bias) else bool(o_bias),
                mlp_bias=bool(mlp_bias),
                attn_head_dim=head_dim,
                rope_base=float(rotary.get("base", hf.get("rope_theta", 10000.0))),
                rope_scaling=rope_type,
                rope_scaling_factor=float(rotary.get("scaling_factor", scaling.get("factor", 1.0))),
                bos_id=hf.get("bos_token_id", 1),
                eos_id=hf.get("eos_token_id", 2) if isinstance(hf.get("eos_token_id", 2), int) else 2,
                pad_id=hf.get("pad_token_id") if isinstance(hf.get("pad_token_id"), int) else 2,
                dtype=hf.get("torch_dtype") if hf.get("torch_dtype") in DTYPES else "float32",
            )
        except KeyError as e:
            raise ConfigError(f"HF config lacks {e.args[0]!r}") from None

    # ---- serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": FORMAT_TAG, **dataclasses.asdict(self)}

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CONFIG_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def to_hf_config(self) -> dict:
        """The config.json of an HF InternLM folder (InternLM's own keys plus LLaMA's aliases), or
        of an InternLM2 one (model_type internlm2: GQA, rope_theta, rope_scaling), or of an InternLM3 one
        (LLaMA's names, its own two bias switches and head_dim)."""
        family = FAMILIES[self.family]
        common = {
            "architectures": [family.architecture],
            "model_type": family.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.kv_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": "silu",
            "rope_theta": self.rope_base,
            "tie_word_embeddings": False,
            "bos_token_id": self.bos_id,
            "eos_token_id": self.eos_id,
            "pad_token_id": self.pad_id,
            "torch_dtype": self.dtype,
        }
        if self.family == "internlm3":
            if self.out_bias != self.mlp_bias:
                raise ConfigError("InternLM3's config has one switch (bias) for the o projection and the MLP: "
                                  f"o bias {self.out_bias} and MLP bias {self.mlp_bias} cannot be written")
            return {**common, "head_dim": self.head_dim, "qkv_bias": self.bias, "bias": self.out_bias,
                    "rope_scaling": ({"rope_type": self.rope_scaling, "factor": self.rope_scaling_factor}
                                     if self.rope_scaling else None)}
        if self.out_bias != self.bias or self.mlp_bias or self.head_dim * self.num_heads != self.hidden_size:
            raise ConfigError(f"an {self.family} HF config has no separate o / MLP bias or head_dim: "
                              "this model can only be written as InternLM3")
        if self.family == "internlm2":
            return {**common, "bias": self.bias,
                    "rope_scaling": ({"type": self.rope_scaling, "factor": self.rope_scaling_factor}
                                     if self.rope_scaling else None)}
        rotary = {"base": self.rope_base, "type": self.rope_scaling or "origin"}
        if self.rope_scaling:
            rotary["scaling_factor"] = self.rope_scaling_factor
        return {**common, "bias": self.bias, "attention_bias": self.bias, "rotary": rotary}


def hf_family(hf: dict) -> str:
    """The family of an HF config from its ``model_type`` and ``architectures``, which must agree;
    a type or architecture this project does not know is a ConfigError naming it."""
    model_type, archs = hf.get("model_type"), hf.get("architectures") or []
    if model_type is not None and model_type not in HF_MODEL_TYPES:
        raise ConfigError(f"model_type {model_type!r} is not a model this project knows "
                          f"(known: {', '.join(HF_MODEL_TYPES)})")
    if not isinstance(archs, list) or any(a not in HF_ARCHITECTURES for a in archs):
        raise ConfigError(f"architectures {archs!r} is not a model this project knows "
                          f"(known: {', '.join(HF_ARCHITECTURES)})")
    families = {HF_ARCHITECTURES[a] for a in archs} | ({HF_MODEL_TYPES[model_type]} if model_type else set())
    if len(families) > 1:
        raise ConfigError(f"model_type {model_type!r} and architectures {archs} name different models")
    if not families:
        raise ConfigError("the HF config names neither a model_type nor architectures: cannot tell which model it is")
    return families.pop()


DTYPES = ("float32", "float16", "bfloat16")  # the weight and compute dtypes, as every path names them


@dataclass(frozen=True)
class Family:
    """What an InternLM generation is, besides its numbers: its HF names and whether k/v heads may be
    fewer than query heads. Weight names live in convert.py, chat formats in tokenizer.py."""
    model_type: str  # HF config.json's model_type
    architecture: str  # and its architectures entry
    gqa: bool


FAMILIES = {
    "internlm": Family("internlm", "InternLMForCausalLM", gqa=False),
    "internlm2": Family("internlm2", "InternLM2ForCausalLM", gqa=True),
    "internlm3": Family("internlm3", "InternLM3ForCausalLM", gqa=True),
}
# What an HF config.json says -> the family it is. LLaMA's layout and names are InternLM v1's (less
# the bias), so a LLaMA config reads as v1; anything else is refused by name, never read as v1.
HF_MODEL_TYPES = {**{f.model_type: name for name, f in FAMILIES.items()}, "llama": "internlm"}
HF_ARCHITECTURES = {**{f.architecture: name for name, f in FAMILIES.items()}, "LlamaForCausalLM": "internlm"}

# Numbers from InternLM's own HF configs (config.json of internlm-7b / -20b), not the MindFormers
# yamls, which carry num_heads 60 and rms_norm_eps 1e-5 for 20B by mistake.
_7B = dict(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
           max_position_embeddings=2048, rms_norm_eps=1e-6, bias=True)
_20B = dict(hidden_size=5120, intermediate_size=13824, num_layers=60, num_heads=40,
            max_position_embeddings=4096, rms_norm_eps=1e-6, bias=False, rope_scaling="dynamic",
            dtype="bfloat16")

# InternLM2 / 2.5 (HF configs, model_type internlm2): GQA with 8 KV heads, rope_theta 1e6, dynamic
# NTK with factor 2.0 over 32768 positions, no bias, vocabulary 92544.
_V2 = dict(vocab_size=92544, num_kv_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-5, bias=False,
           rope_base=1e6, rope_scaling="dynamic", rope_scaling_factor=2.0, dtype="bfloat16", family="internlm2")
_V2_1_8B = dict(_V2, hidden_size=2048, intermediate_size=8192, num_layers=24, num_heads=16)
_V2_7B = dict(_V2, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32)
_V2_20B = dict(_V2, hidden_size=6144, intermediate_size=16384, num_layers=48, num_heads=48)

# InternLM3-8B-Instruct (its HF config, model_type internlm3): LLaMA's tensor names, 16 query heads on
# each of 2 k/v heads, head_dim 128 given explicitly, rope_theta 5e7 with dynamic NTK (factor 6) past
# 32768 positions, vocabulary 128512, no biases (qkv_bias and bias both false).
_V3_8B = dict(vocab_size=128512, hidden_size=4096, intermediate_size=10240, num_layers=48, num_heads=32,
              num_kv_heads=2, attn_head_dim=128, max_position_embeddings=32768, rms_norm_eps=1e-5, bias=False,
              rope_base=5e7, rope_scaling="dynamic", rope_scaling_factor=6.0, dtype="bfloat16", family="internlm3")

PRESETS: dict[str, dict] = {
    "internlm-7b": _7B,
    "internlm-chat-7b": _7B,
    "internlm-20b": _20B,
    "internlm-chat-20b": _20B,
    "internlm2-1_8b": _V2_1_8B,
    "internlm2-chat-1_8b": _V2_1_8B,
    "internlm2_5-1_8b-chat": _V2_1_8B,
    "internlm2-7b": _V2_7B,
    "internlm2-chat-7b": _V2_7B,
    "internlm2_5-7b-chat": _V2_7B,
    "internlm2-20b": _V2_20B,
    "internlm2-chat-20b": _V2_20B,
    "internlm3-8b-instruct": _V3_8B,
    # Small shapes for tests, demos and benchmarks; the real tokenizer's vocabulary unless noted.
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
                 max_position_embeddings=128, bias=True),
    "tiny-20b": dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
                     max_position_embeddings=64, bias=False, rope_scaling="dynamic"),
    # InternLM2's shape in small: 6 query heads sharing 2 KV heads (3 each: groups != KV heads, so
    # swapping the two anywhere breaks the parity tests, as it would break 32/8 and 48/8 models),
    # dynamic NTK (factor 2) past 64.
    "tiny-v2": dict(vocab_size=512, hidden_size=96, intermediate_size=160, num_layers=2, num_heads=6,
                    num_kv_heads=2, max_position_embeddings=64, bias=False, rope_scaling="dynamic",
                    rope_scaling_factor=2.0, family="internlm2"),
    # InternLM3's shape in small: 8 query heads on 2 k/v heads (4 each), head_dim 16 given explicitly
    # and not hidden / heads (96 / 8 = 12), q/k/v biases but none on o and the MLP (two switches),
    # dynamic NTK (factor 6) past 64 positions.
    "tiny-v3": dict(vocab_size=512, hidden_size=96, intermediate_size=160, num_layers=2, num_heads=8,
                    num_kv_heads=2, attn_head_dim=16, max_position_embeddings=64, bias=True, o_bias=False,
                    rope_base=5e7, rope_scaling="dynamic", rope_scaling_factor=6.0, family="internlm3"),
    # The self-trained demo model served by the local stack (real tokenizer, ~16M parameters).
    "demo": dict(hidden_size=128, intermediate_size=352, num_layers=4, num_heads=4,
                 max_position_embeddings=512, bias=True),
    # A small InternLM-7B shape (bias, 2048 positions, the real vocabulary) for serving benchmarks:
    # its head dominates a decode step as a 7B model's layers would.
    "bench-serve": dict(hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8,
                        max_position_embeddings=2048, bias=True),
    # ~100M parameters with a 32k vocabulary: the benchmark shape.
    "bench-100m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=8,
                       num_heads=12, max_position_embeddings=1024, bias=True),
}
