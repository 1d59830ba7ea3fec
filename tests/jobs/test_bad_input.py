"""Bad requests are refused at submit with the right status, or end FAILED with a readable reason;
either way nothing reaches the store and the worker goes on serving."""
import json
import os
import shutil
from pathlib import Path

import grpc
import pytest

from services.pb import jobs_pb2
from tests.jobs.conftest import watch_until_done

S = jobs_pb2.JobState
INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND


def convert(source, output="out", **kw):
    return jobs_pb2.SubmitJobRequest(convert=jobs_pb2.ConvertJob(source=source, output=output, **kw))


def refused(stub, request) -> tuple:
    with pytest.raises(grpc.RpcError) as e:
        stub.SubmitJob(request)
    return e.value.code(), e.value.details()


def finetune(**kw):
    args = dict(base_model="base", dataset="d", output="o")
    args.update(kw)
    return jobs_pb2.SubmitJobRequest(finetune=jobs_pb2.FinetuneJob(**args))


def test_refused_at_submit(jobs_api, jobs_settings, hf_source, tmp_path, tiny_model_dir):
    stub, _ = jobs_api
    root = Path(jobs_settings.store_root)
    shutil.copytree(tiny_model_dir, root / "models" / "base")
    (root / "datasets" / "d").mkdir()
    outside = tmp_path / "outside"
    shutil.copytree(root / hf_source, outside)  # a perfectly good folder, but outside the roots
    os.symlink(outside, root / "imports" / "sneaky")
    # folders inside the store that hold a symlink leading out: a file, or a subfolder
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"not the store's")
    shutil.copytree(root / hf_source, root / "imports" / "leaky")
    os.symlink(secret, root / "imports" / "leaky" / "tokenizer.model")
    shutil.copytree(tiny_model_dir, root / "models" / "leaky")
    (root / "models" / "leaky" / "model.safetensors").unlink()
    os.symlink(outside / next(outside.glob("*.safetensors")).name, root / "models" / "leaky" / "model.safetensors")
    (root / "datasets" / "leaky").mkdir()
    os.symlink(outside, root / "datasets" / "leaky" / "part")
    leads_out = "leads outside the store's roots through a symlink"

    cases = {
        "dotdot": (convert("imports/../../outside"), INVALID, "'..'"),
        "absolute outside": (convert(str(outside)), INVALID, "outside the store's roots"),
        "symlink escape": (convert("imports/sneaky"), INVALID, "symlink"),
        "symlink inside the source": (convert("imports/leaky"), INVALID,
                                      f"'imports/leaky/tokenizer.model' {leads_out}"),
        "symlink inside the model": (jobs_pb2.SubmitJobRequest(export=jobs_pb2.ExportJob(model="leaky", output="o")),
                                     INVALID, f"'models/leaky/model.safetensors' {leads_out}"),
        "symlink inside the base model": (finetune(base_model="leaky"), INVALID,
                                          f"'models/leaky/model.safetensors' {leads_out}"),
        "symlinked subfolder in the dataset": (finetune(dataset="leaky"), INVALID,
                                               f"'datasets/leaky/part' {leads_out}"),
        "missing source": (convert("imports/nope"), NOT_FOUND, "not found"),
        "bad output name": (convert(hf_source, "../models/x"), INVALID, "not a valid store name"),
        "bad dtype": (convert(hf_source, dtype="int8"), INVALID, "dtype must be one of"),
        "no job": (jobs_pb2.SubmitJobRequest(), INVALID, "set one of"),
        "missing base model": (finetune(base_model="nope"), NOT_FOUND, "'nope' not found"),
        "missing dataset": (finetune(dataset="nope"), NOT_FOUND, "dataset 'nope' not found"),
        "negative learning rate": (finetune(learning_rate=-1e-4), INVALID, "learning_rate must be positive"),
        "unknown preset": (finetune(base_model="", preset="internlm-3b"), INVALID, "unknown preset 'internlm-3b'"),
        "bad lora rank": (finetune(method="lora", lora_rank=0), INVALID, "lora_rank must be an integer >= 1"),
        "bad method": (finetune(method="qlora"), INVALID, "method must be 'full' or 'lora'"),
        "quantize with full fine-tuning": (finetune(quantize="int8"), INVALID,
                                           "quantize int8 applies to LoRA fine-tuning only"),
        "bad quantize": (finetune(method="lora", quantize="int4"), INVALID, "quantize must be one of"),
        "existing output": (finetune(output="base"), grpc.StatusCode.ALREADY_EXISTS, "models/base already exists"),
        "export missing model": (jobs_pb2.SubmitJobRequest(export=jobs_pb2.ExportJob(model="nope", output="o")),
                                 NOT_FOUND, "not found"),
        "preprocess bad format": (jobs_pb2.SubmitJobRequest(preprocess=jobs_pb2.PreprocessJob(
            source=hf_source + "/config.json", output="d", format="csv")), INVALID, "format must be one of"),
    }
    for name, (request, code, text) in cases.items():
        got_code, details = refused(stub, request)
        assert got_code == code and text in details, (name, got_code, details)

    # a truncated weights file: its header cannot be read, so the request is refused at once
    corrupt = root / "imports" / "corrupt"
    shutil.copytree(root / hf_source, corrupt)
    weights = next(corrupt.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    code, details = refused(stub, convert("imports/corrupt"))
    assert code == INVALID and "truncated" in details

    # nothing was queued, nothing written
    assert len(stub.ListJobs(jobs_pb2.ListJobsRequest()).jobs) == 0
    assert sorted(p.name for p in (root / "models").iterdir()) == ["base", "leaky"]
    with pytest.raises(grpc.RpcError) as e:
        stub.GetJob(jobs_pb2.GetJobRequest(id="no-such-job"))
    assert e.value.code() == NOT_FOUND


def test_failed_job_has_a_reason_and_the_worker_goes_on(jobs_api, jobs_settings, hf_source, workers):
    stub, _ = jobs_api
    root = Path(jobs_settings.store_root)
    workers("convert")
    # headers are fine, but a tensor is missing: found by the converter, before it writes anything
    broken = root / "imports" / "missing-tensor"
    shutil.copytree(root / hf_source, broken)
    from safetensors.numpy import load_file, save_file

    f = next(broken.glob("*.safetensors"))
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, f, metadata={"format": "pt"})

    bad = stub.SubmitJob(convert("imports/missing-tensor", "broken"))
    last = watch_until_done(stub, bad.id)[-1]
    assert last.state == S.JOB_STATE_FAILED
    assert "CheckpointError: missing tensor" in last.error and "layers.1.feed_forward.w3" in last.error, last.error
    assert not (root / "models" / "broken").exists()
    assert list((root / "jobs").iterdir()) == []  # its temporary place is gone

    good = stub.SubmitJob(convert(hf_source, "good"))
    assert watch_until_done(stub, good.id)[-1].state == S.JOB_STATE_SUCCEEDED
    assert (root / "models" / "good" / "model.safetensors").is_file()
    assert json.loads(stub.GetJob(jobs_pb2.GetJobRequest(id=good.id)).result_json)["dtype"] == "float32"


