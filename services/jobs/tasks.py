"""Celery tasks: transport only (job id in, progress and state out); the work is ``kinds.KINDS[kind].run``.

Every delivery of a job's message goes through :func:`Runtime.run`, which makes running it more
than once safe:

- a job already ended is acknowledged and skipped (a late duplicate delivery);
- a job whose lock is held is skipped: another execution is running it (never two at once);
- otherwise this execution takes the lock, a heartbeat renews it, and the job runs; it
  resumes from what earlier executions left in its job folder (fine-tune checkpoints, a finished
  conversion waiting to be published).

The lock is renewed by a small helper process (``heartbeat.py``), which a busy MindSpore cannot
starve of the GIL. A worker killed with -9 leaves its job RUNNING with a lock that expires
``lock_ttl_s`` later; a worker that hangs (alive, but its job's thread silent for ``stall_s``)
has its lock let go by that same process; a worker that dies after receiving a job but before
starting it leaves a claim that expires as fast. Every worker sweeps for such jobs every
``heartbeat_s`` and puts the dead execution's unacknowledged message back at the head of its
queue (:func:`recover_lost_jobs`), long before Redis' visibility timeout would. A job whose
worker is lost ``max_deliveries`` times (one that gets every worker it runs on OOM-killed) ends
FAILED with the reason instead, and its job folder is removed.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import traceback
import uuid

from celery import signals
from celery.exceptions import Ignore, Reject

from internlm_core import errors
from internlm_core.errors import Cancelled, PathError
from internlm_core.store import OUTPUT, Store

from .app import send, task_name
from .kinds import KINDS
from .heartbeat import Beacon
from .records import (CANCELLED, FAILED, FINAL, GAVE_UP, QUEUED, REQUEUED, SUCCEEDED, JobRecords,
                      alive_field)

log = logging.getLogger("internlm.jobs")
PROGRESS_EVERY_S = 0.25   # progress writes to Redis at most this often (the core calls back per tensor/step)
CANCEL_CHECK_EVERY_S = 0.1
ALIVE_EVERY_S = 1.0       # the job thread's sign of life (the watchdog's input) at most this often
PRUNE_EVERY_S = 600.0     # each worker deletes records older than keep_finished_s this often


class JobFailed(Exception):
    """Raised after a job is recorded FAILED, so Celery's own result says FAILURE too."""


class LockLost(Cancelled):
    """This execution no longer holds the job's lock (presumed dead or hung; the job is another
    execution's now). Raised out of the core's ``cancel()`` callback, so the core stops at once,
    without the checkpoint or clean-up that a cancel gets: nothing more may touch the job's folder."""


