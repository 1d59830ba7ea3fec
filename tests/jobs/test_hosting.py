"""The Jobs API as the servers host it: on the services' common Server (error interceptor, health,
reflection), registered by ``add_to_server(server, settings)`` with the endpoint's settings; and as
the public endpoint hosts it, ``AioJobsServicer`` on the ``grpc.aio`` ``AioServer``: the same
statuses, the same single log of a bug."""
import asyncio
import threading
from concurrent import futures
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.jobs.api import SERVICE_NAME, AioJobsServicer, Jobs, add_to_server
from services.pb import jobs_pb2, jobs_pb2_grpc


@pytest.fixture(params=["Server", "AioServer"])
def host(request):
    """host(settings) -> (started server, its ``Jobs``, stop()): stop returns when every call is done
    (any later log record is counted too); called at the end if the test did not."""
    from services.server_common import AioServer, Server

    started = []

    def start(settings):
        if request.param == "Server":
            server = Server("endpoint-test", 0)
            jobs = add_to_server(server.grpc, settings).jobs
            stop = lambda: server.grpc.stop(None).wait()  # noqa: E731
        else:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, daemon=True).start()
            server, jobs = AioServer("endpoint-test", 0, loop), Jobs(settings)
            jobs_pb2_grpc.add_JobsServicer_to_server(AioJobsServicer(jobs, futures.ThreadPoolExecutor(4)), server.grpc)
            stop = lambda: server.run(server.grpc.stop(None))  # noqa: E731
        started.append(stop)
        server.start([SERVICE_NAME])
        return server, jobs, stop

    yield start
    for stop in started:
        stop()  # a second stop is a no-op


def test_hosted_on_the_common_server(jobs_settings, host):
    # the endpoint passes its own settings object: redis_url, and store_root (None = from the environment)
    server, _, _ = host(SimpleNamespace(redis_url=jobs_settings.redis_url, store_root=jobs_settings.store_root))
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = jobs_pb2_grpc.JobsStub(ch)
        with pytest.raises(grpc.RpcError) as e:  # the servicer's own status passes the interceptor
            stub.SubmitJob(jobs_pb2.SubmitJobRequest(convert=jobs_pb2.ConvertJob(source="/etc", output="x")))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "outside" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            list(stub.WatchJob(jobs_pb2.WatchJobRequest(id="nope"), timeout=5))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        answer = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        assert SERVICE_NAME in [s.name for s in answer.list_services_response.service]


def test_an_internal_error_is_logged_exactly_once(jobs_settings, host, caplog, monkeypatch):
    """A bug (an exception nothing maps) is answered INTERNAL naming it, and logged once, with the
    traceback of where it was raised: not again by the Jobs API's own mapping, nor by grpc; for a
    unary call and for a stream that fails after its first message."""
    import dataclasses
    import logging

    from services.jobs import kinds

    def broken_check(req, store):
        raise KeyError("boom in a check")

    server, jobs, stop = host(jobs_settings)
    job, _ = jobs.records.create("convert", {"source": "imports/x", "output": "x"}, "models/x")
    real_get, calls = jobs.records.get, []

    def get_then_break(job_id):  # WatchJob's first read works, its next one meets the bug
        calls.append(job_id)
        if len(calls) > 1:
            raise RuntimeError("boom in a stream")
        return real_get(job_id)

    async def get_async_then_break(job_id):  # the same, as the grpc.aio host's watcher reads it
        return get_then_break(job_id)

    monkeypatch.setitem(kinds.KINDS, "convert", dataclasses.replace(kinds.KINDS["convert"], check=broken_check))
    monkeypatch.setattr(jobs.records, "get", get_then_break)
    monkeypatch.setattr(jobs.records, "get_async", get_async_then_break)
    caplog.set_level(logging.DEBUG)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = jobs_pb2_grpc.JobsStub(ch)
            with pytest.raises(grpc.RpcError) as e:
                stub.SubmitJob(jobs_pb2.SubmitJobRequest(convert=jobs_pb2.ConvertJob(source="imports/x", output="y")))
            assert e.value.code() == grpc.StatusCode.INTERNAL
            assert e.value.details() == "internal error: KeyError: 'boom in a check'"
            seen = []
            with pytest.raises(grpc.RpcError) as e:
                for m in stub.WatchJob(jobs_pb2.WatchJobRequest(id=job["id"]), timeout=30):
                    seen.append(m.state)
            assert seen == [jobs_pb2.JOB_STATE_QUEUED]
            assert e.value.code() == grpc.StatusCode.INTERNAL
            assert e.value.details() == "internal error: RuntimeError: boom in a stream"
    finally:
        stop()  # every call done: any later log record is counted too

    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [(r.name, r.getMessage()) for r in errors] == [
        ("internlm.server", "/internlm.v1.Jobs/SubmitJob failed"),
        ("internlm.server", "/internlm.v1.Jobs/WatchJob failed")], [r.getMessage() for r in errors]
    for record, (kind, frame) in zip(errors, [(KeyError, "broken_check"), (RuntimeError, "get_then_break")]):
        assert record.exc_info and record.exc_info[0] is kind
        assert f"in {frame}\n" in logging.Formatter().formatException(record.exc_info)


