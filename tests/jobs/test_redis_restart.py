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


def test_queued_jobs_survive_a_redis_crash(jobs_api, jobs_settings, workers, hf_source, redis_server):
    """kill -9 of Redis (appendfsync everysec, as shipped) right after the last submit was answered:
    a crash of the process, not the machine, loses nothing Redis acknowledged, so every record and
    every queued message comes back from the append-only file, and each job runs once."""
    import redis

    stub, _ = jobs_api
    root = Path(jobs_settings.store_root)
    ids = [stub.SubmitJob(convert(hf_source, f"m{i}")).id for i in range(3)]  # no worker yet: they wait
    redis_server.crash()  # at once: no second for everysec's fsync
    for job_id in ids:
        assert stub.GetJob(jobs_pb2.GetJobRequest(id=job_id)).state == S.JOB_STATE_QUEUED
    assert redis.Redis.from_url(jobs_settings.redis_url).llen("convert") == 3  # the messages, not just the records
    workers("convert")
    for job_id in ids:
        last = watch_until_done(stub, job_id)[-1]
        assert last.state == S.JOB_STATE_SUCCEEDED and last.executions == 1, last
    assert sorted(p.name for p in (root / "models").iterdir()) == ["m0", "m1", "m2"]
    assert list((root / "jobs").iterdir()) == []


def test_a_running_job_survives_a_redis_crash(jobs_api, jobs_settings, workers, trainer_store, alpaca_dataset,
                                              redis_server):
    """kill -9 of Redis (appendfsync everysec, as shipped) while a fine-tune runs: the worker's
    progress writes and heartbeat retry until it is back, and the job ends SUCCEEDED with every
    step trained once (whether it kept its lock or was re-queued and resumed)."""
    import json
    import shutil

    from tests.jobs.conftest import wait_for
    from tests.jobs.test_finetune_job import finetune_request

    stub, _ = jobs_api
    shutil.copytree(alpaca_dataset, Path(jobs_settings.store_root) / "datasets" / "alpaca")
    workers("finetune")
    job = stub.SubmitJob(finetune_request(max_steps=40, save_every=5))
    wait_for(lambda: stub.GetJob(jobs_pb2.GetJobRequest(id=job.id)).progress.step >= 4, timeout=300,
             what="training reached step 4")
    redis_server.crash()
    last = watch_until_done(stub, job.id, timeout=600)[-1]
    assert last.state == S.JOB_STATE_SUCCEEDED, last.error
    history = (Path(jobs_settings.store_root) / "models" / "tuned" / "scalars.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in history] == list(range(1, 41))
    print(f"redis crash mid-job: {last.executions} execution(s)")
