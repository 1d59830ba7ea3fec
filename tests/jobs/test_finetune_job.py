"""Fine-tuning as a job: a worker killed with -9 mid-run is replaced and the job resumes from its last
checkpoint; a duplicate delivery while it runs is skipped; executions never overlap."""
import json
import threading
import time
from pathlib import Path

from services.jobs.app import make_app, send
from services.jobs.records import JobRecords
from services.pb import jobs_pb2
from tests.jobs.conftest import wait_for, watch_until_done

S = jobs_pb2.JobState
STEPS, SAVE_EVERY, KILL_AT = 60, 5, 12


def finetune_request(**kw):
    args = dict(base_model="base", dataset="alpaca", output="tuned", method="lora", max_steps=STEPS,
                save_every=SAVE_EVERY, batch_size=1, learning_rate=1e-3, seed=0)
    args.update(kw)
    return jobs_pb2.SubmitJobRequest(finetune=jobs_pb2.FinetuneJob(**args))


def test_preprocess_then_finetune_survives_kill9(jobs_api, jobs_settings, workers, trainer_store):
    stub, _ = jobs_api
    records = JobRecords(jobs_settings.redis_url)
    a = workers("preprocess,finetune")

    pre = stub.SubmitJob(jobs_pb2.SubmitJobRequest(preprocess=jobs_pb2.PreprocessJob(
        source="imports/alpaca.json", output="alpaca", format="alpaca", seq_length=32)))
    done = watch_until_done(stub, pre.id, timeout=120)[-1]
    assert done.state == S.JOB_STATE_SUCCEEDED, done.error
    stats = json.loads(done.result_json)
    assert stats["rows"] > 0 and stats["inputs"] == 48 and done.output == "datasets/alpaca"

    job = stub.SubmitJob(finetune_request())
    seen = []  # (execution, step) from the watch stream
    stream_done = threading.Event()

    def follow():
        for m in stub.WatchJob(jobs_pb2.WatchJobRequest(id=job.id), timeout=300):
            seen.append((m.executions, m.progress.step, m.state))
        stream_done.set()
    threading.Thread(target=follow, daemon=True).start()

    wait_for(lambda: any(s >= 3 for _, s, _ in seen), timeout=120)
    # a second worker, and a duplicate of the message while the job runs: it must be skipped
    b = workers("preprocess,finetune")
    send(make_app(jobs_settings), "finetune", job.id)
    wait_for(lambda: "duplicate delivery skipped" in b.log.read_text(), timeout=30)
    assert records.get(job.id)["executions"] == "1"

    wait_for(lambda: any(s >= KILL_AT for _, s, _ in seen), timeout=120, every=0.02)
    a.kill9()
    killed_at = time.time()
    last_step_before = max(s for _, s, _ in seen)
    assert last_step_before < STEPS, "training finished before the kill; make it longer"

    assert stream_done.wait(240)
    final = seen[-1]
    rec = stub.GetJob(jobs_pb2.GetJobRequest(id=job.id))
    assert rec.state == S.JOB_STATE_SUCCEEDED, rec.error
    assert rec.executions == 2 and rec.worker == b.name

    # never two at once: the second execution started after the first one's last heartbeat
    execs = records.executions(job.id)
    assert len(execs) == 2 and execs[1]["start"] > execs[0]["beat"] and execs[1]["start"] > killed_at - 1
    assert execs[0]["worker"] == a.name and execs[1]["worker"] == b.name
    assert "its message was restored to the queue" in b.log.read_text()  # the very message A held
    print(f"recovery: kill -9 -> resumed in {execs[1]['start'] - killed_at:.1f}s")

    # resumed from the last checkpoint, not from the start
    resumed = [s for e, s, _ in seen if e == 2 and s > 0]
    checkpoint = (last_step_before // SAVE_EVERY) * SAVE_EVERY
    assert resumed and min(resumed) > checkpoint >= 10, (min(resumed), checkpoint)
    assert final[1] == STEPS

    out = Path(jobs_settings.store_root) / "models" / "tuned"
    history = [json.loads(line) for line in (out / "scalars.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == list(range(1, STEPS + 1))  # each step exactly once
    assert history[-1]["loss"] < history[0]["loss"]
    assert (out / "loss.png").is_file()
    assert json.loads(rec.result_json)["steps"] == STEPS
    assert list((Path(jobs_settings.store_root) / "jobs").iterdir()) == []
