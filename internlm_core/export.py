"""Export a model folder to two MindIR graphs (prefill and one-step decode); ``exported.py`` runs them.

An exported folder holds ``prefill.mindir``, ``decode.mindir``, ``config.json``,
``tokenizer.model`` and ``mindir_manifest.json`` (inputs, shapes, dtypes, preset, tokenizer
sha256, cache size). ``exported.ExportedEngine`` loads the pair with MindSpore's own ``ms.load`` +
``nn.GraphCell`` and behaves like ``engine.Engine``, so generation and the services' batcher
run on it unchanged (``engine.open_engine`` picks it for a folder with a manifest).

Where the KV cache lives (measured on MindSpore 2.9, CPU): each loaded GraphCell owns a private
copy of its graph's parameters (``params_init`` copies values), so a cache kept as graph
parameters would not carry prefill's writes into the separately loaded decode graph. The
graphs therefore take the per-layer caches as trailing inputs and write them in place with
ScatterNdUpdate, exactly as ``Engine`` writes its Parameters: the runner allocates the caches
once and passes the same tensors to both graphs on every call. Nothing is copied per step, the
files hold only weights (no zero caches), and with ``dynamic=True`` the cache size is chosen
when the folder is loaded. The tests check token-for-token equality with the eager engine,
which would fail if a runtime stopped honouring the in-place writes.

Static export fixes every shape: prefill runs one prompt padded to (1, max_len), decode runs
(max_batch, 1) over a (max_batch, heads, max_len, head_dim) cache. Dynamic export declares
batch, prompt length and cache length as unknown (None); MindSpore prepares the graph once per
distinct shape, so prompt lengths are rounded up to the engine's buckets.

"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from .checkpoint import MANIFEST_FILE, TOKENIZER_FILE, Cancelled, atomic_folder, copy_tokenizer, read_config
from .config import Config
from .errors import ExportError
from .loader import load_model
from .model import MS_DTYPES
from .tokenizer import TOKENIZER_FILES

MANIFEST_FORMAT = "internlm-mindir/1"
GRAPHS = ("prefill", "decode")


# ---- the graphs ----------------------------------------------------------------------------

class _PrefillGraph(nn.Cell):
    """Engine's prefill step with the caches as trailing inputs (written in place)."""

    def __init__(self, model):
        super().__init__(auto_prefix=False)  # keep MindFormers parameter names in the graph
        self.model = model

    def construct(self, ids, cos, sin, mask, cache_index, last_index, *caches):
        h = self.model.hidden(ids, cos, sin, mask, caches, cache_index, False)
        last = ops.gather(h.reshape(-1, h.shape[-1]), last_index, 0)  # (B, C) at each row's last token
        return self.model.lm_head(last).astype(ms.float32)


class _DecodeGraph(nn.Cell):
    """Engine's decode step: one token per slot, attending the whole cache."""

    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, ids, cos, sin, mask, cache_index, *caches):
        h = self.model.hidden(ids, cos, sin, mask, caches, cache_index, True)
        return self.model.lm_head(h[:, 0]).astype(ms.float32)


def input_specs(cfg: Config, max_batch: int, max_len: int, dynamic: bool, cache_dtype: str) -> dict:
    """Inputs of both graphs as [name, shape, dtype]; None marks a dynamic dimension.

    B = prompts in one prefill, T = padded prompt length, S = cache slots, L = cache length.
    Caches come last, per layer k then v, each (S, heads, L, head_dim).
    """
    nh, hd = cfg.kv_heads, cfg.head_dim  # the caches and their index carry the k/v heads
    # Static prefill takes one prompt per call: the batcher prefills one request at a time, and a
    # padded (max_batch, max_len) shape would cost max_batch times as much for it.
    b, t, s, n = (None, None, None, None) if dynamic else (1, max_len, max_batch, max_len)
    caches = [[f"{kv}_cache.{i}", [s, nh, n, hd], cache_dtype]
              for i in range(cfg.num_layers) for kv in "kv"]
    return {
        "prefill": [["input_ids", [b, t], "int32"], ["cos", [b, 1, t, hd], "float32"],
                    ["sin", [b, 1, t, hd], "float32"], ["mask", [b, 1, t, t], "float32"],
                    ["cache_index", [b, nh, t, 3], "int32"], ["last_index", [b], "int32"]] + caches,
        "decode": [["input_ids", [s, 1], "int32"], ["cos", [s, 1, 1, hd], "float32"],
                   ["sin", [s, 1, 1, hd], "float32"], ["mask", [s, 1, 1, n], "float32"],
                   ["cache_index", [s, nh, 1, 3], "int32"]] + caches,
    }