def test_symlink_planted_after_submit_fails_the_job(jobs_api, jobs_settings, hf_source, workers, tmp_path):
    """The worker checks the folder again when it runs the job: a symlink leading out, planted
    after the request was accepted, ends the job FAILED naming it, before anything is read."""
    stub, _ = jobs_api
    root = Path(jobs_settings.store_root)
    job = stub.SubmitJob(convert(hf_source, "planted"))  # accepted: the folder is clean now
    secret = tmp_path / "secret.model"
    secret.write_bytes(b"not the store's")
    os.symlink(secret, root / hf_source / "tokenizer.model")
    workers("convert")
    last = watch_until_done(stub, job.id)[-1]
    assert last.state == S.JOB_STATE_FAILED, last
    assert last.error == (f"PathError: 'imports/tiny-hf/tokenizer.model' leads outside the store's roots through "
                          f"a symlink ({root})"), last.error
    assert list((root / "models").iterdir()) == [] and list((root / "jobs").iterdir()) == []


def test_job_ids_and_idempotency_keys_are_checked(jobs_api, jobs_settings, hf_source):
    """A job id is a Redis key suffix: one that is not a plain id (``<id>:lock``, ``<id>:curve``, a
    trailing newline) is INVALID_ARGUMENT in every RPC that takes one, never a read of another key.
    Idempotency keys are printable and at most LIMITS["idempotency_key"] characters."""
    import redis

    from services.jobs.settings import LIMITS

    stub, _ = jobs_api
    job = stub.SubmitJob(convert(hf_source, "out"))  # no worker: it stays queued
    r = redis.Redis.from_url(jobs_settings.redis_url)
    r.set(f"internlm:job:{job.id}:lock", "someone's token")
    r.hset(f"internlm:job:{job.id}:curve", mapping={"1": "2.5"})
    calls = {"GetJob": lambda i: stub.GetJob(jobs_pb2.GetJobRequest(id=i)),
             "CancelJob": lambda i: stub.CancelJob(jobs_pb2.CancelJobRequest(id=i)),
             "WatchJob": lambda i: list(stub.WatchJob(jobs_pb2.WatchJobRequest(id=i), timeout=10))}
    for rpc, call in calls.items():
        for bad in (f"{job.id}:lock", f"{job.id}:curve", f"{job.id}:events", f"{job.id}\n", "x" * 65, "../x"):
            with pytest.raises(grpc.RpcError) as e:
                call(bad)
            assert e.value.code() == INVALID and "invalid job id" in e.value.details(), (rpc, bad, e.value)
        with pytest.raises(grpc.RpcError) as e:
            call("f" * 32)  # well formed, but no such job
        assert e.value.code() == NOT_FOUND, rpc
    assert r.get(f"internlm:job:{job.id}:lock") == b"someone's token"  # untouched
    assert stub.GetJob(jobs_pb2.GetJobRequest(id=job.id)).state == S.JOB_STATE_QUEUED

    most = LIMITS["idempotency_key"]
    for bad in ("k" * (most + 1), "key\n", "key\x00", "tab\there"):
        code, details = refused(stub, jobs_pb2.SubmitJobRequest(idempotency_key=bad, convert=jobs_pb2.ConvertJob(
            source=hf_source, output="keyed")))
        assert code == INVALID and f"1 to {most} printable characters" in details, (bad, details)
    keyed = jobs_pb2.SubmitJobRequest(idempotency_key="k" * most, convert=jobs_pb2.ConvertJob(
        source=hf_source, output="keyed"))
    first = stub.SubmitJob(keyed)
    assert stub.SubmitJob(keyed).id == first.id  # the longest key works, and is idempotent
    assert len(stub.ListJobs(jobs_pb2.ListJobsRequest()).jobs) == 2


