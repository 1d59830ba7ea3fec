"""``pytorch_model*.bin`` files read without torch: tensors memory-mapped from the archive,
behind an unpickler that allows only what a state dict needs (see below)."""
from __future__ import annotations

import io
import math
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .checkpoint import NP_TO_ST, ST_TO_NP
from .errors import CheckpointError

# ``torch.save`` (torch >= 1.6) writes a zip archive whose members are stored, not compressed:
# ``<root>/data.pkl``, a pickle (protocol 2) of the state dict, and one ``<root>/data/<key>``
# member of raw little-endian bytes per storage. The pickle names each storage by a persistent id
# ``('storage', torch.<Dtype>Storage, key, location, numel)`` and rebuilds each tensor with
# ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)``.
# Unpickling calls whatever globals a file names, so a hostile file could run any code: only the
# globals a tensor state dict needs are allowed, each one a numpy stand-in defined here (nothing
# from torch is imported or called), and anything else is refused before it is called.

_TORCH_STORAGES = {"FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16",
                   "DoubleStorage": "F64", "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16",
                   "CharStorage": "I8", "ByteStorage": "U8", "BoolStorage": "BOOL"}
# The most ``data.pkl`` may unpack to: a state dict's pickle is a few hundred bytes a tensor, and
# torch stores it uncompressed, so it is never larger than its archive; a compressed one may not
# unpack past the archive's own size either (a zip bomb), nor past this cap.
MAX_PICKLE_BYTES = 256 << 20
# what torch.save(..., _use_new_zipfile_serialization=False) starts with: its magic number, pickled
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


class _StorageType:
    """Stands for ``torch.<Dtype>Storage`` in a persistent id; never called."""

    def __init__(self, st_dtype: str):
        self.st_dtype = st_dtype


def _is_ints(xs) -> bool:
    return isinstance(xs, tuple) and all(isinstance(x, int) and x >= 0 for x in xs)


def _rebuild_tensor(storage, offset, size, stride, *_requires_grad_hooks_metadata):
    """``torch._utils._rebuild_tensor_v2``: a read-only strided view of the storage's memory map.

    The view must hold no more elements than its storage, so that a tensor is never larger than
    the bytes the file holds for it: a stride of 0 (or overlapping strides) would otherwise make
    a few bytes of file stand for a tensor of any size, which a copy or a cast then allocates."""
    if not isinstance(storage, np.ndarray) or not _is_ints((offset,)) or not _is_ints(size) \
            or not _is_ints(stride) or len(size) != len(stride):
        raise CheckpointError("malformed tensor record")
    if 0 not in size:
        if any(s == 0 for n, s in zip(size, stride) if n > 1):
            raise CheckpointError(f"a tensor of shape {list(size)} has a stride of 0 (a broadcast view): "
                                  "state dicts hold real tensors")
        if math.prod(size) > storage.size - offset:
            raise CheckpointError(f"a tensor of shape {list(size)} has more elements than its storage of "
                                  f"{storage.size} elements holds after offset {offset}")
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.size:
            raise CheckpointError(f"a tensor of shape {list(size)} reaches past its storage of {storage.size} elements")
    return np.lib.stride_tricks.as_strided(storage[offset:], size, [s * storage.itemsize for s in stride],
                                           writeable=False)


def _rebuild_parameter(data, _requires_grad=False, _hooks=None):
    """``torch._utils._rebuild_parameter``: an ``nn.Parameter`` is just its tensor here."""
    if not isinstance(data, np.ndarray):
        raise CheckpointError("malformed parameter record")
    return data


_TORCH_GLOBALS = {("collections", "OrderedDict"): OrderedDict,
                  ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
                  ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
                  **{("torch", name): _StorageType(st) for name, st in _TORCH_STORAGES.items()}}


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, file, storage):
        super().__init__(file)
        self._storage = storage  # (key, st dtype, numel) -> the storage's array

    def find_class(self, module, name):
        found = _TORCH_GLOBALS.get((module, name))
        if found is None:
            raise CheckpointError(f"refused global {module}.{name}: a tensor state dict does not need it")
        return found

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and _is_ints((pid[4],))):
            raise CheckpointError(f"unsupported persistent id {str(pid)[:80]}")
        return self._storage(pid[2], pid[1].st_dtype, pid[4])


