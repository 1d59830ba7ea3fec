"""Worker discovery through Redis: each inference worker keeps a key with a short TTL alive
(with its address, model and load), the endpoint lists the keys. Works the same on loopback
and in compose (there the address is the container's host name); a worker that dies simply
stops renewing its key and drops out within the TTL.
"""
from __future__ import annotations

import json
import logging
import threading
import time

import redis

log = logging.getLogger("internlm.registry")

PREFIX = "internlm:workers:"
TTL_S = 5.0
BEAT_S = 1.0


class Registration:
    """Keeps ``PREFIX + worker_id`` alive while the worker runs; ``info()`` gives its fields."""

    def __init__(self, redis_url: str, worker_id: str, info, beat_s: float = BEAT_S, ttl_s: float = TTL_S):
        self.r = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self.key, self.info = PREFIX + worker_id, info
        self.beat_s, self.ttl_s = beat_s, ttl_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="registration", daemon=True)

    def start(self) -> "Registration":
        """Register now and keep renewing; a Redis that cannot be reached yet is one log line, and
        the renewals register the worker as soon as it can be."""
        try:
            self.beat()
        except redis.RedisError as e:
            log.warning("cannot reach Redis to register %s (%s); serving, and registering once it is reachable",
                        self.key, e)
        self._thread.start()
        return self

    def beat(self) -> None:
        self.r.set(self.key, json.dumps(self.info()), px=int(self.ttl_s * 1000))

    def _run(self) -> None:
        warned = False
        while not self._stop.wait(self.beat_s):
            try:
                self.beat()
                warned = False
            except redis.RedisError as e:  # Redis restarting: keep serving, re-register when it is back
                if not warned:
                    log.warning("cannot reach Redis to renew %s: %s", self.key, e)
                    warned = True

    def stop(self) -> None:
        """Leave the registry at once (graceful shutdown), so no new request is routed here."""
        self._stop.set()
        try:
            self.r.delete(self.key)
        except redis.RedisError:
            pass


def parse_registration(value: bytes) -> dict | None:
    """A registration's info, its fields of the types the router reads (address and model strings,
    load and max_batch integers), or None where it is not one: anything that can write the Redis a
    deployment shares could leave a bad value under the prefix, and one must not stop the routing."""
    try:
        info = json.loads(value)
        if not isinstance(info, dict) or not isinstance(info.get("address"), str) or not info["address"] \
                or not isinstance(info.get("model"), str):
            return None
        return {**info, "load": int(info.get("load", 0)), "max_batch": int(info.get("max_batch", 0)),
                "precision": str(info.get("precision", ""))[:120]}
    except (ValueError, TypeError):  # not JSON (UnicodeDecodeError included), or a count that is no number
        return None


def list_workers(r: redis.Redis) -> dict[str, dict]:
    """{worker id: info} of every live, well-formed registration (a malformed one is logged, skipped)."""
    keys = list(r.scan_iter(match=PREFIX + "*", count=200))
    out = {}
    for key, value in zip(keys, r.mget(keys) if keys else []):
        if value is None:  # expired between SCAN and MGET
            continue
        name = key.decode(errors="replace").removeprefix(PREFIX)
        info = parse_registration(value)
        if info is None:
            log.warning("skipping the malformed worker registration %r", name[:200])
            continue
        out[name] = info
    return out


def wait_for_workers(redis_url: str, n: int, timeout: float = 120.0) -> dict[str, dict]:
    """Block until at least ``n`` workers are registered (launchers and tests)."""
    r = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout
    while True:
        workers = list_workers(r)
        if len(workers) >= n:
            return workers
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(workers)} of {n} workers registered after {timeout:.0f}s")
        time.sleep(0.2)
