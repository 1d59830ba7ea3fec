"""Cancel: a running job stops at its next step and leaves nothing behind; a queued one never runs.
A training job that fails ends FAILED with the trainer's reason, and the worker serves the next job."""
import shutil
import time
from pathlib import Path

from services.pb import jobs_pb2
from tests.jobs.conftest import wait_for, watch_until_done

S = jobs_pb2.JobState


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for area in ("models", "datasets") for p in sorted((root / area).rglob("*"))}


def test_failed_training_then_cancel_a_running_one(jobs_api, jobs_settings, workers, trainer_store, alpaca_dataset):
    stub, _ = jobs_api
    root = Path(jobs_settings.store_root)
    shutil.copytree(alpaca_dataset, root / "datasets" / "alpaca")
    workers("preprocess,finetune")

    # from random weights of the "tiny" preset: its 512-token vocabulary cannot take this dataset
    bad = stub.SubmitJob(jobs_pb2.SubmitJobRequest(finetune=jobs_pb2.FinetuneJob(
        preset="tiny", dataset="alpaca", output="scratch", max_steps=5)))
    last = watch_until_done(stub, bad.id, timeout=180)[-1]
    assert last.state == S.JOB_STATE_FAILED and "outside the model's vocabulary" in last.error, last.error
    assert not (root / "models" / "scratch").exists() and not (root / "jobs" / bad.id).exists()

    before = snapshot(root)
    job = stub.SubmitJob(jobs_pb2.SubmitJobRequest(finetune=jobs_pb2.FinetuneJob(
        base_model="base", dataset="alpaca", output="tuned", method="lora", max_steps=100000, save_every=2)))
    wait_for(lambda: stub.GetJob(jobs_pb2.GetJobRequest(id=job.id)).progress.step >= 3, timeout=300,
             what="training reached step 3")
    assert (root / "jobs" / job.id / "work" / "checkpoints").is_dir()  # it was writing into its own place
    t0 = time.time()
    asked = stub.CancelJob(jobs_pb2.CancelJobRequest(id=job.id))
    assert asked.cancel_requested and asked.state == S.JOB_STATE_RUNNING
    final = watch_until_done(stub, job.id, timeout=60)[-1]
    took = time.time() - t0
    assert final.state == S.JOB_STATE_CANCELLED and final.progress.step < 100000
    assert took < 15, f"cancel took {took:.1f}s"  # a step or two, on a loaded 2-core machine
    print(f"cancel -> CANCELLED in {took:.2f}s")
    assert not (root / "jobs" / job.id).exists()  # checkpoints and temporaries gone
    assert snapshot(root) == before  # the store is exactly as it was
    # cancelling again is harmless
    assert stub.CancelJob(jobs_pb2.CancelJobRequest(id=job.id)).state == S.JOB_STATE_CANCELLED


def test_cancel_queued_job_never_runs(jobs_api, jobs_settings, workers, hf_source):
    stub, _ = jobs_api
    root = Path(jobs_settings.store_root)
    job = stub.SubmitJob(jobs_pb2.SubmitJobRequest(convert=jobs_pb2.ConvertJob(source=hf_source, output="never")))
    cancelled = stub.CancelJob(jobs_pb2.CancelJobRequest(id=job.id))
    assert cancelled.state == S.JOB_STATE_CANCELLED and cancelled.finished_at > 0
    w = workers("convert")  # its message is still queued: the worker receives it and skips it
    wait_for(lambda: "already CANCELLED; duplicate delivery skipped" in w.log.read_text(), timeout=30)
    got = stub.GetJob(jobs_pb2.GetJobRequest(id=job.id))
    assert got.state == S.JOB_STATE_CANCELLED and got.executions == 0
    assert not (root / "models" / "never").exists()
