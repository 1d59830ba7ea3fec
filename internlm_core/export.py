"""Export a model folder to two MindIR graphs (prefill and one-step decode), and run them.

An exported folder holds ``prefill.mindir``, ``decode.mindir``, ``config.json``,
``tokenizer.model`` and ``mindir_manifest.json`` (inputs, shapes, dtypes, preset, tokenizer
sha256, cache size). ``ExportedEngine`` loads the pair with MindSpore's own ``ms.load`` +
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

MindSpore Lite (MindFormers' research/internlm's runtime) has no Python package for this platform; its path is a
check that fails clearly (see ``require_lite``), not an untested runner.
"""
from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Callable

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from .checkpoint import (MANIFEST_FILE, TOKENIZER_FILE, Cancelled, CheckpointError, atomic_folder, copy_tokenizer,
                         read_config)
from .config import CONFIG_FILE, Config
from .engine_api import EngineBase, bucket, decode_inputs, prefill_inputs
from .errors import ExportError, PromptTooLong
from .loader import load_model, set_runtime
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


# ---- checking an exported folder -----------------------------------------------------------

def read_manifest(folder) -> dict:
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise ExportError(f"{folder} has no {MANIFEST_FILE} (not an exported model)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{MANIFEST_FILE} is not valid JSON: {e}") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ExportError(f"{MANIFEST_FILE} has format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    return manifest


def check_exported(folder) -> tuple[dict, Config]:
    """The manifest and config of an exported folder, after checking that its config, tokenizer and
    graph files are the ones the graphs were exported with; ExportError names any mismatch."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    try:
        cfg = read_config(folder)
        exported = Config.from_dict(manifest["config"])
    except (CheckpointError, KeyError, TypeError, ValueError) as e:
        raise ExportError(f"cannot read the exported config: {e}") from None
    if cfg != exported:
        diff = ", ".join(f"{k}: {v!r} in {CONFIG_FILE} but {manifest['config'].get(k)!r} in the manifest"
                         for k, v in cfg.to_dict().items() if manifest["config"].get(k) != v)
        raise ExportError(f"{CONFIG_FILE} does not match the graphs' manifest (exported from preset "
                          f"{manifest.get('preset')!r}): {diff}")
    exported_files = manifest.get("tokenizer_files") or {TOKENIZER_FILE: manifest.get("tokenizer_sha256")}
    for name in TOKENIZER_FILES:
        want, path = exported_files.get(name), folder / name
        if want is None and path.is_file():
            raise ExportError(f"{name} is not part of the tokenizer the graphs were exported with")
        if want is not None and not path.is_file():
            raise ExportError(f"{folder} has no {name}")
        digest = sha256_file(path) if want is not None else None
        if digest != want:
            raise ExportError(f"{name} (sha256 {digest[:12]}) is not the tokenizer the graphs were exported with "
                              f"(sha256 {str(want)[:12]})")
    for name in GRAPHS:
        g = manifest.get("graphs", {}).get(name) or {}
        file = g.get("file")
        if not file or not (folder / file).is_file():
            raise ExportError(f"{folder} lacks the {name} graph ({file})")
        if _graph_bytes(folder, file) != g.get("bytes"):
            raise ExportError(f"{file} has {_graph_bytes(folder, file)} bytes, the manifest says {g.get('bytes')}: "
                              f"not the graph that was exported")
    return manifest, cfg


def _check_graph_params(graph, cfg: Config, name: str) -> None:
    """A loaded graph must carry exactly the weights the config describes (catches a graph
    copied in from another export)."""
    expected = cfg.param_shapes()
    got = {k: tuple(p.shape) for k, p in graph.parameters_dict().items()}
    if got != expected:
        bad = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
        k = bad[0]
        raise ExportError(f"the {name} graph does not match the config (preset {cfg.name!r}): {k} is "
                          f"{list(got[k]) if k in got else 'missing'}, expected "
                          f"{list(expected[k]) if k in expected else 'absent'} ({len(bad)} mismatches)")


# ---- MindSpore Lite -------------------------------------------------------------------------

def lite_available() -> bool:
    try:
        import mindspore_lite  # noqa: F401
    except ImportError:
        return False
    return True


def require_lite() -> None:
    """The Lite path: refuses clearly. Lite's Python package (mindspore-lite) only exists as
    2.0.0 for Python 3.7 in the registry, so running the pair under Lite was never tested
    here; when Lite is importable this still refuses rather than run untested code."""
    if not lite_available():
        raise ExportError("MindSpore Lite is not installed (the package registry has only mindspore-lite "
                          "2.0.0 for Python 3.7, not installable here); use runtime='mindspore', which loads "
                          "the same MindIR files with ms.load + nn.GraphCell")
    raise ExportError("a MindSpore Lite runtime is importable, but running the exported pair under Lite is "
                      "untested in this project; use runtime='mindspore'")


# ---- the runner ----------------------------------------------------------------------------

class ExportedEngine(EngineBase):
    """Generates from an exported pair; the same interface as ``engine.Engine``.

    ``max_batch``/``max_len`` default to the export's; a static export can run fewer slots or a
    shorter limit than it was exported with (idle slots are padded), never more.
    """

    def __init__(self, folder, max_batch: int | None = None, max_len: int | None = None,
                 runtime: str = "mindspore"):
        if runtime == "lite":
            require_lite()
        if runtime != "mindspore":
            raise ExportError(f"unknown runtime {runtime!r} (mindspore or lite)")
        set_runtime()
        self.folder = Path(folder)
        self.manifest, self.config = check_exported(self.folder)
        cfg, m = self.config, self.manifest
        self.dynamic = bool(m["dynamic"])
        self.max_batch = max_batch or m["max_batch"]
        self.max_len = max_len or m["max_len"]
        if self.dynamic:
            _check_sizes(cfg, self.max_batch, self.max_len)
            self._slots, self._cache_len = self.max_batch, self.max_len
        else:
            if self.max_batch > m["max_batch"] or self.max_len > m["max_len"] or self.max_batch < 1:
                raise ExportError(f"this export has static shapes for {m['max_batch']} slots x {m['max_len']} "
                                  f"positions; asked for {self.max_batch} x {self.max_len} (re-export with "
                                  f"--max-batch/--max-len, or --dynamic)")
            self._slots, self._cache_len = m["max_batch"], m["max_len"]
        self.graphs = {}
        for name in GRAPHS:
            graph = nn.GraphCell(ms.load(str(self.folder / m["graphs"][name]["file"])))
            _check_graph_params(graph, cfg, name)
            self.graphs[name] = graph
        self._share_weights()
        shape = (self._slots, cfg.kv_heads, self._cache_len, cfg.head_dim)
        dtype = getattr(ms, m["compute_dtype"])
        self.cache_dtype = m["compute_dtype"]
        self.caches = [Tensor(np.zeros(shape, np.float32), dtype) for _ in range(2 * cfg.num_layers)]
        self.lock = threading.Lock()  # one step at a time: the caches are shared state
        self.adapters: dict[str, int] = {}  # exported graphs carry no LoRA adapters
        self.adapters_version = 0
        self.prefill_chunk = None  # prompts go in whole (the graphs have no chunked prefill)

    @property
    def cache_bytes(self) -> int:
        return sum(c.nbytes for c in self.caches)

    @property
    def cache_bytes_per_slot(self) -> int:
        return self.cache_bytes // self._slots

    def _share_weights(self) -> None:
        """Point the decode graph's weights at the prefill graph's, dropping the decode copy.

        ``set_data`` with another Parameter shares its storage in MindSpore 2.9 (measured on a
        424 MB model: 1028 -> 840 MB resident after loading; ms.load keeps more than the weights).
        If a version copied instead, this would cost memory, never correctness (weights are read-only)."""
        src = self.graphs["prefill"].parameters_dict()
        for name, p in self.graphs["decode"].parameters_dict().items():
            p.set_data(src[name])

    @staticmethod
    def _no_adapters(adapters) -> None:
        if adapters is not None and np.any(np.asarray(adapters) != 0):
            raise ValueError("an exported engine serves no LoRA adapters")

    def prefill(self, slots: list[int], prompts: list[list[int]], adapters=None, starts=None,
                ends=None) -> np.ndarray:
        """Write each prompt into its slot's cache; logits (B, V) after each prompt's last token.
        As ``Engine.prefill``, but whole prompts only (``starts`` 0, no ``ends``) and no adapters."""
        if ends is not None and any(e < len(p) for e, p in zip(ends, prompts)):
            raise ValueError("an exported engine prefills whole prompts (no ends before a prompt's end)")
        for p in prompts:
            self.check_prompt(len(p))
        self._check_slots(slots)
        self._no_adapters(adapters)
        if starts is not None and np.any(np.asarray(starts) != 0):
            raise ValueError("an exported engine prefills whole prompts (starts must be 0)")
        if not self.dynamic:  # the static graph takes one prompt, padded to the cache length
            return np.concatenate([self._prefill([s], [p], self._cache_len) for s, p in zip(slots, prompts)])
        return self._prefill(slots, prompts, bucket(max(len(p) for p in prompts), self._cache_len))

    def _prefill(self, slots: list[int], prompts: list[list[int]], t: int) -> np.ndarray:
        args = tuple(Tensor(a) for a in prefill_inputs(self.config, slots, prompts, t))
        with self.lock:
            out = self.graphs["prefill"](*args, *self.caches)
            return out.asnumpy()

    def warmup(self) -> int:
        """Prepare the one decode shape (as ``Engine.warmup``); returns 1."""
        self.decode(np.zeros(self.max_batch, np.int32), np.zeros(self.max_batch, np.int64))
        return 1

    def decode(self, tokens: np.ndarray, positions: np.ndarray, adapters=None, slots=None) -> np.ndarray:
        """One token per row at ``positions``; logits (rows, V), as ``Engine.decode`` (no adapters).

        Without ``slots`` the rows are every slot. The exported decode graph has one shape, so it
        always runs every slot over the whole cache (idle slots at position 0, results dropped).
        """
        self._no_adapters(adapters)
        tokens = np.asarray(tokens, np.int32).reshape(-1)
        positions = np.asarray(positions, np.int64).reshape(-1)
        if slots is not None:
            slots = [int(s) for s in slots]
            self._check_slots(slots)
            if not len(tokens) == len(positions) == len(slots):
                raise ValueError(f"decode takes one token and position per slot, got {len(tokens)}, "
                                 f"{len(positions)}, {len(slots)}")
            full_t, full_p = np.zeros(self.max_batch, np.int32), np.zeros(self.max_batch, np.int64)
            full_t[slots], full_p[slots] = tokens, positions
            return self.decode(full_t, full_p)[slots]
        if len(tokens) != self.max_batch or len(positions) != self.max_batch:
            raise ValueError(f"decode takes {self.max_batch} tokens and positions, got {len(tokens)}, {len(positions)}")
        if positions.max() >= self.max_len:
            raise PromptTooLong("sequence reached the cache length")
        pad = self._slots - self.max_batch  # a static export with more slots than asked for: idle extras
        tokens, positions = np.pad(tokens, (0, pad)), np.pad(positions, (0, pad))
        args = tuple(Tensor(a) for a in decode_inputs(self.config, tokens, positions, self._cache_len))
        with self.lock:
            out = self.graphs["decode"](*args, *self.caches)
            return out.asnumpy()[:self.max_batch]