def test_watch_streams_each_change_until_the_job_ends(jobs_settings, host):
    """WatchJob: the job now, then each change as it is recorded, and the end with its final state
    (after a watcher that left half way: it does not disturb the next)."""
    from services.jobs.records import RUNNING, SUCCEEDED

    server, jobs, _ = host(jobs_settings)
    job, _ = jobs.records.create("convert", {"source": "imports/x", "output": "x"}, "models/x")
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = jobs_pb2_grpc.JobsStub(ch)
        left = stub.WatchJob(jobs_pb2.WatchJobRequest(id=job["id"]), timeout=30)
        assert next(left).state == jobs_pb2.JOB_STATE_QUEUED
        left.cancel()
        watch = stub.WatchJob(jobs_pb2.WatchJobRequest(id=job["id"]), timeout=30)
        assert next(watch).state == jobs_pb2.JOB_STATE_QUEUED
        jobs.records.update(job["id"], state=RUNNING, step=1, total_steps=2)
        running = next(watch)
        assert (running.state, running.progress.step) == (jobs_pb2.JOB_STATE_RUNNING, 1)
        jobs.records.update(job["id"], step=2)
        assert next(watch).progress.step == 2
        jobs.records.update(job["id"], state=SUCCEEDED)
        assert [m.state for m in watch] == [jobs_pb2.JOB_STATE_SUCCEEDED]


def test_watchers_that_leave_at_once_are_all_let_go(jobs_settings, host):
    """Sixteen watchers that leave right after the job's first message (while the server side
    opens its Redis connections) each end on the server: no subscription to the job is left. (A
    cancel landing while redis-py 8's asyncio client connects can be lost, and a watcher waiting on
    it directly would stay subscribed until its job ends.)"""
    import time

    server, jobs, _ = host(jobs_settings)
    job, _ = jobs.records.create("convert", {"source": "imports/x", "output": "x"}, "models/x")
    channel = jobs.records.channel(job["id"])
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = jobs_pb2_grpc.JobsStub(ch)
        watches = [stub.WatchJob(jobs_pb2.WatchJobRequest(id=job["id"]), timeout=60) for _ in range(16)]
        assert [next(w).state for w in watches] == [jobs_pb2.JOB_STATE_QUEUED] * 16
        for w in watches:
            w.cancel()
        time.sleep(1)  # a server side still subscribing as its watcher left ends at its next look after
        deadline = time.monotonic() + 10
        while subscribed := jobs.records.r.pubsub_numsub(channel)[0][1]:
            assert time.monotonic() < deadline, f"{subscribed} watchers still subscribed"
            time.sleep(0.1)


def test_a_watch_rides_out_a_redis_restart(jobs_settings, redis_server, host):
    """A watcher open while Redis restarts (its pub/sub connection cut) still gets each change
    recorded after it is back, and the end."""
    from services.jobs.records import RUNNING, SUCCEEDED

    server, jobs, _ = host(jobs_settings)
    job, _ = jobs.records.create("convert", {"source": "imports/x", "output": "x"}, "models/x")
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        watch = jobs_pb2_grpc.JobsStub(ch).WatchJob(jobs_pb2.WatchJobRequest(id=job["id"]), timeout=60)
        assert next(watch).state == jobs_pb2.JOB_STATE_QUEUED
        redis_server.restart()
        jobs.records.update(job["id"], state=RUNNING, step=1)
        running = next(watch)
        assert (running.state, running.progress.step) == (jobs_pb2.JOB_STATE_RUNNING, 1)
        jobs.records.update(job["id"], state=SUCCEEDED)
        assert [m.state for m in watch] == [jobs_pb2.JOB_STATE_SUCCEEDED]


def test_watchers_on_the_endpoint_hold_no_thread(jobs_settings, tmp_path):
    """Forty WatchJob streams open at once on the endpoint (its ``AioJobsServicer``) add no thread to
    its process (a watcher waiting on a thread of the Jobs pool, as before, would add forty), and each
    still gets its job's every change, to the end."""
    import os

    from services.jobs.records import RUNNING, SUCCEEDED, JobRecords
    from tests.services.conftest import start_endpoint

    def threads():
        return len(os.listdir(f"/proc/{endpoint.proc.pid}/task"))

    def watch(stub, job_id):
        return stub.WatchJob(jobs_pb2.WatchJobRequest(id=job_id), timeout=60)

    records = JobRecords(jobs_settings.redis_url)
    ids = [records.create("convert", {"source": f"imports/x{n}", "output": f"x{n}"}, f"models/x{n}")[0]["id"]
           for n in range(41)]
    endpoint = start_endpoint(jobs_settings.redis_url, "127.0.0.1:1", tmp_path, "endpoint-watchers").wait_healthy()
    try:
        with grpc.insecure_channel(endpoint.address) as ch:
            stub = jobs_pb2_grpc.JobsStub(ch)
            warm = watch(stub, ids.pop())  # what the first watcher starts once (the Redis client's connections)
            assert next(warm).state == jobs_pb2.JOB_STATE_QUEUED
            before = threads()
            streams = [watch(stub, i) for i in ids]
            assert [next(s).state for s in streams] == [jobs_pb2.JOB_STATE_QUEUED] * len(ids)  # all open now
            during = threads()
            for i in ids:
                records.update(i, state=RUNNING, step=1, total_steps=2)
            assert [(m.state, m.progress.step) for m in map(next, streams)] == [(jobs_pb2.JOB_STATE_RUNNING, 1)] * len(ids)
            for i in ids:
                records.update(i, state=SUCCEEDED, step=2)
            assert [[(m.state, m.progress.step) for m in s] for s in streams] == \
                [[(jobs_pb2.JOB_STATE_SUCCEEDED, 2)]] * len(ids)
            warm.cancel()
        assert during - before < 5, (before, during)
    finally:
        endpoint.stop()
