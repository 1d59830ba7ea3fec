"""Authentication on every door: the API key on each gRPC service and each HTTP router of the
endpoint (a key list by flag, one key by environment), health open on both doors; the internal
token on the worker and the tokenizer service behind it; TLS on both doors with a certificate
made here. Real servers on loopback, their own Redis, one worker and tokenizer service that
require the token, two endpoints in front of them."""
from __future__ import annotations

import json
import ssl
import subprocess
import time
from types import SimpleNamespace

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.auth import authorized, client_channel, parse_keys
from services.cli import main
from services.pb import (common_pb2, endpoint_pb2, endpoint_pb2_grpc, inference_pb2, inference_pb2_grpc, jobs_pb2,
                         jobs_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc)
from tests.helpers import RedisServer, free_port
from tests.services.conftest import Service, start_endpoint, start_worker, wait_http

TOKEN, KEYS, ENV_KEY = "internal-t0ken", ("first-key", "second-key"), "env-key"


def make_certificates(folder) -> SimpleNamespace:
    """A CA and a server certificate it signed for 127.0.0.1 / localhost (the openssl CLI)."""
    def run(*args):
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (folder / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                                       "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "server.ext")
    return SimpleNamespace(ca=str(folder / "ca.pem"), cert=str(folder / "server.pem"), key=str(folder / "server.key"))


@pytest.fixture(scope="module")
def guarded(chat_model_dir, tmp_path_factory):
    """Redis; a tokenizer service (token by environment) and a worker (token by flag) that require the
    token; endpoint ``keyed`` (two keys by flag, plain) and endpoint ``tls`` (one key by environment,
    TLS by flags), both sending the token, both with HTTP."""
    d = tmp_path_factory.mktemp("auth")
    (d / "redis").mkdir()
    certs = make_certificates(d)
    redis = RedisServer(d / "redis").start()
    tok = Service("services.tokenizer_service", [], d / "tokenizer.log", free_port(), free_port(),
                  env={"INTERNLM_INTERNAL_TOKEN": TOKEN})
    worker = start_worker(chat_model_dir, redis.url, d, "worker", "--internal-token", TOKEN)
    started = [redis, tok, worker]
    try:
        tok.wait_healthy(), worker.wait_healthy()
        keyed_port, tls_port = free_port(), free_port()
        keyed = start_endpoint(redis.url, tok.address, d, "endpoint-keyed", "--http-port", str(keyed_port),
                               "--api-key", ",".join(KEYS), "--internal-token", TOKEN)
        started.append(keyed)
        tls = start_endpoint(redis.url, tok.address, d, "endpoint-tls", "--http-port", str(tls_port),
                             "--tls-cert", certs.cert, "--tls-key", certs.key,
                             env={"INTERNLM_API_KEY": ENV_KEY, "INTERNLM_INTERNAL_TOKEN": TOKEN}, tls_ca=certs.ca)
        started.append(tls)
        keyed.wait_healthy(), tls.wait_healthy()
        keyed.base, tls.base = f"http://127.0.0.1:{keyed_port}", f"https://127.0.0.1:{tls_port}"
        verify = ssl.create_default_context(cafile=certs.ca)
        wait_http(keyed.base), wait_http(tls.base, verify=verify)
        ns = SimpleNamespace(tok=tok, worker=worker, keyed=keyed, tls=tls, certs=certs, verify=verify)
        wait_registered(client_channel(keyed.address, KEYS[0]))
        yield ns
    finally:
        for s in reversed(started):
            s.stop()


def wait_registered(channel, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    stub = endpoint_pb2_grpc.EndpointStub(channel)
    while not stub.ListWorkers(endpoint_pb2.ListWorkersRequest(), timeout=5).workers:
        assert time.monotonic() < deadline, "the worker never showed up at the endpoint"
        time.sleep(0.2)


def generate(n=3):
    return inference_pb2.GenerateRequest(text="Hello", params=common_pb2.SamplingParams(max_new_tokens=n,
                                                                                        ignore_eos=True))


def calls(channel):
    """One call of each gRPC service of the endpoint (streams read to their end), by name."""
    inference = inference_pb2_grpc.InferenceStub(channel)
    jobs = jobs_pb2_grpc.JobsStub(channel)
    submit = jobs_pb2.SubmitJobRequest(idempotency_key="auth-test", convert=jobs_pb2.ConvertJob(
        source="no-such-folder", output="auth-test", overwrite=True))
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    return {
        "Inference.GenerateUnary": lambda: inference.GenerateUnary(generate(), timeout=60),
        "Inference.Generate": lambda: list(inference.Generate(generate(), timeout=60)),
        "Inference.ModelInfo": lambda: inference.ModelInfo(inference_pb2.ModelInfoRequest(), timeout=30),
        "Tokenizer.Encode": lambda: tokenizer_pb2_grpc.TokenizerStub(channel).Encode(
            tokenizer_pb2.EncodeRequest(text="Hello"), timeout=30),
        # a model's: the worker answers, the internal token sent to it as to the tokenizer service
        "Tokenizer.Encode (model)": lambda: tokenizer_pb2_grpc.TokenizerStub(channel).Encode(tokenizer_pb2.EncodeRequest(
            text="Hello", model=inference.ModelInfo(inference_pb2.ModelInfoRequest(), timeout=30).model), timeout=30),
        "Endpoint.ListWorkers": lambda: endpoint_pb2_grpc.EndpointStub(channel).ListWorkers(
            endpoint_pb2.ListWorkersRequest(), timeout=30),
        "Jobs.SubmitJob": lambda: jobs.SubmitJob(submit, timeout=30),
        "Jobs.ListJobs": lambda: jobs.ListJobs(jobs_pb2.ListJobsRequest(), timeout=30),
        "Jobs.WatchJob": lambda: list(jobs.WatchJob(jobs_pb2.WatchJobRequest(id="no-such-job"), timeout=30)),
        "Reflection": lambda: list(reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30)),
    }


# What each call answers when it gets through (a refusal of its request, not of its caller).
THROUGH = {"Jobs.SubmitJob": grpc.StatusCode.NOT_FOUND, "Jobs.WatchJob": grpc.StatusCode.NOT_FOUND}


def code_of(call) -> grpc.StatusCode:
    try:
        call()
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


def test_keys_parse_and_compare():
    assert parse_keys(" a, b ,,") == ("a", "b") and parse_keys("") == () and parse_keys(None) == ()
    assert authorized(("a", "b"), "Bearer b") and authorized(("a",), b"Bearer a")
    assert not authorized(("a",), "Bearer ab") and not authorized(("a",), "a") and not authorized(("a",), None)
    assert not authorized((), "Bearer ")


def test_every_grpc_service_needs_a_key(guarded):
    for key in (None, "wrong", KEYS[0] + "x"):
        for name, call in calls(client_channel(guarded.keyed.address, key)).items():
            try:
                call()
                raise AssertionError(f"{name} answered without a valid key ({key!r})")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAUTHENTICATED, (name, e)
                assert "API key" in e.details(), name


def test_each_key_of_the_list_is_accepted(guarded):
    for key in KEYS:
        got = {name: code_of(call) for name, call in calls(client_channel(guarded.keyed.address, key)).items()}
        assert got == {name: THROUGH.get(name, grpc.StatusCode.OK) for name in got}
    # through the endpoint to the worker and the tokenizer service, each with the token
    stub = inference_pb2_grpc.InferenceStub(client_channel(guarded.keyed.address, KEYS[1]))
    assert stub.GenerateUnary(generate(4), timeout=60).finish.completion_tokens == 4


def test_health_is_open_on_both_doors(guarded):
    for address, ca in ((guarded.keyed.address, None), (guarded.tls.address, guarded.certs.ca)):
        with client_channel(address, ca=ca) as ch:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert r.status == health_pb2.HealthCheckResponse.SERVING
    assert httpx.get(guarded.keyed.base + "/health").status_code == 200
    assert httpx.get(guarded.tls.base + "/health", verify=guarded.verify).status_code == 200


# One route of each router (the OpenAI API, the console's JSON) and the metrics.
ROUTES = [("GET", "/v1/models", None), ("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
          ("GET", "/metrics", None), ("GET", "/api/workers", None), ("GET", "/api/jobs", None),
          ("GET", "/api/store", None)]


@pytest.mark.parametrize("door", ["keyed", "tls"])
def test_every_http_route_needs_a_key(guarded, door):
    base, keys = getattr(guarded, door).base, KEYS if door == "keyed" else (ENV_KEY,)
    with httpx.Client(verify=guarded.verify, timeout=60) as http:
        for method, path, body in ROUTES:
            for header in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": keys[0]}):
                r = http.request(method, base + path, json=body, headers=header)
                assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", (path, header)
            for key in keys:
                r = http.request(method, base + path, json=body, headers={"Authorization": f"Bearer {key}"})
                assert r.status_code == 200, (path, r.text)
        assert http.get(base + "/").status_code == 200 and http.get(base + "/console/app.js").status_code == 200


def test_the_worker_and_the_tokenizer_refuse_calls_without_the_token(guarded):
    for key in (None, "wrong", KEYS[0]):  # an API key is no internal token
        with client_channel(guarded.worker.address, key) as ch:
            for call in (lambda: inference_pb2_grpc.InferenceStub(ch).GenerateUnary(generate(), timeout=30),
                         lambda: inference_pb2_grpc.InferenceStub(ch).ModelInfo(inference_pb2.ModelInfoRequest(),
                                                                                 timeout=30)):
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "internal token" in e.value.details()
        with client_channel(guarded.tok.address, key) as ch, pytest.raises(grpc.RpcError) as e:
            tokenizer_pb2_grpc.TokenizerStub(ch).Encode(tokenizer_pb2.EncodeRequest(text="Hi"), timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with client_channel(guarded.worker.address, TOKEN) as ch:
        assert inference_pb2_grpc.InferenceStub(ch).GenerateUnary(generate(2), timeout=60).finish.completion_tokens == 2
    with client_channel(guarded.tok.address, TOKEN) as ch:
        assert tokenizer_pb2_grpc.TokenizerStub(ch).Encode(tokenizer_pb2.EncodeRequest(text="Hi"), timeout=30).ids
    with client_channel(guarded.worker.address) as ch:  # health stays open
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING


def test_cached_prompt_rows_are_reused_within_one_key_only(guarded):
    """A prompt sent again with the same key reuses the KV rows its first sending left (the
    worker's prefix-hit counter grows by most of the prompt); sent with another key it reuses none
    of them, so how fast a prompt is answered tells no user what another one asked. The first
    sending goes over HTTP, the others over gRPC: both doors tell the worker the same tenant."""
    prompt = " ".join(f"tenant-{i} sentence about the sea" for i in range(20))
    hits = lambda: guarded.worker.metric("internlm_prefix_cache_hits_tokens_total")  # noqa: E731
    r = httpx.post(f"{guarded.keyed.base}/v1/completions", headers={"authorization": f"Bearer {KEYS[0]}"},
                   json={"prompt": prompt, "max_tokens": 2}, timeout=60)
    assert r.status_code == 200, r.text
    n = r.json()["usage"]["prompt_tokens"]
    request = inference_pb2.GenerateRequest(text=prompt, params=common_pb2.SamplingParams(max_new_tokens=2))
    before = hits()
    inference_pb2_grpc.InferenceStub(client_channel(guarded.keyed.address, KEYS[1])).GenerateUnary(request, timeout=60)
    other = hits() - before
    assert other <= 1, other  # at most the BOS token, shared with that key's own earlier prompts
    before = hits()
    inference_pb2_grpc.InferenceStub(client_channel(guarded.keyed.address, KEYS[0])).GenerateUnary(request, timeout=60)
    assert hits() - before >= n - 2  # all but the last token (always computed) reused


def test_tls_on_both_doors(guarded):
    address = guarded.tls.address
    with client_channel(address, ENV_KEY) as plain, pytest.raises(grpc.RpcError) as e:
        endpoint_pb2_grpc.EndpointStub(plain).ListWorkers(endpoint_pb2.ListWorkersRequest(), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    with client_channel(address, ENV_KEY, guarded.certs.ca) as ch:
        assert inference_pb2_grpc.InferenceStub(ch).GenerateUnary(generate(2), timeout=60).finish.completion_tokens == 2
    with client_channel(address, None, guarded.certs.ca) as ch, pytest.raises(grpc.RpcError) as e:
        endpoint_pb2_grpc.EndpointStub(ch).ListWorkers(endpoint_pb2.ListWorkersRequest(), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    http_base = guarded.tls.base.replace("https://", "http://")
    with pytest.raises(httpx.TransportError):  # plain HTTP on the TLS port: no answer
        httpx.get(http_base + "/health", timeout=5)
    with pytest.raises(httpx.ConnectError):  # TLS without trusting the CA
        httpx.get(guarded.tls.base + "/health", timeout=5)


def test_cli_sends_the_key_and_speaks_tls(guarded, capsys, monkeypatch):
    monkeypatch.delenv("INTERNLM_API_KEY", raising=False)
    monkeypatch.delenv("INTERNLM_TLS_CA", raising=False)
    assert main(["workers", "--endpoint", guarded.keyed.address]) == 2
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert main(["workers", "--endpoint", guarded.keyed.address, "--api-key", KEYS[1]]) == 0
    assert guarded.worker.address in capsys.readouterr().out
    assert main(["jobs", "--endpoint", guarded.keyed.address, "--api-key", KEYS[0], "list", "--json"]) == 0
    capsys.readouterr()
    assert main(["generate", "Hi", "--endpoint", guarded.tls.address, "--api-key", ENV_KEY,
                 "--max-new-tokens", "2"]) == 1  # plain text to a TLS port
    assert "UNAVAILABLE" in capsys.readouterr().err
    monkeypatch.setenv("INTERNLM_API_KEY", ENV_KEY)  # the key and the CA from the environment
    monkeypatch.setenv("INTERNLM_TLS_CA", guarded.certs.ca)
    assert main(["generate", "Hi", "--endpoint", guarded.tls.address, "--max-new-tokens", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["finish_reason"] in ("length", "eos")
    assert main(["generate", "Hi", "--endpoint", guarded.tls.address, "--api-key", "wrong",
                 "--max-new-tokens", "2"]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
