"""HF InternLM <-> MindSpore (MindFormers names) conversion as a name map, tensor by tensor.

Pure renaming: both sides store linear weights [out, in] and use rotate-half rotary, so no
transpose or q/k permutation. InternLM v1 and InternLM3 use LLaMA's names (``HF_TO_MS``; v3's MLP
may carry biases, v1's never does: the config's shapes say which are expected). InternLM2's HF layout (``V2_HF_TO_MS``) packs q, k and v into one
``wqkv`` grouped per k/v head; it is split into the project's ``wq``/``wk``/``wv`` on the way in
and joined again on the way out (``split_wqkv`` / ``join_wqkv``), bit for bit. Every expected tensor must be present with its shape; anything
missing, unexpected or mis-shaped is an error naming it, raised before a byte is written.
Peak memory stays near the largest tensor: safetensors sources are read a tensor at a time
(torch pickles are memory-mapped) and each tensor is converted and written on its own.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable

import numpy as np

from .checkpoint import (DTYPE_TO_ST, ST_TO_DTYPE, ST_TO_NP, TOKENIZER_FILE, WEIGHTS_FILE, Cancelled,
                         CheckpointError, SafetensorsFile, SafetensorsWriter, atomic_folder, cast, confined,
                         copy_tokenizer, read_config, to_float32)
from .config import CONFIG_FILE, Config, ConfigError, is_own_config
from .quantize import METHODS, SCHEMES, check_quantizable, quantized_names, scale_name
from .torch_bin import TorchBinFile

# HF name template -> MindSpore name template; {} is the layer number, None drops the key.
HF_TO_MS: dict[str, str | None] = {
    "model.embed_tokens.weight": "model.tok_embeddings.embedding_weight",
    "model.layers.{}.self_attn.q_proj.weight": "model.layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "model.layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "model.layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "model.layers.{}.attention.wo.weight",
    "model.layers.{}.self_attn.q_proj.bias": "model.layers.{}.attention.wq.bias",
    "model.layers.{}.self_attn.k_proj.bias": "model.layers.{}.attention.wk.bias",
    "model.layers.{}.self_attn.v_proj.bias": "model.layers.{}.attention.wv.bias",
    "model.layers.{}.self_attn.o_proj.bias": "model.layers.{}.attention.wo.bias",
    "model.layers.{}.self_attn.rotary_emb.inv_freq": None,
    "model.layers.{}.mlp.gate_proj.weight": "model.layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "model.layers.{}.feed_forward.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "model.layers.{}.feed_forward.w3.weight",
    "model.layers.{}.mlp.gate_proj.bias": "model.layers.{}.feed_forward.w1.bias",
    "model.layers.{}.mlp.down_proj.bias": "model.layers.{}.feed_forward.w2.bias",
    "model.layers.{}.mlp.up_proj.bias": "model.layers.{}.feed_forward.w3.bias",
    "model.layers.{}.input_layernorm.weight": "model.layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "model.layers.{}.ffn_norm.weight",
    "model.norm.weight": "model.norm_out.weight",
    "lm_head.weight": "lm_head.weight",
}
MS_TO_HF = {v: k for k, v in HF_TO_MS.items() if v is not None}

# InternLM2 (model_type internlm2). Its packed ``wqkv`` has no entry: ``_unpack`` turns it into the
# three names below (identity here), and ``_pack`` makes it again for the way out.
V2_HF_TO_MS: dict[str, str | None] = {
    "model.tok_embeddings.weight": "model.tok_embeddings.embedding_weight",
    "model.layers.{}.attention.wq.weight": "model.layers.{}.attention.wq.weight",
    "model.layers.{}.attention.wk.weight": "model.layers.{}.attention.wk.weight",
    "model.layers.{}.attention.wv.weight": "model.layers.{}.attention.wv.weight",
    "model.layers.{}.attention.wo.weight": "model.layers.{}.attention.wo.weight",
    "model.layers.{}.attention.rotary_emb.inv_freq": None,
    "model.layers.{}.feed_forward.w1.weight": "model.layers.{}.feed_forward.w1.weight",
    "model.layers.{}.feed_forward.w2.weight": "model.layers.{}.feed_forward.w2.weight",
    "model.layers.{}.feed_forward.w3.weight": "model.layers.{}.feed_forward.w3.weight",
    "model.layers.{}.attention_norm.weight": "model.layers.{}.attention_norm.weight",
    "model.layers.{}.ffn_norm.weight": "model.layers.{}.ffn_norm.weight",
    "model.norm.weight": "model.norm_out.weight",
    "output.weight": "lm_head.weight",
}
V2_MS_TO_HF = {v: k for k, v in V2_HF_TO_MS.items() if v is not None}
WQKV = "model.layers.{}.attention.wqkv.weight"

ProgressFn = Callable[[int, int, str], None]  # (bytes done, bytes total, tensor name)
CancelFn = Callable[[], bool]


def _compile(table: dict[str, str | None]):
    return [(re.compile("^" + re.escape(k).replace(r"\{\}", r"(\d+)") + "$"), v) for k, v in table.items()]


_HF_RE, _MS_RE = _compile(HF_TO_MS), _compile(MS_TO_HF)
_V2_HF_RE = _compile(V2_HF_TO_MS)


# ---- InternLM2's packed q/k/v -------------------------------------------------------------

def split_wqkv(wqkv: np.ndarray, cfg: Config) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """InternLM2's ``wqkv`` -> (wq, wk, wv). Its rows are grouped per k/v head: for each of the
    ``kv_heads``, that head's ``groups`` query heads, then its k head, then its v head; query head
    ``kv * groups + g`` is the one that reads k/v head ``kv`` (as HF's GQA repeats k/v)."""
    kv, hd = cfg.kv_heads, cfg.head_dim
    g = cfg.num_heads // kv
    rows = wqkv.reshape(kv, g + 2, hd, -1)
    return (rows[:, :g].reshape(kv * g * hd, -1), rows[:, g].reshape(kv * hd, -1), rows[:, g + 1].reshape(kv * hd, -1))


def join_wqkv(wq: np.ndarray, wk: np.ndarray, wv: np.ndarray, cfg: Config) -> np.ndarray:
    """The inverse of ``split_wqkv``."""
    kv, hd = cfg.kv_heads, cfg.head_dim
    g = cfg.num_heads // kv
    parts = [wq.reshape(kv, g, hd, -1), wk.reshape(kv, 1, hd, -1), wv.reshape(kv, 1, hd, -1)]
    return np.concatenate(parts, axis=1).reshape((g + 2) * kv * hd, -1)


class _Derived:
    """Tensors computed from other files' tensors, read like a file (``info``, ``get``): the
    three parts of a packed ``wqkv`` on the way in, the packed one on the way out."""

    def __init__(self):
        self.made: dict[str, tuple] = {}  # name -> (dtype, shape, make())

    def add(self, name: str, dtype: str, shape: tuple, make) -> None:
        self.made[name] = (dtype, tuple(shape), make)

    def keys(self):
        return self.made.keys()

    def info(self, name: str):
        return self.made[name][:2]

    def get(self, name: str) -> np.ndarray:
        return self.made[name][2]()


def _unpack(where: dict, cfg: Config) -> dict:
    """HF InternLM2 tensors with each layer's ``wqkv`` replaced by its wq/wk/wv (checked first:
    a ``wqkv`` whose size does not fit the heads is an error naming it and the shape expected)."""
    derived, hd, h = _Derived(), cfg.head_dim, cfg.hidden_size
    want = ((cfg.num_heads + 2 * cfg.kv_heads) * hd, h)
    out = dict(where)
    for n in range(cfg.num_layers):
        name = WQKV.format(n)
        if name not in where:
            continue  # reported as missing wq/wk/wv by _plan
        f = out.pop(name)
        dtype, shape = f.info(name)
        if tuple(shape) != want:
            raise CheckpointError(f"{name}: shape {list(shape)}, but {cfg.num_heads} query heads and "
                                  f"{cfg.kv_heads} k/v heads of {hd} need {list(want)}")
        for i, part in enumerate("qkv"):
            rows = (cfg.num_heads if part == "q" else cfg.kv_heads) * hd
            derived.add(f"model.layers.{n}.attention.w{part}.weight", dtype, (rows, h),
                        lambda f=f, name=name, i=i: split_wqkv(np.asarray(f.get(name)), cfg)[i])
            out[f"model.layers.{n}.attention.w{part}.weight"] = derived
    return out


def _pack(where: dict, cfg: Config) -> dict:
    """Project tensors with each layer's wq/wk/wv replaced by InternLM2's packed ``wqkv``."""
    derived, out = _Derived(), dict(where)
    for n in range(cfg.num_layers):
        names = [f"model.layers.{n}.attention.w{p}.weight" for p in "qkv"]
        files = [out.pop(k) for k in names]
        dtype = files[0].info(names[0])[0]
        rows = (cfg.num_heads + 2 * cfg.kv_heads) * cfg.head_dim
        derived.add(WQKV.format(n), dtype, (rows, cfg.hidden_size),
                    lambda fs=files, ns=names: join_wqkv(*(np.asarray(f.get(k)) for f, k in zip(fs, ns)), cfg))
        out[WQKV.format(n)] = derived
    return out


def rename(name: str, table=_HF_RE) -> str | None:
    """Map one name through a template table; KeyError when no template matches."""
    for pattern, target in table:
        m = pattern.fullmatch(name)  # not match: its '$' would let a trailing newline through
        if m:
            return None if target is None else target.replace("{}", m.group(1)) if m.groups() else target
    raise KeyError(name)


def hf_name(ms_name: str) -> str:
    """The HF name of a MindSpore (MindFormers) parameter name."""
    return rename(ms_name, _MS_RE)


def _plan(where: dict, table, expected: dict[str, tuple]) -> list[tuple[str, str]]:
    """(source name, target name) for every expected tensor; errors name what does not fit."""
    pairs, unexpected = {}, []
    for src in where:
        try:
            dst = rename(src, table)
        except KeyError:
            unexpected.append(src)
            continue
        if dst is None:
            continue
        if dst not in expected:
            unexpected.append(src)
            continue
        pairs[dst] = src
    if unexpected:
        raise CheckpointError(f"unexpected tensor(s) for this config: {', '.join(sorted(unexpected)[:5])}")
    missing = [k for k in expected if k not in pairs]
    if missing:
        raise CheckpointError(f"missing tensor(s): {', '.join(missing[:5])}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    for dst, src in pairs.items():
        _, shape = where[src].info(src)
        if tuple(shape) != tuple(expected[dst]):
            raise CheckpointError(f"{src}: shape {list(shape)} does not match the config's {list(expected[dst])}")
    return [(pairs[k], k) for k in expected]


def _convert(where, plan, dst_file: Path, dtype: str | None, progress, cancel, metadata, resume: bool,
             quantized: frozenset = frozenset(), quantize: str | None = None) -> str:
    """Write ``plan``'s tensors into ``dst_file`` in ``dtype`` (default: the source's own), those
    named in ``quantized`` quantised by ``quantize`` with their scales (quantize.py); the dtype written."""
    scheme = SCHEMES[quantize] if quantize else None
    src_dtypes = {where[s].info(s)[0] for s, _ in plan}
    for d in src_dtypes:
        if d not in ST_TO_DTYPE:
            raise CheckpointError(f"unsupported weight dtype {d}")
    target = DTYPE_TO_ST[dtype] if dtype else (src_dtypes.pop() if len(src_dtypes) == 1 else "F32")
    entries = []
    for s, d in plan:
        shape = tuple(where[s].info(s)[1])
        if d in quantized:
            stored, scales = scheme.shapes(*shape)
            entries += [(d, scheme.stored, stored), (scale_name(d), "F32", scales)]
        else:
            entries.append((d, target, shape))
    size = [int(np.prod(shape)) * np.dtype(ST_TO_NP[st]).itemsize for _, st, shape in entries]
    writer = SafetensorsWriter(dst_file, entries, metadata, resume=resume)
    kept = {e[0] for e in entries[:writer.kept]}
    done = sum(size[:writer.kept])
    if writer.kept and progress:
        progress(done, sum(size), f"kept {writer.kept} of {len(entries)} tensors written and verified earlier")
    try:
        for src, dst in plan:
            if dst in kept and (dst not in quantized or scale_name(dst) in kept):
                continue
            if cancel and cancel():
                raise Cancelled()
            f = where[src]
            if dst in quantized:
                q, scale = scheme.quantize(to_float32(np.asarray(f.get(src)), f.info(src)[0]))
                parts = ([] if dst in kept else [(dst, q)]) + [(scale_name(dst), scale)]
            else:
                parts = [(dst, cast(np.asarray(f.get(src)), f.info(src)[0], target))]
            for name, arr in parts:
                writer.write(name, arr)
                done += arr.nbytes
            if progress:
                progress(done, sum(size), dst)
    except BaseException:
        writer.abort()  # the temporary folder is removed by atomic_folder; a work_dir's file is kept
        raise
    writer.close()
    return ST_TO_DTYPE[target]


def _weights(tmp: Path, work_dir: Path | None) -> Path:
    """Where the weights are written: straight into the new folder, or (resumable) into work_dir."""
    if work_dir is None:
        return tmp / WEIGHTS_FILE
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    return Path(work_dir) / WEIGHTS_FILE


MAX_INDEX_BYTES = 64 << 20  # a weight map is ~100 bytes a tensor: far below this for any model


def _shards(folder: Path, index: Path) -> set[str]:
    """The shard files an ``*.index.json`` names, each confined to ``folder``: a plain relative path,
    no '..', nothing that resolves outside the folder (or the HF cache's blobs: ``confined``);
    else CheckpointError naming the index and the entry."""
    where = f"{folder.name}/{index.name}"
    if index.stat().st_size > MAX_INDEX_BYTES:
        raise CheckpointError(f"{where}: {index.stat().st_size} bytes, more than a weight map takes")
    try:
        weight_map = json.loads(index.read_text()).get("weight_map", {})
    except (ValueError, AttributeError):
        raise CheckpointError(f"{where}: not a JSON object with a weight_map") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{where}: weight_map must map tensor names to shard file names")
    for shard in set(weight_map.values()):
        p = Path(shard)
        if not shard or "\x00" in shard or p.is_absolute() or ".." in p.parts:
            raise CheckpointError(f"{where}: shard {shard!r} is not a file name inside the folder")
        confined(folder, folder / p, f"{where}: shard {shard!r}")
    return set(weight_map.values())


def open_weights(folder: Path) -> dict[str, object]:
    """Map each tensor name to the file object holding it, for an HF or project folder."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors or pytorch_model*.bin weights")
    index = next(iter(folder.glob("*.index.json")), None)
    if index is not None:
        wanted = _shards(folder, confined(folder, index))
        missing = [w for w in wanted if not (folder / w).is_file()]
        if missing:
            raise CheckpointError(f"{folder}: shard {missing[0]} named in {index.name} is missing")
        files = [folder / w for w in sorted(wanted)]
    where: dict[str, object] = {}
    for path in (confined(folder, p) for p in files):
        f = SafetensorsFile(path) if path.suffix == ".safetensors" else TorchBinFile(path)
        for k in f.keys():
            where[k] = f
    return where


def hf_to_ms(src: str | Path, dst: str | Path, dtype: str | None = None, overwrite: bool = False,
             progress: ProgressFn | None = None, cancel: CancelFn | None = None,
             work_dir: str | Path | None = None, quantize: str | None = None) -> Config:
    """Convert an HF InternLM folder into a project model folder; returns its config. With
    ``work_dir`` the weights are built there, journaled, and a run that was killed or cancelled
    resumes after the tensors it wrote and verified (same source, dtype and config). ``quantize``
    ("int8", "int4") stores the linears' weights quantised with their scales (quantize.py)."""
    if quantize not in (None, *METHODS):
        raise CheckpointError(f"quantize must be one of {', '.join(METHODS)}, got {quantize!r}")
    src = Path(src)
    if not (src / CONFIG_FILE).is_file():
        raise CheckpointError(f"{src} has no {CONFIG_FILE}")
    try:
        cfg = Config.from_hf_config(src / CONFIG_FILE)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    where = open_weights(src)
    if cfg.family == "internlm2":
        where = _unpack(where, cfg)
    plan = _plan(where, _V2_HF_RE if cfg.family == "internlm2" else _HF_RE, cfg.param_shapes())
    with atomic_folder(dst, overwrite) as tmp:
        weights = _weights(tmp, work_dir)
        quantized = frozenset(quantized_names(cfg) if quantize else ())
        if quantize:
            check_quantizable(cfg, quantize)
        out_dtype = _convert(where, plan, weights, dtype, progress, cancel, {"format": "ms"}, work_dir is not None,
                             quantized, quantize)
        os.replace(weights, tmp / WEIGHTS_FILE)
        cfg = cfg.replace(dtype=out_dtype, name=cfg.name if cfg.name != "hf" else src.name, quantization=quantize)
        cfg.save(tmp)
        copy_tokenizer(src, tmp)
    return cfg


def ms_to_hf(src: str | Path, dst: str | Path, dtype: str | None = None, overwrite: bool = False,
             progress: ProgressFn | None = None, cancel: CancelFn | None = None,
             work_dir: str | Path | None = None) -> Config:
    """Write a project model folder back as an HF folder (config.json + model.safetensors);
    ``work_dir`` as in ``hf_to_ms``."""
    import json

    src = Path(src)
    cfg = read_config(src)
    if cfg.quantization:
        raise CheckpointError(f"{src} holds {cfg.quantization} weights, which HF folders do not: write the HF folder "
                              "from the unquantised model it was made from")
    where = {k: f for f in [SafetensorsFile(confined(src, src / WEIGHTS_FILE))] for k in f.keys()}
    if cfg.family == "internlm2":
        where = _pack(where, cfg)
        table = _compile({**V2_MS_TO_HF, WQKV: WQKV})
        expected_hf = {rename(k, table): s for k, s in cfg.param_shapes().items()
                       if k.rsplit(".", 2)[-2] not in ("wq", "wk", "wv")}
        expected_hf.update({WQKV.format(n): ((cfg.num_heads + 2 * cfg.kv_heads) * cfg.head_dim, cfg.hidden_size)
                            for n in range(cfg.num_layers)})
    else:
        table, expected_hf = _MS_RE, {rename(k, _MS_RE): s for k, s in cfg.param_shapes().items()}
    plan = _plan(where, table, expected_hf)  # (ms name, hf name)
    with atomic_folder(dst, overwrite) as tmp:
        weights = _weights(tmp, work_dir)
        out_dtype = _convert(where, plan, weights, dtype, progress, cancel, {"format": "pt"}, work_dir is not None)
        os.replace(weights, tmp / WEIGHTS_FILE)
        cfg = cfg.replace(dtype=out_dtype)
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg.to_hf_config(), indent=2) + "\n")
        copy_tokenizer(src, tmp)
    return cfg


def is_model_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a model in this project's format: weights and a config of ours."""
    folder = Path(folder)
    return (folder / WEIGHTS_FILE).is_file() and is_own_config(folder / CONFIG_FILE)


__all__ = ["hf_to_ms", "ms_to_hf", "rename", "hf_name", "HF_TO_MS", "MS_TO_HF", "TOKENIZER_FILE",
           "is_model_folder"]
