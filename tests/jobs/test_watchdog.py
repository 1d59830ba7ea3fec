"""Workers lost at the points the kill -9 tests do not reach: one that hangs while its process
stays alive (SIGSTOP: as a deadlock or a stuck kernel looks from outside) loses its job to the
watchdog, one that dies between receiving a job and starting it is noticed by its claim; old
finished records are pruned by the workers, nothing else."""
import json
import shutil
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest

from services.jobs.records import FAILED, QUEUED, SUCCEEDED, JobRecords
from services.pb import jobs_pb2
from tests.jobs.conftest import wait_for
from tests.jobs.test_finetune_job import finetune_request

S = jobs_pb2.JobState
# Longer than the silent compile of the tiny model's first training step on a loaded 2-core machine,
# so only the hang trips it; KEEP_S short so that old records can be made by hand.
STALL_S, KEEP_S = 30.0, 60.0


@pytest.fixture
def jobs_settings(jobs_settings):
    return replace(jobs_settings, stall_s=STALL_S, keep_finished_s=KEEP_S)


def test_a_hung_worker_loses_its_job_to_another(jobs_api, jobs_settings, workers, trainer_store, alpaca_dataset):
    stub, _ = jobs_api
    records = JobRecords(jobs_settings.redis_url)
    shutil.copytree(alpaca_dataset, Path(jobs_settings.store_root) / "datasets" / "alpaca")
    hung = workers("finetune")
    job = stub.SubmitJob(finetune_request(max_steps=60, save_every=5))
    wait_for(lambda: stub.GetJob(jobs_pb2.GetJobRequest(id=job.id)).progress.step >= 6, timeout=300,
             what="training reached step 6")
    rescuer = workers("finetune")  # idle: the job is on the first worker
    hung.proc.send_signal(signal.SIGSTOP)
    stopped_at = time.time()
    try:
        wait_for(lambda: records.get(job.id)["executions"] == "2", timeout=STALL_S + 120, every=0.2,
                 what="the job re-queued and taken by the other worker")
    finally:
        hung.proc.send_signal(signal.SIGCONT)  # woken while the other worker runs the job
    rec = records.get(job.id)
    assert rec["worker"] == rescuer.name
    assert "no progress for 30 s (worker hung); re-queued" in rescuer.log.read_text()
    execs = records.executions(job.id)
    silent = execs[1]["start"] - float(rec["exec:1:alive"])
    assert STALL_S <= silent < STALL_S + 20, silent  # the watchdog's time (not the lock TTL's, 3 s)
    assert execs[1]["start"] - stopped_at < STALL_S + 20
    # The woken execution finds its lock gone within its step and stops without touching the job.
    wait_for(lambda: "lock lost" in hung.log.read_text(), timeout=60, what="the woken worker saw its lock gone")
    final = wait_for(lambda: (r := stub.GetJob(jobs_pb2.GetJobRequest(id=job.id))).state in
                     (S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED) and r, timeout=600, every=0.5,
                     what="the job finished on the other worker")
    assert final.state == S.JOB_STATE_SUCCEEDED and final.executions == 2, final.error
    assert "failed" not in hung.log.read_text().split("lock lost")[-1]
    out = Path(jobs_settings.store_root) / "models" / "tuned"
    history = [json.loads(line) for line in (out / "scalars.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == list(range(1, 61))
    assert hung.proc.poll() is None  # and it goes on serving


def test_workers_prune_old_finished_records(jobs_settings, workers):
    records = JobRecords(jobs_settings.redis_url)
    now = time.time()
    made = {}
    for name, state, age in [("old-done", SUCCEEDED, 2 * KEEP_S), ("old-failed", FAILED, 2 * KEEP_S),
                             ("new-done", SUCCEEDED, KEEP_S / 2), ("old-queued", QUEUED, 2 * KEEP_S)]:
        rec, _ = records.create("convert", {"name": name}, "models/x", idempotency_key=name)
        fields = {"state": state, "created": now - age - 5}
        if state != QUEUED:
            fields["finished"] = now - age
        records.update(rec["id"], **fields)
        records.r.zadd(records.index, {rec["id"]: now - age - 5})
        made[name] = rec["id"]
    workers("convert")
    wait_for(lambda: records.get(made["old-done"]) is None, timeout=60, what="old records pruned")
    assert records.get(made["old-failed"]) is None
    assert records.get(made["new-done"])["state"] == SUCCEEDED
    assert records.get(made["old-queued"])["state"] == QUEUED  # never ended: never pruned
    assert {r["id"] for r in records.list()} == {made["new-done"], made["old-queued"]}
    # The pruned jobs' idempotency keys went with them: the same key makes a new job.
    rec, created = records.create("convert", {"name": "old-done"}, "models/x", idempotency_key="old-done")
    assert created and rec["id"] != made["old-done"]


# A consumer that receives a job's message and claims it exactly as a worker's task_received hook
# does, then waits: killed with -9, it is a worker that died between receiving a job and starting it.
RECEIVER = """
import sys, time
from kombu import Consumer
from services.jobs.app import make_app
from services.jobs.records import JobRecords
from services.jobs.settings import JobsSettings
s = JobsSettings.from_env()
app = make_app(s)
got = []
with app.connection_for_read() as conn:
    with Consumer(conn, queues=[app.amqp.queues["convert"]], callbacks=[lambda body, m: got.append(m)],
                  accept=["json"], no_ack=False):
        print("listening", flush=True)
        while not got:
            try:
                conn.drain_events(timeout=1)
            except TimeoutError:
                pass
    JobRecords(s.redis_url, s.prefix).claim(got[0].delivery_tag, got[0].headers["id"], s.lock_ttl_s)
    print("claimed", got[0].headers["id"], flush=True)
    time.sleep(600)
"""


def test_a_worker_dead_before_starting_its_job_is_noticed(jobs_api, jobs_settings, workers, hf_source):
    import os
    import subprocess
    import sys

    from tests.helpers import REPO
    from tests.jobs.conftest import LOCK_TTL_S
    from tests.jobs.test_convert_job import convert_request

    stub, _ = jobs_api
    records = JobRecords(jobs_settings.redis_url)
    env = {**os.environ, **jobs_settings.env(), "PYTHONUNBUFFERED": "1"}
    receiver = subprocess.Popen([sys.executable, "-c", RECEIVER], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout.readline().strip() == "listening"
        job = stub.SubmitJob(convert_request(hf_source, "tiny"))
        assert receiver.stdout.readline().split() == ["claimed", job.id]
    finally:
        receiver.kill()
        receiver.wait()
    killed = time.time()
    assert records.get(job.id)["state"] == QUEUED and records.expired_claims() == {}  # claim alive for now
    w = workers("convert")
    final = wait_for(lambda: (r := records.get(job.id))["state"] in (SUCCEEDED, FAILED) and r, timeout=120,
                     every=0.2, what="the job run by the live worker")
    assert final["state"] == SUCCEEDED and final["executions"] == "1", final.get("error")
    assert "its worker died before starting it; its message was restored" in w.log.read_text()
    started = records.executions(job.id)[0]["start"]
    assert started - killed < LOCK_TTL_S + 15, started - killed  # the claim's TTL, not the visibility timeout
    assert records.r.hgetall(records.claims) == {}
