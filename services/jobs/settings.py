"""Settings shared by the Jobs API, the Celery app and its workers (one place, read from the environment)."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

# Longer than any job this project runs: Redis re-delivers an unacknowledged message after this
# long even when its worker is alive (celery issue 5935). Lost workers are detected sooner, by
# their job's lock expiring (lock_ttl_s), and their job is re-queued then.
WEEK = 7 * 24 * 3600


@dataclass(frozen=True)
class JobsSettings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    store_root: str = str(Path("~/.cache/internlm/store").expanduser())
    read_roots: tuple[str, ...] = ()       # extra folders sources may be read from (never written)
    heartbeat_s: float = 5.0               # a running job renews its lock this often
    lock_ttl_s: float = 30.0               # a job whose lock is this stale lost its worker: re-queue it
    visibility_timeout_s: int = WEEK
    prefix: str = "internlm"               # Redis key prefix for job records

    @classmethod
    def from_env(cls, env=None, **overrides) -> "JobsSettings":
        env = os.environ if env is None else env
        s = cls()
        kw = dict(
            redis_url=env.get("INTERNLM_REDIS_URL", s.redis_url),
            store_root=env.get("INTERNLM_STORE", s.store_root),
            read_roots=tuple(p for p in env.get("INTERNLM_STORE_READ_ROOTS", "").split(os.pathsep) if p),
            heartbeat_s=float(env.get("INTERNLM_JOB_HEARTBEAT_S", s.heartbeat_s)),
            lock_ttl_s=float(env.get("INTERNLM_JOB_LOCK_TTL_S", s.lock_ttl_s)),
            visibility_timeout_s=int(env.get("INTERNLM_JOB_VISIBILITY_TIMEOUT_S", s.visibility_timeout_s)),
        )
        return cls(**{**kw, **overrides})

    @classmethod
    def coerce(cls, settings) -> "JobsSettings":
        """Accept JobsSettings, None (environment), or any object with redis_url / store_root attributes."""
        if isinstance(settings, cls):
            return settings
        base = cls.from_env()
        if settings is None:
            return base
        names = ("redis_url", "store_root", "read_roots", "heartbeat_s", "lock_ttl_s", "visibility_timeout_s")
        got = {n: getattr(settings, n) for n in names if getattr(settings, n, None) not in (None, "")}
        if "store_root" not in got and getattr(settings, "store", None):
            got["store_root"] = str(settings.store)
        return replace(base, **got)

    def env(self) -> dict[str, str]:
        """The environment that gives a worker process these settings."""
        return {"INTERNLM_REDIS_URL": self.redis_url, "INTERNLM_STORE": str(self.store_root),
                "INTERNLM_STORE_READ_ROOTS": os.pathsep.join(map(str, self.read_roots)),
                "INTERNLM_JOB_HEARTBEAT_S": str(self.heartbeat_s), "INTERNLM_JOB_LOCK_TTL_S": str(self.lock_ttl_s),
                "INTERNLM_JOB_VISIBILITY_TIMEOUT_S": str(self.visibility_timeout_s)}