def _placeholders(specs: list) -> list:
    """Example tensors for ms.export: zeros for static shapes, shape-only tensors for dynamic ones."""
    out = []
    for _, shape, dtype in specs:
        if None in shape:
            out.append(Tensor(shape=shape, dtype=getattr(ms, dtype)))
        else:
            out.append(Tensor(np.zeros(shape, dtype), getattr(ms, dtype)))
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_sizes(cfg: Config, max_batch: int, max_len: int) -> None:
    if max_batch < 1:
        raise ExportError(f"max_batch must be at least 1, got {max_batch}")
    if max_len < 2:
        raise ExportError(f"max_len must be at least 2, got {max_len}")
    if max_len > cfg.max_position_embeddings and cfg.rope_scaling != "dynamic":
        raise ExportError(f"max_len {max_len} exceeds the model's {cfg.max_position_embeddings} positions")


def _export_graph(cell, specs: list, folder: Path, name: str) -> str:
    """ms.export one graph; returns the file written (large models get ``<name>_graph.mindir``
    plus a ``<name>_variables/`` folder, which ms.load finds by itself)."""
    ms.export(cell, *_placeholders(specs), file_name=str(folder / name), file_format="MINDIR")
    for candidate in (f"{name}.mindir", f"{name}_graph.mindir"):
        if (folder / candidate).is_file():
            return candidate
    raise ExportError(f"MindSpore wrote no MindIR file for the {name} graph")


def export_mindir(model_dir, dst, max_batch: int = 1, max_len: int | None = None, dynamic: bool = False,
                  overwrite: bool = False, progress: Callable[[int, int, str], None] | None = None,
                  cancel: Callable[[], bool] | None = None) -> Path:
    """Export the model folder ``model_dir`` to ``dst`` (written atomically): two MindIR graphs
    plus manifest, config and tokenizer.

    ``max_batch``/``max_len`` are the cache slots and positions: fixed shapes when static, the
    defaults a loader uses when ``dynamic``. ``progress(done, total, step)`` is called after each
    of the four steps; ``cancel()`` is checked between them (raises ``Cancelled``).
    """
    model_dir, dst = Path(model_dir), Path(dst)
    cfg = read_config(model_dir)  # fails fast, before MindSpore loads any weights
    max_len = max_len or cfg.max_position_embeddings
    _check_sizes(cfg, max_batch, max_len)
    steps = ["load", "prefill", "decode", "manifest"]

    def advance(done: int) -> None:
        if progress:
            progress(done, len(steps), steps[done - 1])
        if cancel and cancel() and done < len(steps):
            raise Cancelled(f"export cancelled after {steps[done - 1]}")

    if cancel and cancel():
        raise Cancelled("export cancelled before it started")
    with atomic_folder(dst, overwrite) as tmp:
        model = load_model(model_dir)
        compute_dtype = {v: k for k, v in MS_DTYPES.items()}[model.dtype]  # float32 on CPU
        specs = input_specs(cfg, max_batch, max_len, dynamic, compute_dtype)
        advance(1)
        files = {}
        for i, (name, cls) in enumerate(zip(GRAPHS, (_PrefillGraph, _DecodeGraph)), start=2):
            files[name] = _export_graph(cls(model), specs[name], tmp, name)
            advance(i)
        cfg.save(tmp)
        copy_tokenizer(model_dir, tmp)
        manifest = {
            "format": MANIFEST_FORMAT,
            "preset": cfg.name,
            "config": cfg.to_dict(),
            "tokenizer_sha256": sha256_file(tmp / TOKENIZER_FILE),
            # every tokenizer file: tokenizer_config.json gives the chat ids their names
            "tokenizer_files": {name: sha256_file(tmp / name) for name in TOKENIZER_FILES if (tmp / name).is_file()},
            "max_batch": max_batch,
            "max_len": max_len,
            "dynamic": dynamic,
            "compute_dtype": compute_dtype,
            "cache": {"layout": "per layer k then v, (slots, heads, positions, head_dim)",
                      "shape": [None if dynamic else max_batch, cfg.kv_heads, None if dynamic else max_len,
                                cfg.head_dim], "count": 2 * cfg.num_layers,
                      "updated": "in place by the graphs (ScatterNdUpdate on the cache inputs)"},
            "graphs": {name: {"file": files[name], "bytes": _graph_bytes(tmp, files[name]),
                              "inputs": [dict(zip(("name", "shape", "dtype"), s)) for s in specs[name]],
                              "outputs": [{"name": "logits",
                                           "shape": [specs[name][0][1][0], cfg.vocab_size], "dtype": "float32"}]}
                       for name in GRAPHS},
            "mindspore_version": ms.__version__,
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        advance(4)
    return dst


def _graph_bytes(folder: Path, file: str) -> int:
    """Size of a graph and of its external weights folder, if any (a truncated copy is refused)."""
    total = (folder / file).stat().st_size
    variables = folder / file.replace("_graph.mindir", "_variables")
    if file.endswith("_graph.mindir") and variables.is_dir():
        total += sum(p.stat().st_size for p in variables.iterdir())
    return total
