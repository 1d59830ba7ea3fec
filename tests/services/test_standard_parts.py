"""What every server has: status codes for bad input (and still healthy after), health,
reflection (enough for grpcurl without stubs), Prometheus metrics."""
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from services.pb import common_pb2, inference_pb2, inference_pb2_grpc

SERVERS = ["worker", "endpoint", "tokenizer_service"]
SERVICES = {
    "worker": {"internlm.v1.Inference"},
    "endpoint": {"internlm.v1.Inference", "internlm.v1.Tokenizer", "internlm.v1.Endpoint"},
    "tokenizer_service": {"internlm.v1.Tokenizer"},
}
Code = grpc.StatusCode


def healthy(service) -> bool:
    with grpc.insecure_channel(service.address) as ch:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        return r.status == health_pb2.HealthCheckResponse.SERVING


def params(**kw):
    return common_pb2.SamplingParams(**kw)


BAD = {
    "no prompt": (inference_pb2.GenerateRequest(), Code.INVALID_ARGUMENT, "no prompt"),
    "empty text": (inference_pb2.GenerateRequest(text=""), Code.INVALID_ARGUMENT, "empty prompt"),
    "empty ids": (inference_pb2.GenerateRequest(ids=common_pb2.TokenIds()), Code.INVALID_ARGUMENT, "empty prompt"),
    "too long": (inference_pb2.GenerateRequest(ids=common_pb2.TokenIds(ids=[5] * 400)), Code.INVALID_ARGUMENT,
                 "400 tokens"),
    "top_p 0": (inference_pb2.GenerateRequest(text="a", params=params(top_p=0.0)), Code.INVALID_ARGUMENT, "top_p"),
    "top_p 1.5": (inference_pb2.GenerateRequest(text="a", params=params(top_p=1.5)), Code.INVALID_ARGUMENT, "top_p"),
    "temperature nan": (inference_pb2.GenerateRequest(text="a", params=params(temperature=float("nan"))),
                        Code.INVALID_ARGUMENT, "temperature must be a finite number"),
    "repetition_penalty nan": (inference_pb2.GenerateRequest(text="a", params=params(repetition_penalty=float("nan"))),
                               Code.INVALID_ARGUMENT, "repetition_penalty must be a finite number"),
    "top_p inf": (inference_pb2.GenerateRequest(text="a", params=params(top_p=float("inf"))),
                  Code.INVALID_ARGUMENT, "top_p must be a finite number"),
    "presence_penalty -inf": (inference_pb2.GenerateRequest(text="a", params=params(presence_penalty=float("-inf"))),
                              Code.INVALID_ARGUMENT, "presence_penalty must be a finite number"),
    "negative max": (inference_pb2.GenerateRequest(text="a", params=params(max_new_tokens=-3)),
                     Code.INVALID_ARGUMENT, "max_new_tokens"),
    "id outside vocab": (inference_pb2.GenerateRequest(ids=common_pb2.TokenIds(ids=[1, 200000])),
                         Code.INVALID_ARGUMENT, "vocabulary"),
    "bad chat role": (inference_pb2.GenerateRequest(chat=common_pb2.ChatMessages(messages=[
        common_pb2.ChatMessage(role="wizard", content="hi")])), Code.INVALID_ARGUMENT, "role"),
    "unknown adapter": (inference_pb2.GenerateRequest(text="a", adapter="no-such-lora"), Code.NOT_FOUND,
                        "no-such-lora"),
    "unknown model": (inference_pb2.GenerateRequest(text="a", model="internlm-70b"), Code.NOT_FOUND,
                      "internlm-70b"),
}


