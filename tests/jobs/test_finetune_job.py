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
STEPS, SAVE_EVERY, KILL_AT = 40, 5, 12


def finetune_request(**kw):
    args = dict(base_model="base", dataset="alpaca", output="tuned", method="lora", max_steps=STEPS,
                save_every=SAVE_EVERY, batch_size=1, learning_rate=1e-3, seed=0)
    args.update(kw)
    return jobs_pb2.SubmitJobRequest(finetune=jobs_pb2.FinetuneJob(**args))


def test_preprocess_then_finetune_survives_kill9(jobs_api, jobs_settings, workers, trainer_store):
    stub, _ = jobs_api
    records = JobRecords(jobs_settings.redis_url)
    started = {w.name: w for w in (workers("preprocess,finetune"), workers("preprocess,finetune"))}

    pre = stub.SubmitJob(jobs_pb2.SubmitJobRequest(preprocess=jobs_pb2.PreprocessJob(
        source="imports/alpaca.json", output="alpaca", format="alpaca", seq_length=32)))
    done = watch_until_done(stub, pre.id, timeout=120)[-1]
    assert done.state == S.JOB_STATE_SUCCEEDED, done.error
    stats = json.loads(done.result_json)
    assert stats["rows"] > 0 and stats["inputs"] == 48 and done.output == "datasets/alpaca"

    job = stub.SubmitJob(finetune_request())
    seen = []  # (execution, step, message) from the watch stream
    stream_done = threading.Event()

    def follow():
        for m in stub.WatchJob(jobs_pb2.WatchJobRequest(id=job.id), timeout=900):
            seen.append((m.executions, m.progress.step, m.message))
        stream_done.set()
    threading.Thread(target=follow, daemon=True).start()

    wait_for(lambda: any(s >= 3 for _, s, _ in seen), timeout=300, what="training reached step 3")
    runner = started[records.get(job.id)["worker"]]
    other = next(w for w in started.values() if w is not runner)
    # a duplicate of the job's message while it runs (as Redis sends after its visibility timeout):
    # the idle worker receives it and must skip it
    send(make_app(jobs_settings), "finetune", job.id)
    wait_for(lambda: "duplicate delivery skipped" in other.log.read_text(), timeout=60,
             what=f"{other.name} skipped the duplicate")
    assert records.get(job.id)["executions"] == "1"

    wait_for(lambda: any(s >= KILL_AT for _, s, _ in seen), timeout=300, every=0.02, what=f"step {KILL_AT}")
    runner.kill9()
    killed_at = time.time()
    last_step_before = max(s for _, s, _ in seen)
    assert last_step_before < STEPS, "training finished before the kill; make it longer"

    assert stream_done.wait(600)
    final = seen[-1]
    rec = stub.GetJob(jobs_pb2.GetJobRequest(id=job.id))
    assert rec.state == S.JOB_STATE_SUCCEEDED, rec.error
    assert rec.executions == 2 and rec.worker == other.name

    # never two at once: the second execution started after the first one's last heartbeat
    execs = records.executions(job.id)
    assert len(execs) == 2 and execs[1]["start"] > execs[0]["beat"] and execs[1]["start"] > killed_at - 1
    assert execs[0]["worker"] == runner.name and execs[1]["worker"] == other.name
    assert "its message was restored to the queue" in other.log.read_text()  # the very message A held
    print(f"recovery: kill -9 -> resumed in {execs[1]['start'] - killed_at:.1f}s")

    # resumed from the last checkpoint the killed worker wrote (every SAVE_EVERY steps), not from the start
    resumed = json.loads(rec.result_json)["resumed_from_step"]
    assert resumed % SAVE_EVERY == 0 and (last_step_before // SAVE_EVERY) * SAVE_EVERY <= resumed, resumed
    new_steps = [s for e, s, msg in seen if e == 2 and msg.startswith("step ")]  # the resumed run's reports
    assert new_steps and resumed < new_steps[0] <= resumed + 3 and min(new_steps) > resumed
    assert final[1] == STEPS

    out = Path(jobs_settings.store_root) / "models" / "tuned"
    history = [json.loads(line) for line in (out / "scalars.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == list(range(1, STEPS + 1))  # each step exactly once
    assert history[-1]["loss"] < history[0]["loss"]
    assert (out / "loss.png").is_file()
    # the Jobs API's curve: every step once, across the kill, with the loss the trainer wrote
    # (a step replayed after the resume has the resumed run's value, as scalars.jsonl has)
    assert [(p.step, round(p.loss, 5)) for p in rec.loss_curve] == [(h["step"], round(h["loss"], 5)) for h in history]
    assert json.loads(rec.result_json)["steps"] == STEPS
    assert list((Path(jobs_settings.store_root) / "jobs").iterdir()) == []


def test_sigterm_puts_the_running_job_back_to_resume(jobs_api, jobs_settings, workers, trainer_store,
                                                      alpaca_dataset):
    """A worker asked to stop (SIGTERM: a deploy, a scale-down) checkpoints, puts its job back in the
    queue and exits; the next worker resumes it. The job's LoRA holds its base in int8 (the job's
    ``quantize``): its checkpoint records that precision, and the resume, which must match it, goes on."""
    import shutil

    stub, _ = jobs_api
    shutil.copytree(alpaca_dataset, Path(jobs_settings.store_root) / "datasets" / "alpaca")
    a = workers("finetune")
    # only the stop checkpoints (save_every past the run)
    job = stub.SubmitJob(finetune_request(max_steps=100000, save_every=1000, quantize="int8"))
    wait_for(lambda: stub.GetJob(jobs_pb2.GetJobRequest(id=job.id)).progress.step >= 4, timeout=300,
             what="training reached step 4")
    a.proc.terminate()
    assert a.proc.wait(60) == 0  # a warm shutdown, not a crash
    stopped = stub.GetJob(jobs_pb2.GetJobRequest(id=job.id))
    assert stopped.state == S.JOB_STATE_QUEUED and "re-queued" in stopped.message
    at = stopped.progress.step
    [saved] = list((Path(jobs_settings.store_root) / "jobs").rglob("trainer.json"))
    assert json.loads(saved.read_text())["base"] == "int8"
    workers("finetune")
    wait_for(lambda: stub.GetJob(jobs_pb2.GetJobRequest(id=job.id)).message.startswith("resuming from"),
             timeout=300, what="the new worker resumed the job")
    resumed_msg = stub.GetJob(jobs_pb2.GetJobRequest(id=job.id)).message
    resumed = int(resumed_msg.rsplit(" ", 1)[1])
    assert resumed >= at >= 4, resumed_msg
    new_steps = []
    for m in stub.WatchJob(jobs_pb2.WatchJobRequest(id=job.id), timeout=300):
        if m.executions == 2 and m.message.startswith("step "):
            new_steps.append(m.progress.step)
            if len(new_steps) == 1:
                stub.CancelJob(jobs_pb2.CancelJobRequest(id=job.id))  # seen enough: it resumed
    final = stub.GetJob(jobs_pb2.GetJobRequest(id=job.id))
    assert final.state == S.JOB_STATE_CANCELLED and final.executions == 2, final.error
    assert new_steps and resumed < new_steps[0] <= resumed + 3, (resumed, new_steps)
