"""The model store: one root folder that jobs write into only by whole-folder renames.

Layout under the root::

    models/<name>/     model folders, LoRA adapters, exported graphs (each complete, or absent)
    datasets/<name>/   preprocessed datasets
    jobs/<job id>/     a job's private place: checkpoints, and its output until it is complete

A job builds its output inside ``jobs/<job id>/`` and :meth:`Store.publish` renames it into
``models/`` or ``datasets/`` only when it is complete, so an inference worker never sees half a
model, and a killed job's leftovers sit where a re-run of the same job finds them (to resume)
and nowhere else.

Paths in requests are confined: names are plain folder names, and source paths must lie inside
the root or one of the extra read-only roots, before and after resolving symlinks. A folder is
checked entry by entry: a symlink anywhere inside it (a weights file, a tokenizer, a subfolder)
must resolve inside the roots too, or a job would read, and copy into the store, whatever the
worker can read.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import MANIFEST_FILE
from .config import CONFIG_FILE, is_own_config
from .errors import PathError
from .lora import ADAPTER_CONFIG

MODELS, DATASETS, JOBS = "models", "datasets", "jobs"
AREAS = (MODELS, DATASETS)
OUTPUT = "output"  # a job's output folder inside its job folder, before it is published

# Matched whole (``fullmatch``): ``$`` alone would also accept a trailing newline.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


@dataclass(frozen=True)
class Entry:
    """One item in the store, as listed."""

    area: str        # "models" | "datasets"
    name: str
    kind: str        # "model" | "adapter" | "exported" | "dataset" | "other"
    size_bytes: int
    modified: float  # unix seconds
    path: Path


def check_name(name: str, what: str = "name") -> str:
    """A store name is one plain folder name: no separators, no '..', no leading dot (temporaries)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in (".", ".."):
        raise PathError(f"{what} {name!r} is not a valid store name "
                        "(letters, digits, '.', '_', '-'; no '/', no leading '.'; at most 128 characters)")
    return name


def check_job_id(job_id: str) -> str:
    """A job id is a plain token (letters, digits, '_', '-'; at most 64): it becomes a folder name
    here and a Redis key suffix in the jobs service, so nothing else may pass (no ':', no '/')."""
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise PathError(f"invalid job id {job_id!r} (letters, digits, '_', '-'; at most 64 characters)")
    return job_id


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