class JobContext:
    """What a running job sees: its folders, progress reporting and the cancel check."""

    def __init__(self, runtime: "Runtime", job_id: str, execution: int, token: str):
        self.runtime, self.store, self.records = runtime, runtime.store, runtime.records
        self.job_id, self.execution, self.token = job_id, execution, token
        self.job_dir = self.store.job_dir(job_id)
        self.staging = self.job_dir / OUTPUT
        self.work_dir = self.job_dir / "work"
        self.lock_lost = threading.Event()
        self.alive = alive_field(execution)
        self._last_alive = time.monotonic()
        self._pending: dict = {}
        self._last_write = 0.0
        self._last_check = 0.0
        self._cancel = False
        self._t0 = time.monotonic()
        self._f0: float | None = None

    # ---- progress ------------------------------------------------------------------------------
    def progress(self, force: bool = False, **fields) -> None:
        self._pending.update({k: v for k, v in fields.items() if v is not None})
        now = time.monotonic()
        if not force and now - self._last_write < PROGRESS_EVERY_S:
            return
        p = self._pending
        frac = _fraction(p)
        if frac is not None:
            if self._f0 is None:
                self._f0, self._t0 = frac, now
            rate = (frac - self._f0) / max(now - self._t0, 1e-6)
            p["fraction"] = frac
            p["eta"] = (1.0 - frac) / rate if rate > 0 else -1.0
        self.records.update(self.job_id, **p, **{self.alive: time.time()})
        self._last_write = self._last_alive = now

    def final_progress(self) -> dict:
        """The last (maybe throttled away) progress report, complete."""
        return {**{k: v for k, v in self._pending.items() if k != "message"}, "fraction": 1.0, "eta": 0.0}

    def count_progress(self, done: int, total: int, message: str = "") -> None:
        self.progress(step=done, total_steps=total, message=message)

    def train_progress(self, report: dict) -> None:
        """The trainer's report: step, total, loss, lr, tokens_per_s, eta_s (and eval_loss)."""
        msg = f"step {report.get('step')}/{report.get('total')}, loss {report.get('loss', float('nan')):.4f}"
        if "eval_loss" in report:
            msg += f", eval loss {report['eval_loss']:.4f}"
        if report.get("loss") is not None and report.get("step"):  # every step, not throttled: the curve
            self.records.record_loss(self.job_id, report["step"], report["loss"])
        self.progress(step=report.get("step", 0), total_steps=report.get("total", 0), loss=report.get("loss"),
                      learning_rate=report.get("lr"), tokens_per_second=report.get("tokens_per_s", 0.0),
                      message=msg)

    # ---- cancel ----------------------------------------------------------------------------------
    def cancelled(self) -> bool:
        """The core's ``cancel=`` callback: a cancel request or this worker stopping (True), or a
        lost lock (raises LockLost)."""
        if self.lock_lost.is_set():
            raise LockLost("this execution lost the job's lock")
        if self.runtime.stopping.is_set():
            return True
        now = time.monotonic()
        if not self._cancel and now - self._last_check >= CANCEL_CHECK_EVERY_S:
            self._last_check = now
            stamp = now - self._last_alive >= ALIVE_EVERY_S
            self._cancel, holds = self.records.check(self.job_id, self.token, self.alive if stamp else None)
            if stamp:
                self._last_alive = now
            if not holds:
                log.error("job %s: lock lost (presumed dead or hung, and re-queued); stopping this execution",
                          self.job_id)
                self.lock_lost.set()
                raise LockLost("this execution lost the job's lock")
        return self._cancel

    def still_ours(self) -> bool:
        """Whether this execution still holds the job's lock (asked now, before touching shared state)."""
        if not self.lock_lost.is_set() and not self.records.check(self.job_id, self.token)[1]:
            self.lock_lost.set()
        return not self.lock_lost.is_set()

    # ---- output --------------------------------------------------------------------------------
    def clear_partial(self) -> None:
        """Remove a killed execution's half-written temporaries: the hidden siblings that
        ``atomic_folder`` writes before its rename. Finished folders and checkpoints stay."""
        import shutil

        for p in self.job_dir.iterdir():
            if p.name.startswith(".") or p.name == "replaced":
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def publish(self, area: str, name: str, overwrite: bool = False) -> None:
        """Rename the staged output into the store. Marked first, so a re-run after a kill between
        the rename and the record update knows the output in the store is its own."""
        dst = self.store.item_path(area, name, must_exist=False)
        if not self.staging.is_dir() and self.records.get(self.job_id).get("publishing") == "1" and dst.exists():
            return  # published by an earlier execution that died just after
        if self.cancelled():
            raise Cancelled("cancelled before publishing")
        self.records.update(self.job_id, publishing="1", notify=False)
        self.store.publish(self.job_id, area, name, overwrite)


def _fraction(p: dict) -> float | None:
    if p.get("bytes_total"):
        return min(1.0, p.get("bytes_done", 0) / p["bytes_total"])
    if p.get("total_steps"):
        return min(1.0, p.get("step", 0) / p["total_steps"])
    return None


