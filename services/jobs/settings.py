"""Settings shared by the Jobs API, the Celery app and its workers (one place, read from the environment)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, replace
from pathlib import Path

# Longer than any job this project runs: Redis re-delivers an unacknowledged message after this
# long even when its worker is alive (celery issue 5935). Lost workers are detected sooner, by
# their job's lock expiring (lock_ttl_s), and their job is re-queued then.
WEEK = 7 * 24 * 3600


# The most a request may ask for, checked at submit (checks.py, api.py) and listed in the README:
# one job must not hold a worker for months, fill the disk with checkpoints, or size a cache or a
# row that no machine here can hold. Each name is the request field it bounds.
LIMITS = {
    "idempotency_key": 128,      # characters (printable), the key's Redis key suffix
    "max_steps": 1_000_000,      # optimiser steps of a fine-tune
    "epochs": 1000,              # passes over the data (when max_steps is 0)
    "batch_size": 1024,          # rows per micro-batch
    "grad_accum": 1024,          # micro-batches per step
    "lora_rank": 1024,
    "keep_last": 20,             # checkpoints kept (each one is the weights and the optimiser state)
    "checkpoints": 100_000,      # checkpoints one run writes: max_steps / save_every
    "seq_length": 32768,         # tokens per preprocessed row
    "max_batch": 64,             # an exported graph's cache slots
    "max_len": 32768,            # an exported graph's positions (and at most the model's own)
    "list_jobs": 1000,           # jobs one ListJobs (or GET /api/jobs) returns
}


@dataclass(frozen=True)
class JobsSettings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    store_root: str = str(Path("~/.cache/internlm/store").expanduser())
    read_roots: tuple[str, ...] = ()       # extra folders sources may be read from (never written)
    heartbeat_s: float = 5.0               # a running job renews its lock this often
    lock_ttl_s: float = 30.0               # a job whose lock is this stale lost its worker: re-queue it
    # A running job that shows no sign of life from its own thread (a progress report or a cancel
    # check: every tensor, step or row) for this long is presumed hung although its process lives:
    # its lock is let go and the job re-queued. Longer than the slowest silent phase (compiling
    # the first training step of a 20B model); 0 = no watchdog.
    stall_s: float = 900.0
    # A job whose executions lost their worker this many times (killed -9, by the kernel's OOM
    # killer, or hung) ends FAILED instead of being re-queued again: a job that kills every worker
    # it runs on would otherwise go round the workers forever. 0 = no limit.
    max_deliveries: int = 3
    keep_finished_s: float = 30 * 24 * 3600.0  # finished job records are deleted after this long; 0 = keep
    visibility_timeout_s: int = WEEK
    prefix: str = "internlm"               # Redis key prefix for job records

    @classmethod
    def from_env(cls, env=None, **overrides) -> "JobsSettings":
        env = os.environ if env is None else env
        kw = {name: _parse(name, env[var]) for name, var in ENV.items() if var in env}
        return cls(**{**kw, **overrides})

    @classmethod
    def coerce(cls, settings) -> "JobsSettings":
        """Accept JobsSettings, None (environment), or any object with redis_url / store_root attributes."""
        if isinstance(settings, cls):
            return settings
        base = cls.from_env()
        if settings is None:
            return base
        got = {n: getattr(settings, n) for n in ENV if getattr(settings, n, None) not in (None, "")}
        if "store_root" not in got and getattr(settings, "store", None):
            got["store_root"] = str(settings.store)
        return replace(base, **got)

    def env(self) -> dict[str, str]:
        """The environment that gives a worker process these settings."""
        return {var: _format(getattr(self, name)) for name, var in ENV.items()}


# Each setting's environment variable (one table: from_env, coerce and env all read it).
ENV = {
    "redis_url": "INTERNLM_REDIS_URL",
    "store_root": "INTERNLM_STORE",
    "read_roots": "INTERNLM_STORE_READ_ROOTS",   # os.pathsep-separated
    "heartbeat_s": "INTERNLM_JOB_HEARTBEAT_S",
    "lock_ttl_s": "INTERNLM_JOB_LOCK_TTL_S",
    "stall_s": "INTERNLM_JOB_STALL_S",
    "max_deliveries": "INTERNLM_JOB_MAX_DELIVERIES",
    "keep_finished_s": "INTERNLM_JOB_KEEP_S",
    "visibility_timeout_s": "INTERNLM_JOB_VISIBILITY_TIMEOUT_S",
}
_TYPES = {f.name: f.type for f in dataclasses.fields(JobsSettings)}


def _parse(name: str, text: str):
    kind = _TYPES[name]
    if kind.startswith("tuple"):
        return tuple(p for p in text.split(os.pathsep) if p)
    return {"float": float, "int": int}.get(kind, str)(text)


def _format(value) -> str:
    return os.pathsep.join(map(str, value)) if isinstance(value, tuple) else str(value)
