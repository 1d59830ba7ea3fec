"""Convert, export and preprocess jobs, each killed with -9 mid-run and cancelled mid-run.

kill -9 of the worker running a job: another worker picks it up once the dead one's lock expires,
and it ends SUCCEEDED with its output complete (equal to an uninterrupted run) and nothing
half-written in the store. CancelJob on a running job: CANCELLED, its job folder deleted, the store
exactly as it was. (Fine-tune has both in test_finetune_job.py and test_cancel.py.)

The inputs are sized so that each job runs for a few seconds, long enough to be caught mid-run:
a conversion of a 256-layer model (~3,300 tensors, each written, fsynced and journaled), the
export of a 24-layer model (two graphs to compile), the preprocessing of 8,000 Alpaca records.
"""
import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from services.jobs.records import JobRecords
from services.pb import jobs_pb2
from tests.jobs.conftest import wait_for, watch_until_done
from tests.jobs.test_cancel import snapshot

S = jobs_pb2.JobState
DEEP_LAYERS, EXPORT_LAYERS, ALPACA_COPIES = 256, 24, 8


def start_two(workers, queues: str) -> dict:
    """Two workers on the same queues, started side by side: one to kill, one to take over."""
    started = [workers(queues, wait=False), workers(queues, wait=False)]
    return {w.wait_ready().name: w for w in started}


def kill_the_runner(records, started: dict, job_id: str, mid_run, what: str):
    """Once ``mid_run()`` holds, kill -9 the worker running the job; (killed, other)."""
    wait_for(lambda: records.get(job_id)["state"] == "RUNNING", timeout=120, what="the job started")
    runner = started[records.get(job_id)["worker"]]
    wait_for(mid_run, timeout=120, every=0.002, what=what)
    runner.kill9()
    return runner, next(w for w in started.values() if w is not runner)


def finished_by_the_other(stub, records, job_id: str, runner, other):
    final = watch_until_done(stub, job_id, timeout=300)[-1]
    assert final.state == S.JOB_STATE_SUCCEEDED, final.error
    assert final.executions == 2 and final.worker == other.name
    assert [e["worker"] for e in records.executions(job_id)] == [runner.name, other.name]
    return final


def cancel_mid_run(stub, root: Path, job_id: str, mid_run, what: str):
    """Cancel a running job once ``mid_run()`` holds: CANCELLED and its folder gone (the callers
    compare the store with its snapshot from before the submit, and check where it stopped)."""
    wait_for(mid_run, timeout=120, every=0.002, what=what)
    asked = stub.CancelJob(jobs_pb2.CancelJobRequest(id=job_id))
    assert asked.cancel_requested and asked.state == S.JOB_STATE_RUNNING
    final = watch_until_done(stub, job_id, timeout=120)[-1]
    assert final.state == S.JOB_STATE_CANCELLED, final
    assert not (root / "jobs" / job_id).exists()
    return final


def step(stub, job_id: str) -> int:
    return stub.GetJob(jobs_pb2.GetJobRequest(id=job_id)).progress.step


# ---- convert -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def deep_hf(tmp_path_factory):
    """(HF folder, its straight conversion) of a tiny-width, 256-layer model."""
    from internlm_core.config import Config
    from internlm_core.convert import hf_to_ms
    from tests.helpers import hf_reference_model, save_hf_folder

    cfg = Config.from_name("tiny", num_layers=DEEP_LAYERS)
    base = tmp_path_factory.mktemp("deep")
    src = save_hf_folder(hf_reference_model(cfg), cfg, base / "deep-hf")
    hf_to_ms(src, base / "reference")
    return src, base / "reference"


def test_convert_killed_resumes_and_cancel_leaves_nothing(jobs_api, jobs_settings, workers, deep_hf):
    from internlm_core.config import Config

    stub, _ = jobs_api
    records = JobRecords(jobs_settings.redis_url)
    root = Path(jobs_settings.store_root)
    src, reference = deep_hf
    shutil.copytree(src, root / "imports" / "deep-hf")
    tensors = len(Config.from_name("tiny", num_layers=DEEP_LAYERS).param_shapes())
    started = start_two(workers, "convert")

    def journaled(job_id) -> int:  # the conversion's journal: a line per tensor written and fsynced
        journal = root / "jobs" / job_id / "work" / "model.safetensors.journal"
        return len(journal.read_text().splitlines()) if journal.is_file() else 0

    job = stub.SubmitJob(jobs_pb2.SubmitJobRequest(convert=jobs_pb2.ConvertJob(source="imports/deep-hf",
                                                                               output="deep")))
    messages = []  # (execution, message) as a watcher sees them, across both executions
    follower = threading.Thread(target=lambda: messages.extend(
        (m.executions, m.message) for m in stub.WatchJob(jobs_pb2.WatchJobRequest(id=job.id), timeout=300)))
    follower.start()
    runner, other = kill_the_runner(records, started, job.id, lambda: journaled(job.id) >= 1,
                                    "the first tensor journaled")
    kept = journaled(job.id)
    assert 0 < kept < tensors, (kept, tensors)  # killed mid-conversion
    print(f"convert killed after {kept} of {tensors} tensors")
    assert not (root / "models" / "deep").exists() and records.get(job.id)["state"] == "RUNNING"

    finished_by_the_other(stub, records, job.id, runner, other)
    follower.join(60)
    # the second execution went on after the tensors the first one had journaled
    assert (2, f"kept {kept} of {tensors} tensors written and verified earlier") in messages, messages
    out = root / "models" / "deep"
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    assert json.loads((out / "config.json").read_text()) == json.loads((reference / "config.json").read_text())
    assert sorted(os.listdir(root / "models")) == ["deep"] and os.listdir(root / "jobs") == []

    before = snapshot(root)
    job = stub.SubmitJob(jobs_pb2.SubmitJobRequest(convert=jobs_pb2.ConvertJob(source="imports/deep-hf",
                                                                               output="deep2")))
    final = cancel_mid_run(stub, root, job.id, lambda: journaled(job.id) >= 1, "the first tensor journaled")
    assert final.progress.fraction < 0.5  # it stopped at a tensor soon after, not at the end
    assert snapshot(root) == before


