"""Tensor-by-tensor checkpoint files: safetensors read/write with bf16; HF folders of safetensors
or torch pickles (``torch_bin``) opened alike.

A model folder written by this project holds ``config.json`` (``Config``),
``model.safetensors`` (MindFormers parameter names; MindSpore's own
``load_checkpoint(..., format="safetensors")`` reads it) and ``tokenizer.model``.
Files are written to a temporary name and renamed when complete, so a reader never sees
half a file.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import uuid
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from .config import Config
from .errors import Cancelled, CheckpointError  # noqa: F401 (Cancelled: jobs and the trainer take it from here)

WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.model"
# An exported folder (export.py) names itself by this file; here, so that MindSpore-free code (the
# store, the job checks) can tell one without loading the exporter.
MANIFEST_FILE = "mindir_manifest.json"

# safetensors dtype names <-> numpy storage; bf16 is kept as raw uint16 bits (numpy has no bf16).
ST_TO_NP = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
NP_TO_ST = {np.dtype(v): k for k, v in ST_TO_NP.items()}  # unambiguous: uint16 is only ever bf16 bits
DTYPE_TO_ST = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
ST_TO_DTYPE = {v: k for k, v in DTYPE_TO_ST.items()}


# ---- where a folder's weights may live ------------------------------------------------------

def confined(folder: Path, path: Path, shown: str | None = None) -> Path:
    """``path``, a weights file of the model ``folder``, if its real location (links followed) is
    inside the folder, or, for a snapshot of a Hugging Face cache (``models--org--name/snapshots/
    <rev>/``, whose files are links to ``../../blobs/<hash>``), inside that repository's
    ``blobs``; else CheckpointError naming it (``shown``, or its name in the folder). A link
    leading anywhere else would have a worker serve, or a job copy into the store, whatever file
    it names."""
    folder = Path(folder)
    real_folder, real = folder.resolve(), Path(path).resolve()
    homes = [real_folder]
    if real_folder.parent.name == "snapshots" and real_folder.parent.parent.name.startswith("models--"):
        homes.append(real_folder.parent.parent / "blobs")
    if not any(real == h or h in real.parents for h in homes):
        where = shown or f"{folder.name}/{Path(path).relative_to(folder)}"
        raise CheckpointError(f"{where} leads outside the folder through a symlink (a weights file must lie in "
                              "the model folder, or in the blobs of the Hugging Face cache it is a snapshot of)")
    return Path(path)


# ---- dtype conversion on raw arrays -------------------------------------------------------

def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round to nearest even, as torch does; NaN stays NaN."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


def to_float32(arr: np.ndarray, st_dtype: str) -> np.ndarray:
    return bf16_to_f32(arr) if st_dtype == "BF16" else arr.astype(np.float32, copy=False)


def cast(arr: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Convert between safetensors dtypes (F32/F16/BF16) without a framework."""
    if src == dst:
        return arr
    f = to_float32(arr, src)
    return f32_to_bf16(f) if dst == "BF16" else f.astype(ST_TO_NP[dst])


# ---- safetensors ---------------------------------------------------------------------------

class SafetensorsFile:
    """Reads one safetensors file a tensor at a time, validating its header against its size.

    Each ``get`` reads just that tensor's bytes (no memory map), so a reader's memory is one
    tensor, not the file, whatever the page cache holds; ``rows`` reads part of one, and ``map``
    maps one where it lies.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path.name}: truncated (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 * 2**20:
                raise CheckpointError(f"{self.path.name}: truncated or not a safetensors file")
            try:
                header = json.loads(f.read(n))
            except ValueError:
                raise CheckpointError(f"{self.path.name}: corrupt header") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path.name}: corrupt header (not a JSON object)")
        self.metadata = header.pop("__metadata__", {}) or {}
        self.base = 8 + n
        self.entries = header
        for name, e in header.items():
            self._check_entry(name, e, size - self.base)

    def _check_entry(self, name: str, e, room: int) -> None:
        """Each tensor's record must be whole and its bytes inside the file (``room`` bytes after
        the header), as many as its dtype and shape say, so a read never goes past the file or
        stands for more (or other) bytes than the file holds for it."""
        where = f"{self.path.name}: tensor {name!r}"
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= e.keys():
            raise CheckpointError(f"{where}: corrupt header entry")
        shape, offsets = e["shape"], e["data_offsets"]
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise CheckpointError(f"{where}: bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{where}: bad data_offsets {offsets!r}")
        if offsets[1] > room:
            raise CheckpointError(f"{where}: truncated ({self.base + room} bytes, its data ends at "
                                  f"{self.base + offsets[1]})")
        if e["dtype"] in ST_TO_NP:  # an unknown dtype is refused when the tensor is read
            nbytes = math.prod(shape) * np.dtype(ST_TO_NP[e["dtype"]]).itemsize
            if nbytes != offsets[1] - offsets[0]:
                raise CheckpointError(f"{where}: {e['dtype']}{shape} is {nbytes} bytes, but its data_offsets "
                                      f"span {offsets[1] - offsets[0]}")

    def keys(self):
        return self.entries.keys()

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        e = self.entries[name]
        return e["dtype"], tuple(e["shape"])

    def _where(self, name: str) -> tuple[np.dtype, tuple[int, ...], int]:
        """(numpy dtype, shape, file offset) of tensor ``name``."""
        e = self.entries[name]
        if e["dtype"] not in ST_TO_NP:
            raise CheckpointError(f"{self.path.name}: {name} has unsupported dtype {e['dtype']}")
        return np.dtype(ST_TO_NP[e["dtype"]]), tuple(e["shape"]), self.base + e["data_offsets"][0]

    def get(self, name: str) -> np.ndarray:
        dtype, shape, offset = self._where(name)
        return np.fromfile(self.path, dtype, int(np.prod(shape, dtype=np.int64)), offset=offset).reshape(shape)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of tensor ``name`` (along its first axis), reading only their bytes."""
        dtype, shape, offset = self._where(name)
        start, stop = max(0, start), min(stop, shape[0])
        row = int(np.prod(shape[1:], dtype=np.int64))
        count = max(stop - start, 0) * row
        return np.fromfile(self.path, dtype, count, offset=offset + start * row * dtype.itemsize).reshape(
            (max(stop - start, 0),) + shape[1:])

    def map(self, name: str) -> np.ndarray:
        """Tensor ``name`` memory-mapped (private, copy-on-write: a write never reaches the file):
        its pages are read when touched and belong to the page cache, so a large table of which a
        few rows are read costs those rows."""
        dtype, shape, offset = self._where(name)
        return np.memmap(self.path, dtype, "c", offset, shape)


