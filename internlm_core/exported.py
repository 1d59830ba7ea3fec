"""Run an exported pair (``export.py`` writes it): check an exported folder against its manifest,
and ``ExportedEngine``, which loads the two graphs with MindSpore's own ``ms.load`` +
``nn.GraphCell`` and behaves like ``engine.Engine`` (``engine.open_engine`` picks it for a folder
with a manifest). Why the KV caches are the graphs' inputs, written in place: ``export.py``.

There is no MindSpore Lite runner: Lite (MindFormers' research/internlm's runtime) has no Python
package for this platform (the registry's mindspore-lite is 2.0.0 for Python 3.7), so a Lite path
could not be tested here.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn

from .checkpoint import MANIFEST_FILE, TOKENIZER_FILE, CheckpointError, read_config
from .config import CONFIG_FILE, Config
from .engine_api import EngineBase, bucket, decode_inputs, prefill_inputs
from .errors import ExportError, PromptTooLong
from .export import GRAPHS, MANIFEST_FORMAT, _check_sizes, _graph_bytes, sha256_file
from .loader import set_runtime
from .tokenizer import TOKENIZER_FILES


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


# ---- the runner ----------------------------------------------------------------------------

class ExportedEngine(EngineBase):
    """Generates from an exported pair; the same interface as ``engine.Engine``.

    ``max_batch``/``max_len`` default to the export's; a static export can run fewer slots or a
    shorter limit than it was exported with (idle slots are padded), never more.
    """

    def __init__(self, folder, max_batch: int | None = None, max_len: int | None = None):
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
