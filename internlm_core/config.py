"""One config dataclass for every InternLM v1 model, with named presets.

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
    rope_base: float = 10000.0
    rope_scaling: str | None = None  # None or "dynamic" (20B's dynamic NTK past max positions)
    rope_scaling_factor: float = 1.0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = 2  # HF InternLMTokenizer pads with </s>
    dtype: str = "float32"  # storage dtype of the weights: float32 | float16 | bfloat16
    num_kv_heads: int | None = None  # grouped-query attention (InternLM2: 8); None = num_heads
    family: str = "internlm"  # internlm (v1) | internlm2: HF layout, chat template and stops
    quantization: str | None = None  # None | "int8": the linears' weights int8 with per-channel scales (quantize.py)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"family must be one of {list(FAMILIES)}, got {self.family!r}")
        if self.num_kv_heads is not None and (self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads):
            raise ConfigError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ConfigError("head_dim must be even for rotary embeddings")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.quantization not in (None, "int8"):
            raise ConfigError(f"quantization must be None or 'int8', got {self.quantization!r}")
        if self.rope_scaling not in (None, "dynamic"):
            raise ConfigError(f"unsupported rope_scaling {self.rope_scaling!r} (None or 'dynamic')")
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                      "max_position_embeddings"):
            if getattr(self, field) <= 0:
                raise ConfigError(f"{field} must be positive, got {getattr(self, field)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        """Heads of k and v (and of the KV cache): fewer than the query heads under GQA."""
        return self.num_kv_heads or self.num_heads

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter of the model, by MindFormers name (what checkpoints hold), with its shape."""
        h, i = self.hidden_size, self.intermediate_size
        kv = self.kv_heads * self.head_dim
        shapes = {"model.tok_embeddings.embedding_weight": (self.vocab_size, h),
                  "model.norm_out.weight": (h,), "lm_head.weight": (self.vocab_size, h)}
        for n in range(self.num_layers):
            p = f"model.layers.{n}."
            for w, out in (("q", h), ("k", kv), ("v", kv), ("o", h)):
                shapes[f"{p}attention.w{w}.weight"] = (out, h)
                if self.bias:
                    shapes[f"{p}attention.w{w}.bias"] = (out,)
            shapes.update({f"{p}feed_forward.w1.weight": (i, h), f"{p}feed_forward.w2.weight": (h, i),
                           f"{p}feed_forward.w3.weight": (i, h), f"{p}attention_norm.weight": (h,),
                           f"{p}ffn_norm.weight": (h,)})
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
            bias = hf.get("bias", hf.get("attention_bias", False))
            heads = hf["num_attention_heads"]
            kv_heads = hf.get("num_key_value_heads", heads)
            family = hf_family(hf)
            if kv_heads != heads and family != "internlm2":
                raise ConfigError("grouped-query attention is not part of InternLM v1 (model_type internlm2 has it)")
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
        of an InternLM2 one (model_type internlm2: GQA, rope_theta, rope_scaling)."""
        if self.family == "internlm2":
            return {
                "architectures": ["InternLM2ForCausalLM"],
                "model_type": "internlm2",
                "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.num_layers,
                "num_attention_heads": self.num_heads,
                "num_key_value_heads": self.kv_heads,
                "max_position_embeddings": self.max_position_embeddings,
                "rms_norm_eps": self.rms_norm_eps,
                "hidden_act": "silu",
                "bias": self.bias,
                "rope_theta": self.rope_base,
                "rope_scaling": ({"type": self.rope_scaling, "factor": self.rope_scaling_factor}
                                 if self.rope_scaling else None),
                "tie_word_embeddings": False,
                "bos_token_id": self.bos_id,
                "eos_token_id": self.eos_id,
                "pad_token_id": self.pad_id,
                "torch_dtype": self.dtype,
            }
        rotary = {"base": self.rope_base, "type": self.rope_scaling or "origin"}
        if self.rope_scaling:
            rotary["scaling_factor"] = self.rope_scaling_factor
        return {
            "architectures": ["InternLMForCausalLM"],
            "model_type": "internlm",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": "silu",
            "bias": self.bias,
            "attention_bias": self.bias,
            "rotary": rotary,
            "rope_theta": self.rope_base,
            "tie_word_embeddings": False,
            "bos_token_id": self.bos_id,
            "eos_token_id": self.eos_id,
            "pad_token_id": self.pad_id,
            "torch_dtype": self.dtype,
        }


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
FAMILIES = ("internlm", "internlm2")
# What an HF config.json says -> the family it is. LLaMA's layout and names are InternLM v1's (less
# the bias), so a LLaMA config reads as v1; anything else is refused by name, never read as v1.
HF_MODEL_TYPES = {"internlm": "internlm", "llama": "internlm", "internlm2": "internlm2"}
HF_ARCHITECTURES = {"InternLMForCausalLM": "internlm", "LlamaForCausalLM": "internlm",
                    "InternLM2ForCausalLM": "internlm2"}

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