def test_requests_beyond_the_limits_or_the_memory_are_refused(jobs_api, jobs_settings, hf_source, tiny_model_dir,
                                                              monkeypatch):
    """Each bound in settings.LIMITS refuses at submit, naming the field and its limit; a fine-tune
    or a conversion that cannot fit the memory available is refused with the numbers."""
    from services.jobs.settings import LIMITS

    stub, _ = jobs_api
    root = Path(jobs_settings.store_root)
    shutil.copytree(tiny_model_dir, root / "models" / "base")
    (root / "datasets" / "d").mkdir()
    over = {k: v + 1 for k, v in LIMITS.items()}

    def export(output="o", **kw):
        return jobs_pb2.SubmitJobRequest(export=jobs_pb2.ExportJob(model="base", output=output, **kw))

    cases = {
        "max_steps": finetune(max_steps=over["max_steps"]),
        "epochs": finetune(epochs=over["epochs"]),
        "batch_size": finetune(batch_size=over["batch_size"]),
        "grad_accum": finetune(grad_accum=over["grad_accum"]),
        "keep_last": finetune(keep_last=over["keep_last"]),
        "lora_rank": finetune(method="lora", lora_rank=over["lora_rank"]),
        "checkpoints": finetune(max_steps=LIMITS["checkpoints"] * 2, save_every=1),
        "max_batch": export(max_batch=over["max_batch"]),
        "max_len": export(max_len=over["max_len"]),
        "seq_length": jobs_pb2.SubmitJobRequest(preprocess=jobs_pb2.PreprocessJob(
            source=hf_source + "/config.json", output="d2", format="alpaca", seq_length=over["seq_length"])),
    }
    for field, request in cases.items():
        code, details = refused(stub, request)
        assert code == INVALID and f"{field} " in details and f"above the limit of {LIMITS[field]}" in details, \
            (field, details)
    # at the limits: accepted (queued; no worker runs them here)
    stub.SubmitJob(finetune(output="a", max_steps=LIMITS["max_steps"], keep_last=LIMITS["keep_last"],
                            save_every=LIMITS["max_steps"] // LIMITS["checkpoints"]))
    stub.SubmitJob(export(output="b", max_batch=LIMITS["max_batch"]))
    with pytest.raises(grpc.RpcError) as e:  # a listing is bounded too
        stub.ListJobs(jobs_pb2.ListJobsRequest(limit=over["list_jobs"]))
    assert e.value.code() == INVALID and f"above the limit of {LIMITS['list_jobs']}" in e.value.details()
    assert len(stub.ListJobs(jobs_pb2.ListJobsRequest(limit=LIMITS["list_jobs"])).jobs) == 2

    monkeypatch.setenv("INTERNLM_MEMORY_LIMIT", "4G")  # this process's memory, as the operator caps it
    for method, needs in (("full", "109.9"), ("lora", "28.0")):
        code, details = refused(stub, finetune(base_model="", preset="internlm-7b", method=method, output="big"))
        assert code == INVALID and details.startswith(f"a {method} fine-tune of internlm-7b (7.32B parameters) "
                                                      f"needs at least {needs} GiB of memory") \
            and details.endswith("but 4.0 GiB is available here"), details
    stub.SubmitJob(finetune(output="small"))  # the tiny base model fits
    monkeypatch.setenv("INTERNLM_MEMORY_LIMIT", "100K")
    code, details = refused(stub, convert(hf_source, "c"))
    assert code == INVALID and details.startswith("converting ") and details.endswith(
        "MiB of memory, but 0.1 MiB is available here"), details
    assert not list((root / "jobs").iterdir())