class Runtime:
    """Per worker process: settings, the store, the job records, and the stop flag."""

    def __init__(self, app):
        self.app = app
        self.settings = app.jobs_settings
        self.store = Store(self.settings.store_root, self.settings.read_roots)
        self.records = JobRecords(self.settings.redis_url, self.settings.prefix)
        self.beacon = Beacon(self.settings.redis_url, self.settings.heartbeat_s, self.settings.lock_ttl_s,
                             self.settings.stall_s)
        self.stopping = threading.Event()
        self.delivery_tags: dict[str, str] = {}  # job id -> tag of the message being run

    def run(self, task, kind: str, job_id: str):
        tag = self.delivery_tags.pop(job_id, "")
        try:
            token, n, rec = self._start(task, job_id, tag)
        finally:  # started (the lock covers it now) or skipped: the claim has done its part
            if tag:
                self.records.unclaim(tag)
        lock = self.records.lock_key(job_id)
        self.beacon.hold(lock, token, self.records.key(job_id), f"exec:{n}:beat", alive_field(n))
        try:
            return self._run(kind, job_id, rec, JobContext(self, job_id, n, token))
        finally:
            self.beacon.drop(lock)
            self.records.end_execution(job_id, n, token)

    def _start(self, task, job_id: str, tag: str) -> tuple[str, int, dict]:
        """Take the job's lock and mark it RUNNING: (lock token, execution number, record); raises
        Ignore for a delivery that must not run (no record, already ended, running elsewhere)."""
        try:
            rec = self.records.get(job_id)
        except PathError:  # not an id this service made: no job's message
            rec = None
        if rec is None:
            log.warning("job %s: no record; dropping the message", job_id)
            raise Ignore()
        if rec["state"] in FINAL:
            log.info("job %s: already %s; duplicate delivery skipped", job_id, rec["state"])
            raise Ignore()
        token = uuid.uuid4().hex
        if not self.records.acquire(job_id, token, self.settings.lock_ttl_s):
            log.warning("job %s: another execution holds its lock; duplicate delivery skipped", job_id)
            raise Ignore()
        rec = self.records.get(job_id)  # re-read under the lock
        if rec["state"] in FINAL:
            self.records.release(job_id, token)
            raise Ignore()
        return token, self.records.start_execution(job_id, task.request.hostname or "worker", tag), rec

    def _run(self, kind: str, job_id: str, rec: dict, ctx: JobContext):
        request = json.loads(rec["request"])
        try:
            if rec.get("cancel") == "1":
                raise Cancelled("cancel requested before start")
            result = KINDS[kind].run(request, ctx)
        except Cancelled:
            if ctx.lock_lost.is_set():
                raise Ignore()  # another execution owns the job now; leave everything to it
            if self.stopping.is_set() and not self.records.cancel_requested(job_id):
                self.records.put_back(job_id, "worker stopped; re-queued to resume")
                raise Reject("worker shutting down", requeue=True)
            self.store.discard(job_id)
            self.records.finish(job_id, ctx.token, CANCELLED, message="cancelled")
            return {"state": CANCELLED}
        except (Ignore, Reject):
            raise
        except Exception as e:  # noqa: BLE001 - any failure ends the job FAILED with a reason
            if not ctx.still_ours():
                raise Ignore()  # not ours to end (or clean up) any more
            reason = f"{type(e).__name__}: {e}"
            # The core's own errors (the input's fault) and OSErrors (the machine's: a full disk)
            # are reasons as they are; anything else is a bug, logged with its traceback.
            if errors.status_of(e) == errors.INTERNAL and not isinstance(e, OSError):
                log.error("job %s failed unexpectedly:\n%s", job_id, traceback.format_exc())
                reason = f"internal error: {reason}"
            self.store.discard(job_id)
            self.records.finish(job_id, ctx.token, FAILED, error=reason, message="failed")
            raise JobFailed(reason) from None
        if not ctx.still_ours():
            raise Ignore()
        self.store.discard(job_id)  # checkpoints and temporaries: the result is published
        self.records.finish(job_id, ctx.token, SUCCEEDED, message="done", result=json.dumps(result),
                            **ctx.final_progress())
        return result


def register(app) -> Runtime:
    """Define the four tasks on ``app`` (one per kind and queue) and return the worker runtime."""
    runtime = Runtime(app)
    for kind in KINDS:
        def body(self, job_id: str, _kind=kind):
            return runtime.run(self, _kind, job_id)
        body.__name__ = kind
        app.task(name=task_name(kind), bind=True, throws=(JobFailed,))(body)
    app.jobs_runtime = runtime
    return runtime