class Store:
    """A store root plus optional extra roots that sources may be read from (never written)."""

    def __init__(self, root: str | Path, read_roots: tuple[str | Path, ...] | list = ()):
        self.root = Path(root).expanduser().resolve()
        for area in (*AREAS, JOBS):
            (self.root / area).mkdir(parents=True, exist_ok=True)
        self.read_roots = (self.root, *(Path(r).expanduser().resolve() for r in read_roots))

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # ---- reading: where a request's source lies ------------------------------------------------
    def source_path(self, path: str, must_exist: bool = True) -> Path:
        """A source path from a request: relative to the root, or absolute inside one of the roots.

        Rejects '..', absolute paths outside the roots, symlinks that lead outside them (the path's
        own, or any inside the folder it names), and other jobs' private folders.
        ``FileNotFoundError`` when it does not exist (and must).
        """
        if not path or "\x00" in path:
            raise PathError("empty source path")
        p = Path(path).expanduser()
        if ".." in p.parts:
            raise PathError(f"{path!r}: '..' is not allowed in store paths")
        candidate = p if p.is_absolute() else self.root / p
        if not any(_inside(candidate, r) for r in self.read_roots):
            raise PathError(f"{path!r} is outside the store's roots ({self._roots()})")
        resolved = candidate.resolve(strict=False)
        self._check_target(resolved, repr(path))
        if must_exist and not resolved.exists():
            raise FileNotFoundError(f"{path!r} not found (looked at {resolved})")
        self._check_tree(resolved, path)
        return resolved

    def item_path(self, area: str, name: str, must_exist: bool = True) -> Path:
        """``models/<name>`` or ``datasets/<name>``, confined to its area even through symlinks."""
        if area not in AREAS:
            raise PathError(f"unknown store area {area!r}; known: {', '.join(AREAS)}")
        check_name(name, f"{area[:-1]} name")
        base = self.root / area
        resolved = (base / name).resolve(strict=False)
        if not any(_inside(resolved, r) for r in self.read_roots):
            raise PathError(f"{area}/{name} leads outside the store's roots through a symlink")
        if must_exist:  # an item about to be read; an output about to be written is not looked into
            if not resolved.exists():
                raise FileNotFoundError(f"{area[:-1]} {name!r} not found in the store ({base})")
            self._check_tree(resolved, f"{area}/{name}")
        return base / name

    def _roots(self) -> str:
        return ", ".join(str(r) for r in self.read_roots)

    def _check_target(self, resolved: Path, shown: str) -> None:
        """A resolved path that a request may read: inside a root, and not a job's private folder."""
        if not any(_inside(resolved, r) for r in self.read_roots):
            raise PathError(f"{shown} leads outside the store's roots through a symlink ({self._roots()})")
        if _inside(resolved, self.root / JOBS):
            raise PathError(f"{shown} is inside a job's private folder")

    def _check_tree(self, folder: Path, shown: str) -> None:
        """Every symlink under ``folder``, at any depth, must resolve where a request may read;
        ``shown`` is the folder as the request named it, so that an error names the entry."""
        if not folder.is_dir():
            return
        seen = set()
        # followlinks: a symlinked subfolder inside the roots may itself hold links that lead out
        for here, dirs, files in os.walk(folder, followlinks=True):
            real = os.path.realpath(here)
            if real in seen:  # a link back to a folder already walked: stop, or the walk never ends
                dirs[:] = []
                continue
            seen.add(real)
            for name in (*dirs, *files):
                entry = Path(here, name)
                if entry.is_symlink():
                    self._check_target(entry.resolve(strict=False), repr(str(Path(shown, entry.relative_to(folder)))))

    def model_path(self, name: str, must_exist: bool = True) -> Path:
        return self.item_path(MODELS, name, must_exist)

    def dataset_path(self, name: str, must_exist: bool = True) -> Path:
        return self.item_path(DATASETS, name, must_exist)

    # ---- writing: job folders and publishing ---------------------------------------------------
    def job_dir(self, job_id: str, create: bool = True) -> Path:
        """The job's private folder (stable across re-deliveries of the same job, so it can resume)."""
        d = self.root / JOBS / check_job_id(job_id)
        if create:
            d.mkdir(parents=True, exist_ok=True)
        return d

    def staging(self, job_id: str) -> Path:
        """Where a job writes its output (the folder itself may not exist yet)."""
        return self.job_dir(job_id) / OUTPUT

    def publish(self, job_id: str, area: str, name: str, overwrite: bool = False) -> Path:
        """Rename the job's finished output into ``<area>/<name>``; one rename, so readers see all or nothing."""
        src = self.staging(job_id)
        if not src.is_dir():
            raise FileNotFoundError(f"job {job_id} has no finished output to publish")
        dst = self.item_path(area, name, must_exist=False)
        if dst.exists() or dst.is_symlink():
            if not overwrite:
                raise FileExistsError(f"{area}/{name} already exists (another job wrote it meanwhile?)")
            old = self.job_dir(job_id) / "replaced"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(dst, old)  # the old version moves into the job folder, then is deleted
            os.rename(src, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(src, dst)
        return dst

    def discard(self, job_id: str) -> None:
        """Remove everything the job wrote that is not published."""
        shutil.rmtree(self.job_dir(job_id, create=False), ignore_errors=True)

    # ---- listing -------------------------------------------------------------------------------
    def list(self, area: str | None = None) -> list[Entry]:
        """Published items (temporaries and hidden names are never listed), sorted by area and name."""
        out = []
        for a in ([area] if area else AREAS):
            if a not in AREAS:
                raise PathError(f"unknown store area {a!r}; known: {', '.join(AREAS)}")
            for p in sorted((self.root / a).iterdir()):
                if p.name.startswith(".") or not p.is_dir() or not _NAME.fullmatch(p.name):
                    continue
                files = [f for f in p.rglob("*") if f.is_file()]
                out.append(Entry(a, p.name, item_kind(p, a), sum(f.stat().st_size for f in files),
                                 p.stat().st_mtime, p))
        return out


def item_kind(folder: Path, area: str = MODELS) -> str:
    """What a published folder holds, from its marker files."""
    if area == DATASETS:
        return "dataset"
    if (folder / MANIFEST_FILE).is_file():
        return "exported"
    if (folder / ADAPTER_CONFIG).is_file():
        return "adapter"
    return "model" if is_own_config(folder / CONFIG_FILE) else "other"


__all__ = ["Store", "Entry", "PathError", "check_name", "check_job_id", "item_kind", "MODELS", "DATASETS", "JOBS",
           "AREAS"]
