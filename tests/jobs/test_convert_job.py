"""Submit -> watch -> SUCCEEDED for a conversion, through a real gRPC server and a real Celery worker."""
import json
from pathlib import Path

import grpc
import numpy as np
import pytest

from services.pb import jobs_pb2
from tests.jobs.conftest import watch_until_done

S = jobs_pb2.JobState


def convert_request(source, output, key="", **kw):
    return jobs_pb2.SubmitJobRequest(idempotency_key=key,
                                     convert=jobs_pb2.ConvertJob(source=source, output=output, **kw))


def test_convert_then_export_job_end_to_end(jobs_api, workers, hf_source, jobs_settings, tiny_hf, tiny_config):
    stub, _ = jobs_api
    workers("convert,export")  # the converter service
    job = stub.SubmitJob(convert_request(hf_source, "tiny", key="convert-1"))
    assert job.state == S.JOB_STATE_QUEUED and job.output == "models/tiny"
    seen = watch_until_done(stub, job.id)
    states = [m.state for m in seen]
    assert states[-1] == S.JOB_STATE_SUCCEEDED, seen[-1]
    assert S.JOB_STATE_RUNNING in states
    last = seen[-1]
    assert last.progress.bytes_total > 0 and last.progress.bytes_done == last.progress.bytes_total
    assert last.progress.fraction == 1.0 and last.executions == 1 and last.finished_at >= last.started_at > 0
    assert json.loads(last.result_json)["parameters"] == tiny_config.num_parameters()

    # the published model loads as an inference worker loads it, and matches the HF reference
    import torch

    from internlm_core.loader import load_model
    from internlm_core.model import forward_inputs

    folder = jobs_settings.store_root + "/models/tiny"
    model = load_model(folder)
    ids = np.array([[1, 5, 9, 42, 7]], np.int32)
    logits = model(*forward_inputs(tiny_config, ids, np.array([5], np.int32))).asnumpy()
    with torch.no_grad():
        ref = tiny_hf[0](torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(logits, ref, atol=1e-4)

    # nothing left in the job's private folder; the store lists the model
    assert list((Path(jobs_settings.store_root) / "jobs").iterdir()) == []
    entries = stub.ListStore(jobs_pb2.ListStoreRequest(area="models")).entries
    assert [(e.name, e.kind) for e in entries] == [("tiny", "model")]

    # the same key and request: the same job, nothing queued again (even though models/tiny exists now)
    again = stub.SubmitJob(convert_request(hf_source, "tiny", key="convert-1"))
    assert again.id == job.id and again.state == S.JOB_STATE_SUCCEEDED and again.executions == 1
    # the same key for a different request is refused
    with pytest.raises(grpc.RpcError) as e:
        stub.SubmitJob(convert_request(hf_source, "tiny2", key="convert-1"))
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS and "different request" in e.value.details()
    # without a key, an existing output is refused at submit
    with pytest.raises(grpc.RpcError) as e:
        stub.SubmitJob(convert_request(hf_source, "tiny"))
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS

    listed = stub.ListJobs(jobs_pb2.ListJobsRequest(kind=jobs_pb2.JOB_KIND_CONVERT)).jobs
    assert [j.id for j in listed] == [job.id]
    assert stub.GetJob(jobs_pb2.GetJobRequest(id=job.id)).request.convert.source == hf_source

    # the converted model exported to MindIR graphs by the same (converter) worker
    exp = stub.SubmitJob(jobs_pb2.SubmitJobRequest(export=jobs_pb2.ExportJob(model="tiny", output="tiny-mindir",
                                                                              max_batch=2, max_len=32)))
    last = watch_until_done(stub, exp.id, timeout=180)[-1]
    assert last.state == S.JOB_STATE_SUCCEEDED, last.error
    assert last.progress.step == last.progress.total_steps == 4
    entries = {e.name: e.kind for e in stub.ListStore(jobs_pb2.ListStoreRequest(area="models")).entries}
    assert entries == {"tiny": "model", "tiny-mindir": "exported"}
    manifest = json.loads((Path(folder).parent / "tiny-mindir" / "mindir_manifest.json").read_text())
    assert manifest["max_batch"] == 2 and manifest["max_len"] == 32


def test_cli_submit_watch_get_list(jobs_api, workers, hf_source, capsys):
    from services.cli import main

    stub, _ = jobs_api
    workers("convert")
    ep = ["jobs", "--endpoint", stub.address]
    assert main([*ep, "submit", "convert", "--source", hf_source, "--output", "half", "--dtype", "bfloat16",
                 "--key", "cli-1", "--watch"]) == 0
    out = capsys.readouterr()
    job_id = out.out.splitlines()[0].strip()
    assert f"{job_id} SUCCEEDED -> models/half" in out.out
    assert "convert" in out.err and "B" in out.err  # the tqdm bar, on stderr
    assert main([*ep, "get", job_id, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["state"] == "JOB_STATE_SUCCEEDED" and got["request"]["convert"]["dtype"] == "bfloat16"
    assert main([*ep, "list", "--state", "succeeded"]) == 0
    assert job_id in capsys.readouterr().out
    assert main([*ep, "store"]) == 0
    assert "models/half" in capsys.readouterr().out
    assert main([*ep, "get", "nope"]) == 2
    assert "NOT_FOUND" in capsys.readouterr().err
    assert main([*ep, "cancel", job_id]) == 2  # it already succeeded
    assert "FAILED_PRECONDITION" in capsys.readouterr().err