@pytest.mark.parametrize("via", ["worker", "endpoint"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_its_status_code(request, via, case):
    server = request.getfixturevalue(via)
    req, code, words = BAD[case]
    s = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(server.address))
    for call in (s.GenerateUnary, lambda r, timeout: list(s.Generate(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as e:
            call(req, timeout=30)
        assert e.value.code() == code and words in e.value.details()
    assert healthy(server)


@pytest.mark.parametrize("via", ["worker", "endpoint", "tokenizer_service"])
def test_invalid_utf8_is_invalid_argument(request, via):
    """protobuf refuses a string field holding invalid UTF-8 while parsing; the server says so."""
    server = request.getfixturevalue(via)
    method, body = (("/internlm.v1.Tokenizer/Encode", b"\x0a\x03a\xff\xfe") if via == "tokenizer_service" else
                    ("/internlm.v1.Inference/Generate", b"\x12\x03a\xff\xfe"))  # field 1/2 = text
    with grpc.insecure_channel(server.address) as ch:
        with pytest.raises(grpc.RpcError) as e:
            list(ch.unary_stream(method)(body, timeout=30)) if "Generate" in method else ch.unary_unary(method)(body)
    assert e.value.code() == Code.INVALID_ARGUMENT and "utf-8" in e.value.details().lower()
    assert healthy(server)


@pytest.mark.parametrize("name", SERVERS)
def test_health_and_reflection(request, name):
    server = request.getfixturevalue(name)
    with grpc.insecure_channel(server.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ["", *SERVICES[name]]:
            r = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert r.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as e:
            health.Check(health_pb2.HealthCheckRequest(service="no.Such"), timeout=10)
        assert e.value.code() == Code.NOT_FOUND
        db = ProtoReflectionDescriptorDatabase(ch)
        names = set(db.get_services())
        assert SERVICES[name] | {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
        # What grpcurl does to build a request without stubs: fetch the file that defines a symbol.
        service = sorted(SERVICES[name])[0]
        proto = db.FindFileContainingSymbol(service)
        assert proto.package == "internlm.v1" and service.split(".")[-1] in [s.name for s in proto.service]


def test_worker_metrics_expose_the_counters(worker, endpoint):
    request = inference_pb2.GenerateRequest(text="Metrics", params=params(max_new_tokens=4, ignore_eos=True))
    inference_pb2_grpc.InferenceStub(grpc.insecure_channel(endpoint.address)).GenerateUnary(request, timeout=60)
    # (the endpoint joins its unary answer from the worker's stream; the worker's own unary method too)
    inference_pb2_grpc.InferenceStub(grpc.insecure_channel(worker.address)).GenerateUnary(request, timeout=60)
    text = worker.metrics()
    for series in ("internlm_queue_size", "internlm_active_requests", "internlm_batch_size_bucket",
                   "internlm_time_to_first_token_seconds_bucket", "internlm_inter_token_latency_seconds_bucket",
                   "internlm_generated_tokens_total", "internlm_request_duration_seconds_bucket",
                   'internlm_requests_finished_total{finish_reason="length"}',
                   'internlm_grpc_requests_total{code="OK",method="/internlm.v1.Inference/GenerateUnary"}'):
        assert series in text, series
    assert worker.metric("internlm_generated_tokens_total") >= 4
    assert worker.metric("internlm_time_to_first_token_seconds_count") >= 1
    assert worker.metric("internlm_inter_token_latency_seconds_count") >= 3
    assert "internlm_endpoint_routed_total" in endpoint.metrics()
    assert endpoint.metric("internlm_endpoint_workers") == 1


def test_worker_serves_the_kv_cache_dtype_asked_for(worker, chat_model_dir, tmp_path):
    """--kv-cache-dtype float32 gives an fp32 cache (twice the default's bytes on the CPU kernels, in
    ModelInfo); the start logs name the cache's dtype, the default worker's its default."""
    from internlm_core import kernels
    from internlm_core.checkpoint import read_config
    from tests.services.conftest import WORKER_LEN, start_worker

    cfg = read_config(chat_model_dir)
    default = "float16" if kernels.library() else "float32"
    assert f"KV cache {default} " in worker.log.read_text()
    fp32 = start_worker(chat_model_dir, "", tmp_path, "worker-fp32", "--kv-cache-dtype", "float32").wait_healthy()
    try:
        info = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(fp32.address)).ModelInfo(
            inference_pb2.ModelInfoRequest(), timeout=30)
        assert info.kv_cache_bytes_per_slot == 2 * cfg.num_layers * WORKER_LEN * cfg.hidden_size * 4
        log = fp32.log.read_text()
        assert "weights, float32 KV cache)" in log and "KV cache float32 " in log
    finally:
        fp32.stop()


def test_worker_reports_its_cache_and_prefix_reuse(worker, chat_model_dir):
    """KV cache bytes in ModelInfo and as a gauge (what a 4-slot x 256 cache of this model takes,
    scratch slot included, in fp16: the default on the CPU kernels); a repeated prompt counts as
    prefix-cache hits."""
    from internlm_core.checkpoint import read_config
    from tests.services.conftest import WORKER_LEN, WORKER_SLOTS

    cfg = read_config(chat_model_dir)
    from internlm_core import kernels

    per_slot = 2 * cfg.num_layers * WORKER_LEN * cfg.hidden_size * (2 if kernels.library() else 4)
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(worker.address))
    info = stub.ModelInfo(inference_pb2.ModelInfoRequest(), timeout=30)
    assert (info.kv_cache_bytes_per_slot, info.kv_cache_bytes) == (per_slot, (WORKER_SLOTS + 1) * per_slot)
    assert worker.metric("internlm_kv_cache_bytes") == info.kv_cache_bytes
    held = [line for line in worker.metrics().splitlines() if line.startswith("internlm_weight_bytes{")]
    cache = "float16" if kernels.library() else "float32"
    assert len(held) == 1 and f'precision="float32; {cache} KV cache"' in held[0]
    assert float(held[0].split()[-1]) == info.weight_bytes > 0
    req = inference_pb2.GenerateRequest(text="A prompt that comes twice, word for word",
                                        params=params(max_new_tokens=3, ignore_eos=True))
    first = stub.GenerateUnary(req, timeout=60)
    hits, queries = (worker.metric("internlm_prefix_cache_hits_tokens_total"),
                     worker.metric("internlm_prefix_cache_queries_tokens_total"))
    again = stub.GenerateUnary(req, timeout=60)
    assert list(first.token_ids) == list(again.token_ids)
    n = first.finish.prompt_tokens
    assert worker.metric("internlm_prefix_cache_queries_tokens_total") - queries == n
    assert worker.metric("internlm_prefix_cache_hits_tokens_total") - hits == n - 1  # all but the last token
    shapes = worker.metric("internlm_step_shapes")
    assert list(stub.GenerateUnary(req, timeout=60).token_ids) == list(first.token_ids)
    assert worker.metric("internlm_step_shapes") == shapes > 0  # a repeat runs only shapes compiled before


def test_endpoint_hosts_the_jobs_api(endpoint):
    """The jobs package is part of this project, so the endpoint serves it next to inference."""
    from services.pb import jobs_pb2, jobs_pb2_grpc

    with grpc.insecure_channel(endpoint.address) as ch:
        assert "internlm.v1.Jobs" in ProtoReflectionDescriptorDatabase(ch).get_services()
        jobs = jobs_pb2_grpc.JobsStub(ch)
        listed = jobs.ListJobs(jobs_pb2.ListJobsRequest(), timeout=10)  # other tests' jobs may be listed
        assert all(j.id for j in listed.jobs)
        with pytest.raises(grpc.RpcError) as e:
            jobs.GetJob(jobs_pb2.GetJobRequest(id="no-such-job"), timeout=10)
        assert e.value.code() == Code.NOT_FOUND
