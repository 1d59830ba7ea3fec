"""The Jobs gRPC service: check a request, record it, queue it; read records back; stream progress.

``Jobs`` is the API itself, called in process (the endpoint's gateway does, for the web console).
Its gRPC door is ``JobsServicer`` on a thread-pool server (``add_to_server(server, settings)``), or
``AioJobsServicer`` on a ``grpc.aio`` one (the public endpoint's), each on a server with the error
interceptor (``server_common``): the methods raise, and the interceptor answers each exception with
its status (the services' one table, ``server_common.status_of``). Requests are checked
here, before anything is queued (``kinds.KINDS[kind].check``); everything after that is the workers' part.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time

import grpc
import redis
from google.protobuf import json_format

from internlm_core.errors import TooLarge, Unavailable, WrongState
from internlm_core.store import Store

from services.pb import jobs_pb2, jobs_pb2_grpc

from .kinds import KINDS, enum_name, kind_of_enum
from .app import make_app, send
from .records import FAILED, FINAL, STATE_PREFIX, STATES, JobRecords, KeyReused, canonical, state_enum_name
from .settings import LIMITS, JobsSettings

log = logging.getLogger("internlm.jobs.api")
SERVICE_NAME = jobs_pb2.DESCRIPTOR.services_by_name["Jobs"].full_name
WATCH_POLL_S = 0.5  # a watcher re-reads the record at least this often, even if a ping was missed


def job_to_pb(rec: dict) -> jobs_pb2.Job:
    f = lambda k, d=0.0: float(rec.get(k) or d)  # noqa: E731
    progress = jobs_pb2.JobProgress(
        step=int(f("step")), total_steps=int(f("total_steps")), bytes_done=int(f("bytes_done")),
        bytes_total=int(f("bytes_total")), tokens_per_second=f("tokens_per_second"), eta_seconds=f("eta", -1.0),
        fraction=f("fraction"))
    if rec.get("loss") not in (None, "", "None"):
        progress.loss = float(rec["loss"])
    if rec.get("learning_rate") not in (None, "", "None"):
        progress.learning_rate = float(rec["learning_rate"])
    kind = rec.get("kind", "")
    request = jobs_pb2.SubmitJobRequest(idempotency_key=rec.get("key", ""))
    if kind and rec.get("request"):
        json_format.ParseDict(json.loads(rec["request"]), getattr(request, kind))
    return jobs_pb2.Job(
        id=rec["id"], kind=jobs_pb2.JobKind.Value(enum_name(kind)),
        state=jobs_pb2.JobState.Value(state_enum_name(rec["state"])), progress=progress,
        message=rec.get("message", ""), error=rec.get("error", ""), output=rec.get("output", ""),
        idempotency_key=rec.get("key", ""), created_at=f("created"), started_at=f("started"),
        finished_at=f("finished"), executions=int(f("executions")), cancel_requested=rec.get("cancel") == "1",
        worker=rec.get("worker", ""), result_json=rec.get("result", ""), request=request)


def request_body(message) -> dict:
    """A job request as the JSON-able dict that its record keeps; NaN and infinities (which JSON
    cannot hold as numbers, and no job parameter means) are refused naming the field."""
    for field, value in message.ListFields():
        if field.type in (field.TYPE_FLOAT, field.TYPE_DOUBLE) and not math.isfinite(value):
            raise ValueError(f"{field.name} must be a finite number, got {value}")
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


class Jobs:
    """The Jobs API's behaviour, called in process: by the gRPC door (``JobsServicer``) and by the
    endpoint's gateway for the web console. Each method takes the request message and returns the
    response message, raising the core's errors (their status from the one table)."""

    def __init__(self, settings=None):
        self.settings = JobsSettings.coerce(settings)
        self.store = Store(self.settings.store_root, self.settings.read_roots)
        self.records = JobRecords(self.settings.redis_url, self.settings.prefix)
        self.app = make_app(self.settings)

    def _get(self, job_id: str) -> dict:
        """The job's record; PathError (INVALID_ARGUMENT) for an id that is not a job id."""
        return _found(job_id, self.records.get(job_id) if job_id else None)

    async def _get_async(self, job_id: str) -> dict:
        """``_get`` on the event loop."""
        return _found(job_id, await self.records.get_async(job_id) if job_id else None)

    def SubmitJob(self, request):
        kind = request.WhichOneof("job")
        if kind is None:
            raise ValueError(f"set one of: {', '.join(KINDS)}")
        body = request_body(getattr(request, kind))
        key = request.idempotency_key
        if key:  # a repeat of a known request returns its job before any check (its output may exist now)
            rec = self.records.for_key(key)
            if rec is not None:
                if rec["request"] != canonical(body) or rec["kind"] != kind:
                    raise KeyReused(f"idempotency key {key!r} was already used for a different request "
                                    f"(job {rec['id']})")
                return job_to_pb(rec)
        output = KINDS[kind].check(body, self.store)
        rec, created = self.records.create(kind, body, output, key)
        if created:
            try:
                send(self.app, kind, rec["id"])
            except Exception as e:  # noqa: BLE001 - the broker is unreachable: the job must not sit QUEUED forever
                self.records.update(rec["id"], state=FAILED, error=f"could not be queued: {e}", finished=time.time())
                raise Unavailable(f"job queue unavailable: {e}") from None
            log.info("job %s: %s queued -> %s", rec["id"], kind, output)
        return job_to_pb(rec)

    def GetJob(self, request):
        job = job_to_pb(self._get(request.id))
        job.loss_curve.extend(jobs_pb2.LossPoint(step=s, loss=v) for s, v in self.records.loss_curve(request.id))
        return job

    def ListJobs(self, request):
        state = jobs_pb2.JobState.Name(request.state).removeprefix(STATE_PREFIX) if request.state else None
        kind = kind_of_enum(jobs_pb2.JobKind.Name(request.kind)) if request.kind else None
        if state is not None and state not in STATES:
            raise ValueError(f"unknown state {request.state}")
        if request.limit < 0:
            raise ValueError("limit must not be negative")
        if request.limit > LIMITS["list_jobs"]:
            raise TooLarge(f"limit {request.limit} is above the limit of {LIMITS['list_jobs']}")
        recs = self.records.list(state=state, kind=kind, limit=request.limit or 100)
        return jobs_pb2.ListJobsResponse(jobs=[job_to_pb(r) for r in recs])

    def CancelJob(self, request):
        self._get(request.id)
        state = self.records.request_cancel(request.id)
        if state in (FINAL - {"CANCELLED"}):
            raise WrongState(f"job {request.id} already ended {state}")
        return job_to_pb(self._get(request.id))

    def ListStore(self, request):
        entries = self.store.list(request.area or None)
        return jobs_pb2.ListStoreResponse(entries=[
            jobs_pb2.StoreEntry(area=e.area, name=e.name, kind=e.kind, size_bytes=e.size_bytes,
                                modified_at=e.modified) for e in entries])

    def WatchJob(self, request, active=lambda: True):
        """The job now, then each change until it ends, or until ``active()`` turns False (the
        watcher left). Blocking: a thread waits on the job's pings (``watch_async`` is a task)."""
        watch = JobWatch()
        yield watch.seen(self._get(request.id))
        pubsub = None
        try:
            while not watch.ended and active():
                try:
                    if pubsub is None:
                        pubsub = self.records.subscribe(request.id)
                    pubsub.get_message(timeout=WATCH_POLL_S)  # wakes on a change ping, else polls
                    rec = self._get(request.id)
                except redis.exceptions.ConnectionError:
                    pubsub = None  # Redis restarting: poll until it is back
                    time.sleep(WATCH_POLL_S)
                    continue
                if (job := watch.seen(rec)) is not None:
                    yield job
        finally:
            if pubsub is not None:
                pubsub.close()

    async def watch_async(self, request):
        """``WatchJob`` on the event loop (``redis.asyncio``): a watcher is a task, holding no thread.
        Its Redis side runs in a task of its own that the watcher's cancel does not reach (redis-py
        8's asyncio client can lose a cancel that lands while it opens a connection, and would then
        wait on for good); like the thread version, that side stops at its next look once the
        watcher has left."""
        changes, left = asyncio.Queue(), asyncio.Event()

        async def pump():
            try:
                async for job in self._changes_async(request, lambda: not left.is_set()):
                    # a slow watcher gets the newest state, not every one between (as the thread
                    # version, which reads the record when it looks): the queue never grows past two
                    while not changes.empty():
                        changes.get_nowait()
                    changes.put_nowait(job)
                changes.put_nowait(None)
            except Exception as e:  # noqa: BLE001 - raised to the watcher, below
                changes.put_nowait(e)

        task = asyncio.ensure_future(pump())
        _PUMPS.add(task)  # the loop holds tasks weakly: kept until done, even after the watcher left
        task.add_done_callback(_PUMPS.discard)
        try:
            while (job := await changes.get()) is not None:
                if isinstance(job, Exception):
                    raise job
                yield job
        finally:
            left.set()

    async def _changes_async(self, request, active):
        """``WatchJob``'s loop, waiting on ``redis.asyncio``."""
        watch = JobWatch()
        yield watch.seen(await self._get_async(request.id))
        pubsub = None
        try:
            while not watch.ended and active():
                try:
                    if pubsub is None:
                        pubsub = await self.records.subscribe_async(request.id)
                    await pubsub.get_message(ignore_subscribe_messages=True, timeout=WATCH_POLL_S)
                    rec = await self._get_async(request.id)
                except redis.exceptions.ConnectionError:
                    pubsub = None  # Redis restarting: poll until it is back
                    await asyncio.sleep(WATCH_POLL_S)
                    continue
                if (job := watch.seen(rec)) is not None:
                    yield job
        finally:
            if pubsub is not None:
                await pubsub.aclose()


