"""Keeps a worker's job locks alive from a small separate process.

A thread in the worker would not do: MindSpore holds the GIL for seconds at a time (its import,
graph compilation), long enough for a lock to expire under a job that is alive and well. This
process has nothing else to do. It renews the locks it is told to hold, and stops the moment its
worker dies (its stdin closes, or it is re-parented), so a worker killed with -9 loses its locks
``lock_ttl_s`` later, and only then is its job run again. It is also the watchdog: a lock is
renewed only while the job's own thread shows signs of life (``records.HOLD``), so a worker that
hangs while its process stays alive loses its job ``stall_s`` after its last sign.

Protocol on stdin, one JSON object a line:
``{"op": "hold", "lock": KEY, "token": T, "job": HASH_KEY, "field": F, "alive": A}`` renews KEY
while its value is T and HASH_KEY's field A is at most ``stall_s`` old, and writes the time into
HASH_KEY's field F (the execution's last heartbeat);
``{"op": "drop", "lock": KEY}`` stops.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time

from .records import HOLD, connect


def serve(redis_url: str, interval: float, ttl: float, stall: float) -> None:
    # Ctrl-C reaches the whole process group; the worker decides when to stop, and this follows it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    r = connect(redis_url)
    r.ping()
    renew = r.register_script(HOLD)
    print("ready", flush=True)  # the worker waits for this before it takes a job
    held: dict[str, dict] = {}
    guard = threading.Lock()
    gone, wake = threading.Event(), threading.Event()
    parent = os.getppid()

    def read() -> None:
        for line in sys.stdin:
            msg = json.loads(line)
            with guard:
                if msg["op"] == "hold":
                    held[msg["lock"]] = msg
                    wake.set()  # renew (and stamp the heartbeat) at once
                else:
                    held.pop(msg["lock"], None)
        gone.set()  # EOF: the worker is gone
        wake.set()

    threading.Thread(target=read, daemon=True).start()
    while True:
        wake.wait(interval)
        wake.clear()
        if gone.is_set() or os.getppid() != parent:
            return
        with guard:
            items = list(held.values())
        for m in items:
            try:
                now = repr(time.time())
                kept = renew(keys=[m["lock"], m["job"]],
                             args=[m["token"], int(ttl * 1000), m["alive"], now, f"{stall:g}"])
                if kept == 1:
                    r.hset(m["job"], m["field"], now)
                else:  # taken away, or let go by the watchdog: the worker finds out by itself
                    with guard:
                        held.pop(m["lock"], None)
                    if kept == -1:
                        print(f"heartbeat: {m['job']} showed no sign of life for {stall:g} s; let go of its lock",
                              file=sys.stderr, flush=True)
            except Exception as e:  # noqa: BLE001 - Redis briefly away: the TTL leaves room to retry
                print(f"heartbeat: {e}", file=sys.stderr, flush=True)


class Beacon:
    """The worker's side: starts the heartbeat process once and tells it which locks to hold."""

    def __init__(self, redis_url: str, interval: float, ttl: float, stall: float):
        self.args = [sys.executable, "-m", "services.jobs.heartbeat", redis_url, str(interval), str(ttl), str(stall)]
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()

    def _spawn(self) -> None:
        cwd = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self.proc = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=cwd)
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        if not ready or self.proc.stdout.readline().strip() != "ready":
            self.proc.kill()
            raise RuntimeError("the job heartbeat process did not start (is Redis reachable?)")

    def _send(self, msg: dict) -> None:
        with self.lock:
            for attempt in (0, 1):
                if self.proc is None or self.proc.poll() is not None:
                    self._spawn()
                try:
                    self.proc.stdin.write(json.dumps(msg) + "\n")
                    self.proc.stdin.flush()
                    return
                except (BrokenPipeError, OSError):
                    self.proc = None
                    if attempt:
                        raise

    def hold(self, lock_key: str, token: str, job_key: str, field: str, alive: str) -> None:
        self._send({"op": "hold", "lock": lock_key, "token": token, "job": job_key, "field": field, "alive": alive})

    def drop(self, lock_key: str) -> None:
        self._send({"op": "drop", "lock": lock_key})

    def start(self) -> "Beacon":
        """Start the process now (at worker start), not under the first job's short-lived lock."""
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self._spawn()
        return self

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(5)


if __name__ == "__main__":
    serve(sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]))
