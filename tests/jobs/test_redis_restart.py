"""Redis runs with an append-only file: jobs queued before a restart are all there after it and run;
the API and an idle worker reconnect by themselves."""
from pathlib import Path

from services.pb import jobs_pb2
from tests.jobs.conftest import watch_until_done

S = jobs_pb2.JobState


def convert(hf_source, output):
    return jobs_pb2.SubmitJobRequest(convert=jobs_pb2.ConvertJob(source=hf_source, output=output))


def test_queued_jobs_survive_a_redis_restart(jobs_api, jobs_settings, workers, hf_source, redis_server):
    stub, _ = jobs_api
    root = Path(jobs_settings.store_root)
    ids = [stub.SubmitJob(convert(hf_source, f"m{i}")).id for i in range(3)]  # no worker yet: they wait
    redis_server.restart()
    for job_id in ids:  # the API's client reconnects; the records were persisted
        assert stub.GetJob(jobs_pb2.GetJobRequest(id=job_id)).state == S.JOB_STATE_QUEUED
    workers("convert")
    for job_id in ids:  # ... and so were the queued messages
        assert watch_until_done(stub, job_id)[-1].state == S.JOB_STATE_SUCCEEDED
    assert sorted(p.name for p in (root / "models").iterdir()) == ["m0", "m1", "m2"]

    # an idle worker rides out a restart too
    redis_server.restart()
    job = stub.SubmitJob(convert(hf_source, "after"))
    last = watch_until_done(stub, job.id, timeout=90)[-1]
    assert last.state == S.JOB_STATE_SUCCEEDED and last.executions == 1