_PUMPS: set[asyncio.Task] = set()


class JobWatch:
    """What a WatchJob stream sends, however it waits for the job's changes: ``seen(rec)`` takes
    each read of the job's record and gives the message to send for it (the first read's always,
    a later one's only when the job changed), else None; ``ended`` once the job's state is final."""

    def __init__(self):
        self.last, self.ended = None, False

    def seen(self, rec: dict) -> jobs_pb2.Job | None:
        self.ended = rec["state"] in FINAL
        job = job_to_pb(rec)
        if job == self.last:
            return None
        self.last = job
        return job


def _found(job_id: str, rec: dict | None) -> dict:
    if rec is None:
        raise FileNotFoundError(f"no job {job_id!r}")
    return rec


class JobsServicer(jobs_pb2_grpc.JobsServicer):
    """The gRPC door of ``Jobs``: each method one call (errors mapped by the server's interceptor)."""

    def __init__(self, jobs: Jobs):
        self.jobs = jobs

    def SubmitJob(self, request, context):
        return self.jobs.SubmitJob(request)

    def GetJob(self, request, context):
        return self.jobs.GetJob(request)

    def ListJobs(self, request, context):
        return self.jobs.ListJobs(request)

    def CancelJob(self, request, context):
        return self.jobs.CancelJob(request)

    def ListStore(self, request, context):
        return self.jobs.ListStore(request)

    def WatchJob(self, request, context):
        yield from self.jobs.WatchJob(request, context.is_active)