class SafetensorsWriter:
    """Writes tensors one at a time into a file whose header is fixed up front.

    With ``resume=True`` the writer keeps a journal beside the file (``<file>.journal``: each
    tensor's name and CRC-32, appended and fsynced once its bytes are on disk). A writer opened
    again on the same path with the same header re-reads the journaled tensors, keeps the leading
    ones whose bytes still match their CRC (``kept``), and goes on after them; a different header
    or a missing journal starts over. That is how a killed conversion resumes."""

    def __init__(self, path: str | Path, entries: list[tuple[str, str, tuple[int, ...]]], metadata=None,
                 resume: bool = False):
        header, offset = {}, 0
        for name, st_dtype, shape in entries:
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(ST_TO_NP[st_dtype]).itemsize
            header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        if metadata:
            header["__metadata__"] = metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned
        self.header, self.order = header, [e[0] for e in entries]
        self.path, self._start = Path(path), 8 + len(raw)
        self.journal = Path(f"{path}.journal") if resume else None
        self.kept = self._verified(raw) if resume else 0
        if self.kept:
            self.f = open(path, "r+b")
            self.f.truncate(self._start + self.header[self.order[self.kept - 1]]["data_offsets"][1])
            self.f.seek(0, os.SEEK_END)
            lines = self.journal.read_text().splitlines()[:self.kept]
            self.journal.write_text("".join(line + "\n" for line in lines))
        else:
            self.f = open(path, "wb")
            self.f.write(struct.pack("<Q", len(raw)) + raw)
            if self.journal:
                self.journal.write_text("")
        self._next = self.kept

    def _verified(self, raw: bytes) -> int:
        """How many leading tensors an earlier writer left complete and intact in the file."""
        if not (self.path.is_file() and self.journal.is_file()):
            return 0
        with open(self.path, "rb") as f:
            if f.read(8 + len(raw)) != struct.pack("<Q", len(raw)) + raw:
                return 0
            kept = 0
            for line in self.journal.read_text().splitlines():
                name, _, crc = line.partition(" ")
                if kept >= len(self.order) or name != self.order[kept]:
                    break
                start, end = self.header[name]["data_offsets"]
                f.seek(self._start + start)
                if _crc32(f, end - start) != crc:
                    break
                kept += 1
        return kept

    def write(self, name: str, arr: np.ndarray) -> None:
        if name != self.order[self._next]:
            raise CheckpointError(f"expected tensor {self.order[self._next]}, got {name}")
        e = self.header[name]
        want = np.dtype(ST_TO_NP[e["dtype"]])
        if tuple(arr.shape) != tuple(e["shape"]) or arr.dtype != want:
            raise CheckpointError(f"{name}: got {arr.dtype}{list(arr.shape)}, header says {want}{e['shape']}")
        data = np.ascontiguousarray(arr).tobytes()
        self.f.write(data)
        if self.journal:  # journaled only once the bytes are on disk, so a kill never journals a torn tensor
            self.f.flush()
            os.fsync(self.f.fileno())
            with open(self.journal, "a") as j:
                j.write(f"{name} {zlib.crc32(data):08x}\n")
                j.flush()
                os.fsync(j.fileno())
        self._next += 1

    def abort(self) -> None:
        """Stop writing; what was journaled stays for a resuming writer."""
        self.f.close()

    def close(self) -> None:
        self.f.close()
        if self._next != len(self.order):
            raise CheckpointError(f"only {self._next} of {len(self.order)} tensors were written")
        if self.journal:
            self.journal.unlink(missing_ok=True)


def _crc32(f, n: int, block: int = 64 << 20) -> str:
    crc = 0
    while n > 0:
        chunk = f.read(min(block, n))
        if not chunk:
            break
        crc, n = zlib.crc32(chunk, crc), n - len(chunk)
    return f"{crc:08x}" if n == 0 else ""


# ---- atomic folders ------------------------------------------------------------------------

@contextmanager
def atomic_folder(dst: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to ``dst`` only if the block succeeds."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if dst.exists():
            old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def copy_tokenizer(src_folder: Path | None, dst_folder: Path) -> None:
    """Keep the model's own tokenizer files (``tokenizer.model`` and the files that name its special
    tokens) when it has them; else the bundled InternLM tokenizer."""
    from .tokenizer import BUNDLED_MODEL, TOKENIZER_FILES

    src = Path(src_folder) if src_folder else None
    if src is None or not (src / TOKENIZER_FILE).is_file():
        shutil.copyfile(BUNDLED_MODEL, Path(dst_folder) / TOKENIZER_FILE)
        return
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, Path(dst_folder) / name)


def read_config(folder: str | Path) -> Config:
    from .config import ConfigError

    try:
        return Config.from_checkpoint(folder)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