# ---- recovery of jobs whose worker died ---------------------------------------------------------

def recover_lost_jobs(app, records: JobRecords, store: Store | None = None) -> list[str]:
    """Re-deliver every RUNNING job whose lock expired (its worker is gone or hung), or end it
    FAILED when its worker was lost ``max_deliveries`` times; re-deliver every received job whose
    worker died before starting it. Returns their ids."""
    done = []
    for job_id in records.running_ids():
        outcome = records.requeue_if_dead(job_id, app.jobs_settings.max_deliveries)
        if outcome == REQUEUED:
            rec = records.get(job_id)
            how = redeliver(app, rec)
            log.warning("job %s: %s; %s", job_id, rec.get("message", "worker lost"), how)
            done.append(job_id)
        elif outcome == GAVE_UP:
            rec = records.get(job_id)
            if store is not None:  # what its executions left (checkpoints, temporaries): no one resumes it now
                store.discard(job_id)
            # its unacknowledged message goes back too, so that a worker takes it off the queue
            # (skipped: the job has ended) rather than Redis giving it back a visibility timeout later
            if rec.get("delivery_tag"):
                restore(app, rec["delivery_tag"])
            log.error("job %s: FAILED: %s", job_id, rec.get("error"))
            done.append(job_id)
    for tag, job_id in records.expired_claims().items():
        if not records.unclaim(tag):
            continue  # another worker's sweep took it
        rec = records.get(job_id)
        if rec is None or rec["state"] != QUEUED:
            continue  # it started after all (then its lock covers it) or ended
        if restore(app, tag):
            log.warning("job %s: its worker died before starting it; its message was restored to the queue",
                        job_id)
            done.append(job_id)
    return done


def restore(app, tag: str) -> bool:
    """Put an unacknowledged message back at the head of its queue (kombu's own restore, what it
    does after the visibility timeout, for this one message); False if it is not unacknowledged."""
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        if not channel.client.hexists(channel.unacked_key, tag):
            return False
        channel.qos.restore_by_tag(tag, leftmost=False)
        return True


def redeliver(app, rec: dict) -> str:
    """Put the dead execution's unacknowledged message back at the head of its queue, or send it anew."""
    tag = rec.get("delivery_tag")
    if tag and restore(app, tag):
        return "its message was restored to the queue"
    send(app, rec["kind"], rec["id"])
    return "a new message was queued"


def install_worker_hooks(app, runtime: Runtime) -> None:
    """In a worker process: record delivery tags, sweep for lost jobs, stop jobs on shutdown."""
    names = {task_name(k) for k in KINDS}

    @signals.task_received.connect(weak=False)
    def _received(request=None, **_):
        # kept here, and written to the record only by the execution that takes the lock: the tag of
        # the message that must go back to the queue if this worker dies (solo pool: same process)
        if request is not None and request.name in names:
            runtime.delivery_tags[request.id] = request.message.delivery_tag
            runtime.records.claim(request.message.delivery_tag, request.id, runtime.settings.lock_ttl_s)

    @signals.worker_ready.connect(weak=False)
    def _ready(**_):
        def sweep():
            keep, pruned = runtime.settings.keep_finished_s, 0.0
            while True:
                try:
                    recover_lost_jobs(app, runtime.records, runtime.store)
                    if keep > 0 and time.monotonic() - pruned >= PRUNE_EVERY_S:
                        if gone := runtime.records.prune(keep):
                            log.info("deleted %d job record(s) finished more than %.0f s ago", gone, keep)
                        pruned = time.monotonic()
                except Exception as e:  # noqa: BLE001 - Redis away for a moment: try again next round
                    log.warning("recovery sweep failed: %s", e)
                if runtime.stopping.wait(runtime.settings.heartbeat_s):
                    return
        threading.Thread(target=sweep, name="job-recovery", daemon=True).start()

    @signals.worker_shutting_down.connect(weak=False)
    def _stopping(**_):
        runtime.stopping.set()  # running jobs stop at their next step and go back to the queue