class AioJobsServicer(jobs_pb2_grpc.JobsServicer):
    """``JobsServicer`` on a ``grpc.aio`` server (the endpoint's). ``Jobs`` reads Redis and the store
    with blocking clients, so each unary call runs on a thread of ``pool``; a watcher is a task of
    the server's loop (``Jobs.watch_async``), holding no thread while it waits for the job's changes."""

    def __init__(self, jobs: Jobs, pool):
        self.jobs, self.pool = jobs, pool

    def _call(self, method, *args):
        return asyncio.get_running_loop().run_in_executor(self.pool, method, *args)

    async def SubmitJob(self, request, context):
        return await self._call(self.jobs.SubmitJob, request)

    async def GetJob(self, request, context):
        return await self._call(self.jobs.GetJob, request)

    async def ListJobs(self, request, context):
        return await self._call(self.jobs.ListJobs, request)

    async def CancelJob(self, request, context):
        return await self._call(self.jobs.CancelJob, request)

    async def ListStore(self, request, context):
        return await self._call(self.jobs.ListStore, request)

    async def WatchJob(self, request, context):
        # aclosing: the watcher's Redis side is let go as soon as the stream ends, however it ends
        async with contextlib.aclosing(self.jobs.watch_async(request)) as changes:
            async for job in changes:
                yield job


def add_to_server(server: grpc.Server, settings=None) -> JobsServicer:
    """Register the Jobs service on ``server`` (one with ``server_common.ErrorInterceptor``); ``settings`` is a
    JobsSettings, None (environment), or any object with ``redis_url`` / ``store_root`` attributes.
    The servicer's ``jobs`` is the API to call in process."""
    servicer = JobsServicer(Jobs(settings))
    jobs_pb2_grpc.add_JobsServicer_to_server(servicer, server)
    return servicer


__all__ = ["Jobs", "JobsServicer", "AioJobsServicer", "add_to_server", "job_to_pb", "SERVICE_NAME"]