# ---- export --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def deep_model(tmp_path_factory):
    from internlm_core.config import Config
    from internlm_core.loader import save_model
    from internlm_core.model import InternLMForCausalLM, init_weights

    cfg = Config.from_name("tiny", num_layers=EXPORT_LAYERS)
    model = InternLMForCausalLM(cfg)
    init_weights(model, seed=0, std=0.02)
    return save_model(model, cfg, tmp_path_factory.mktemp("deep-ms") / "deep")


def test_export_killed_runs_again_and_cancel_leaves_nothing(jobs_api, jobs_settings, workers, deep_model):
    from internlm_core.exported import ExportedEngine

    stub, _ = jobs_api
    records = JobRecords(jobs_settings.redis_url)
    root = Path(jobs_settings.store_root)
    shutil.copytree(deep_model, root / "models" / "deep")
    started = start_two(workers, "export")

    def export(output):
        return stub.SubmitJob(jobs_pb2.SubmitJobRequest(export=jobs_pb2.ExportJob(model="deep", output=output,
                                                                                  max_batch=2, max_len=32)))
    job = export("deep-mindir")
    runner, other = kill_the_runner(records, started, job.id, lambda: step(stub, job.id) >= 1,
                                    "the model loaded (export step 1 of 4)")
    assert step(stub, job.id) < 4 and records.get(job.id)["state"] == "RUNNING"  # killed mid-export:
    assert [p.name for p in (root / "jobs" / job.id).iterdir() if p.name.startswith(".output.tmp-")]  # half-written
    assert not (root / "models" / "deep-mindir").exists()

    finished_by_the_other(stub, records, job.id, runner, other)
    out = root / "models" / "deep-mindir"
    manifest = json.loads((out / "mindir_manifest.json").read_text())
    for graph in manifest["graphs"].values():
        assert (out / graph["file"]).stat().st_size == graph["bytes"]
    ExportedEngine(out)  # loads: graphs, config, tokenizer and weight shapes checked against the manifest
    assert sorted(os.listdir(root / "models")) == ["deep", "deep-mindir"] and os.listdir(root / "jobs") == []

    before = snapshot(root)
    job = export("deep-mindir2")
    final = cancel_mid_run(stub, root, job.id, lambda: step(stub, job.id) >= 1, "export step 1 of 4")
    # asked while the prefill graph was being exported (step 2 of 4): stopped right after it
    assert final.progress.step == 2
    assert snapshot(root) == before


# ---- preprocess ----------------------------------------------------------------------------------

def test_preprocess_killed_runs_again_and_cancel_leaves_nothing(jobs_api, jobs_settings, workers, tmp_path):
    from internlm_core.data import load_rows, preprocess
    from tests.helpers import DATA

    stub, _ = jobs_api
    records = JobRecords(jobs_settings.redis_url)
    root = Path(jobs_settings.store_root)
    alpaca = json.loads((DATA / "alpaca" / "alpaca_en.json").read_text()) * ALPACA_COPIES
    (root / "imports").mkdir()
    (root / "imports" / "alpaca.json").write_text(json.dumps(alpaca))
    started = start_two(workers, "preprocess")

    def submit(output):
        return stub.SubmitJob(jobs_pb2.SubmitJobRequest(preprocess=jobs_pb2.PreprocessJob(
            source="imports/alpaca.json", output=output, format="alpaca", seq_length=64)))
    job = submit("alpaca")
    runner, other = kill_the_runner(records, started, job.id, lambda: step(stub, job.id) >= 500,
                                    "500 records preprocessed")
    assert step(stub, job.id) < len(alpaca) and records.get(job.id)["state"] == "RUNNING"
    assert not (root / "datasets" / "alpaca").exists()

    final = finished_by_the_other(stub, records, job.id, runner, other)
    stats = json.loads(final.result_json)
    reference = preprocess("alpaca", root / "imports" / "alpaca.json", tmp_path / "reference", seq_length=64)
    assert stats == reference and stats["inputs"] == len(alpaca)
    for got, want in zip(load_rows(root / "datasets" / "alpaca"), load_rows(tmp_path / "reference")):
        np.testing.assert_array_equal(got, want)
    assert sorted(os.listdir(root / "datasets")) == ["alpaca"] and os.listdir(root / "jobs") == []

    before = snapshot(root)
    job = submit("alpaca2")
    final = cancel_mid_run(stub, root, job.id, lambda: step(stub, job.id) >= 500, "500 records preprocessed")
    assert final.progress.step < len(alpaca) / 2  # stopped at a record soon after, not at the end
    assert snapshot(root) == before
