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

    monkeypatch.setitem(kinds.KINDS, "convert", dataclasses.replace(kinds.KINDS["convert"], check=broken_check))
    monkeypatch.setattr(jobs.records, "get", get_then_break)
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
