"""Training checkpoints: everything a resumed run needs (the Parameters ``TrainStep.state_params``
names, plus the trainer's JSON: step, loss history, the run's fingerprint), one folder per step
under ``work_dir/checkpoints/``, written atomically; the newest ``keep_last`` are kept."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import Tensor

from .checkpoint import SafetensorsFile, SafetensorsWriter, atomic_folder

# safetensors' name of each dtype a training state holds (ms.dtype_to_nptype is deprecated and warns per call)
MS_TO_ST = {ms.float32: "F32", ms.float16: "F16", ms.float64: "F64", ms.int32: "I32", ms.int64: "I64",
            ms.int8: "I8", ms.uint8: "U8", ms.bool_: "BOOL"}
CKPT_DIR = "checkpoints"
STATE_FILE = "state.safetensors"
TRAINER_FILE = "trainer.json"


def save_checkpoint(work_dir: Path, step: int, params: dict, trainer: dict, keep_last: int) -> Path:
    ckpts = Path(work_dir) / CKPT_DIR
    dst = ckpts / f"step-{step:08d}"
    with atomic_folder(dst, overwrite=True) as tmp:
        header = [(n, MS_TO_ST[p.dtype], tuple(p.shape)) for n, p in params.items()]
        w = SafetensorsWriter(tmp / STATE_FILE, header)
        for n, p in params.items():  # one tensor's host copy at a time: never a second copy of the model
            w.write(n, np.asarray(p.asnumpy(), order="C"))  # (ascontiguousarray would make a scalar 1-D)
        w.close()
        (tmp / TRAINER_FILE).write_text(json.dumps(trainer) + "\n")
    for old in sorted(p for p in ckpts.iterdir() if p.name.startswith("step-"))[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return dst


def latest_checkpoint(work_dir: Path) -> Path | None:
    ckpts = Path(work_dir) / CKPT_DIR
    if not ckpts.is_dir():
        return None
    done = sorted(p for p in ckpts.iterdir() if p.name.startswith("step-") and (p / TRAINER_FILE).is_file())
    return done[-1] if done else None


def checkpoint_step(work_dir: Path) -> int | None:
    """The step of the newest checkpoint in ``work_dir`` (None: none), without loading it."""
    ckpt = latest_checkpoint(work_dir)
    return None if ckpt is None else json.loads((ckpt / TRAINER_FILE).read_text())["step"]


def load_checkpoint(path: Path, params: dict) -> dict:
    """Set ``params`` from the checkpoint folder ``path``; the trainer's JSON."""
    f = SafetensorsFile(path / STATE_FILE)
    missing = sorted(set(params) - set(f.keys()))
    if missing:
        raise ValueError(f"checkpoint {path} does not match this run (missing {missing[:3]}); use a fresh work folder")
    for n, p in params.items():
        arr = np.array(f.get(n))
        if tuple(arr.shape) != tuple(p.shape):
            raise ValueError(f"checkpoint {path}: {n} has shape {list(arr.shape)}, the run needs {list(p.shape)}")
        p.set_data(Tensor(arr, p.dtype))
    return json.loads((path / TRAINER_FILE).read_text())
