"""A job whose worker is lost every time it runs it (the kernel's OOM killer, kill -9) ends FAILED
with the reason after ``max_deliveries`` executions, instead of going round the workers forever;
its job folder is removed and the next job in the queue runs."""
import json
from pathlib import Path

from services.jobs.records import JobRecords
from services.pb import jobs_pb2
from tests.helpers import DATA
from tests.jobs.conftest import wait_for, watch_until_done

S = jobs_pb2.JobState


def test_a_job_that_keeps_losing_its_worker_ends_failed(jobs_api, jobs_settings, workers):
    stub, _ = jobs_api
    records = JobRecords(jobs_settings.redis_url)
    root = Path(jobs_settings.store_root)
    (root / "imports").mkdir()
    alpaca = json.loads((DATA / "alpaca" / "alpaca_en.json").read_text())
    (root / "imports" / "alpaca.json").write_text(json.dumps(alpaca * 4))  # seconds of work: caught running

    def submit(output):
        return stub.SubmitJob(jobs_pb2.SubmitJobRequest(preprocess=jobs_pb2.PreprocessJob(
            source="imports/alpaca.json", output=output, format="alpaca", seq_length=64)))

    n = jobs_settings.max_deliveries
    assert n == 3  # the default
    job = submit("doomed")
    for execution in range(1, n + 1):  # one worker at a time, each killed -9 while it runs the job
        worker = workers("preprocess")
        wait_for(lambda: (lambda r: r["state"] == "RUNNING" and r["executions"] == str(execution)
                          and r.get("worker") == worker.name)(records.get(job.id)),
                 timeout=120, what=f"execution {execution} running")
        worker.kill9()
        assert records.get(job.id)["state"] == "RUNNING"  # killed mid-run
    following = submit("next")  # queued behind the lost job, with no worker alive

    survivor = workers("preprocess")
    final = watch_until_done(stub, job.id, timeout=120)[-1]
    assert final.state == S.JOB_STATE_FAILED and final.executions == n, final
    assert final.error == (f"its worker was lost {n} times (killed, e.g. out of memory, or hung; last: worker "
                           f"lost); not re-queued again (at most {n} deliveries)"), final.error
    wait_for(lambda: not (root / "jobs" / job.id).exists(), timeout=10, what="its job folder removed")
    assert not (root / "datasets" / "doomed").exists()

    done = watch_until_done(stub, following.id, timeout=300)[-1]
    assert done.state == S.JOB_STATE_SUCCEEDED and done.worker == survivor.name, done
    assert (root / "datasets" / "next").is_dir()
    # its message, given back to the queue, is taken off it and skipped
    wait_for(lambda: f"job {job.id}: already FAILED; duplicate delivery skipped" in survivor.log.read_text(),
             timeout=30, what="the lost job's message skipped")
    assert records.get(job.id)["state"] == "FAILED"


def test_the_recovery_script_counts_losses_only(redis_server):
    """The script alone, on a real Redis: a lost execution is re-queued with its reason (the
    watchdog's, for a hung one) until the limit; a worker's own put-back (SIGTERM) is no loss; a
    limit of 0 never gives up."""
    from services.jobs.records import GAVE_UP, REQUEUED

    records = JobRecords(redis_server.url)

    def running(job_id):
        records.start_execution(job_id, "w")  # RUNNING, and no lock: its worker is gone

    rec, _ = records.create("convert", {"n": 1}, "models/x")
    job = rec["id"]
    running(job)
    records.r.hset(records.key(job), "stalled", "no progress for 30 s (worker hung)")
    assert records.requeue_if_dead(job, 2) == REQUEUED
    assert records.get(job)["message"] == "no progress for 30 s (worker hung); re-queued"
    running(job)
    records.put_back(job, "worker stopped; re-queued to resume")  # SIGTERM: not a loss
    running(job)
    assert records.acquire(job, "alive", 10) and records.requeue_if_dead(job, 2) == 0  # its lock is held
    records.release(job, "alive")
    assert records.requeue_if_dead(job, 2) == GAVE_UP
    got = records.get(job)
    assert got["state"] == "FAILED" and float(got["finished"]) > 0 and job not in records.running_ids()
    assert got["error"] == ("its worker was lost 2 times (killed, e.g. out of memory, or hung; last: worker lost); "
                            "not re-queued again (at most 2 deliveries)")
    assert records.requeue_if_dead(job, 2) == 0  # ended: nothing more to do

    rec, _ = records.create("convert", {"n": 2}, "models/y")
    for _ in range(5):
        running(rec["id"])
        assert records.requeue_if_dead(rec["id"], 0) == REQUEUED  # 0: no limit
    assert records.get(rec["id"])["message"] == "worker lost; re-queued"