class TorchBinFile:
    """A ``pytorch_model*.bin`` written by ``torch.save``, read without torch.

    The pickle is loaded with the restricted unpickler above; each tensor is a strided view of
    the file's memory map (torch stores the members uncompressed), so reading a tensor touches
    only its own pages.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        name = self.path.name
        with open(self.path, "rb") as f:
            head = f.read(len(_LEGACY_MAGIC))
        if head == _LEGACY_MAGIC:
            raise CheckpointError(f"{name}: cannot be read as a torch checkpoint: it is in torch's legacy "
                                  "(pre-1.6, non-zip) format; re-save it with a recent torch.save or as safetensors")
        try:
            with zipfile.ZipFile(self.path) as z:
                members = {i.filename: i for i in z.infolist()}
                pkl = next((n for n in members if n.endswith("/data.pkl") and n.count("/") == 1), None)
                if pkl is None:
                    raise CheckpointError(f"{name}: cannot be read as a torch checkpoint (no data.pkl)")
                root = pkl[:-len("data.pkl")]
                if root + "byteorder" in members and z.read(root + "byteorder") != b"little":
                    raise CheckpointError(f"{name}: big-endian torch checkpoints are not supported")
                most = min(MAX_PICKLE_BYTES, self.path.stat().st_size)
                if members[pkl].file_size > most:
                    raise CheckpointError(f"{name}: {pkl} unpacks to {members[pkl].file_size} bytes, more than "
                                          f"the {most} allowed (a state dict's pickle is smaller than its archive)")
                with z.open(pkl) as f:
                    data = f.read(most + 1)  # the sizes in the zip's headers may lie: read no more
                if len(data) > most:
                    raise CheckpointError(f"{name}: {pkl} unpacks to more than the {most} bytes allowed")
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - zipfile raises several kinds for a damaged archive
            raise CheckpointError(f"{name}: cannot be read as a torch checkpoint ({e})") from None
        self._raw = np.memmap(self.path, np.uint8, mode="r")
        self._members, self._root, self._storages = members, root, {}
        try:
            sd = _StateDictUnpickler(io.BytesIO(data), self._storage).load()
        except CheckpointError as e:
            raise CheckpointError(f"{name}: {e}") from None
        except Exception as e:  # noqa: BLE001 - a corrupt pickle fails in many ways
            raise CheckpointError(f"{name}: cannot be read as a torch checkpoint ({type(e).__name__}: {e})") from None
        if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in sd.items()):
            raise CheckpointError(f"{name}: not a state dict of tensors")
        self.sd = sd

    def _storage(self, key: str, st_dtype: str, numel: int) -> np.ndarray:
        if key in self._storages:
            return self._storages[key]
        info = self._members.get(f"{self._root}data/{key}")
        if info is None:
            raise CheckpointError(f"storage {key} is missing from the archive")
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"storage {key} is compressed (torch.save stores storages uncompressed)")
        dtype = np.dtype(ST_TO_NP[st_dtype])
        if info.file_size != numel * dtype.itemsize:
            raise CheckpointError(f"storage {key} holds {info.file_size} bytes, its record says {numel} x {dtype}")
        # the member's data follows its local header, whose extra field may differ from the central one
        local = bytes(self._raw[info.header_offset:info.header_offset + 30])
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise CheckpointError(f"storage {key}: corrupt zip header")
        n, m = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + n + m
        if start + info.file_size > self._raw.size:
            raise CheckpointError(f"storage {key} is truncated")
        arr = self._raw[start:start + info.file_size].view(dtype)
        self._storages[key] = arr
        return arr

    def keys(self):
        return self.sd.keys()

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        t = self.sd[name]
        return NP_TO_ST[t.dtype], tuple(t.shape)

    def get(self, name: str) -> np.ndarray:
        return self.sd[name]
