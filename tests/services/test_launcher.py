"""``python -m services.launcher up`` brings the whole stack up on loopback, restarts a part
that dies, and stops everything on SIGTERM."""
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import httpx
import pytest

from services.pb import common_pb2, inference_pb2, inference_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc
from tests.helpers import REPO, free_port


def start_launcher(model_dir, var, tries=3):
    """The launcher on ports free right now; (process, endpoint address, output lines)."""
    for _ in range(tries):
        port, redis_port, http_port = free_port(), free_port(), free_port()
        proc = subprocess.Popen([sys.executable, "-m", "services.launcher", "up", "--model", str(model_dir),
                                 "--workers", "1", "--max-batch", "2", "--port", str(port),
                                 "--redis-port", str(redis_port), "--http-port", str(http_port), "--var", str(var)],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "INTERNLM_MAX_QUEUE": "4"})
        lines = []
        threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if any(line.startswith("ready:") for line in lines):
                proc.http = f"http://127.0.0.1:{http_port}"
                return proc, f"127.0.0.1:{port}", lines
            time.sleep(0.5)
        proc.kill()
        if not any("ports in use" in line for line in lines):
            raise AssertionError("launcher did not come up:\n" + "".join(lines))
    raise AssertionError("no free ports")


@pytest.fixture(scope="module")
def launched(chat_model_dir, tmp_path_factory):
    var = tmp_path_factory.mktemp("var")
    proc, address, lines = start_launcher(chat_model_dir, var)
    yield proc, address, lines, var
    if proc.poll() is None:
        proc.kill()


def pids_in_session(proc_pid: int) -> list[int]:
    """Children of the launcher (each in its own session, so found by parent id)."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc_pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_stack_serves_restarts_and_stops(launched):
    proc, address, lines, var = launched
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(address))
    req = inference_pb2.GenerateRequest(text="Hello", params=common_pb2.SamplingParams(max_new_tokens=5,
                                                                                       ignore_eos=True))
    assert stub.GenerateUnary(req, timeout=60).finish.completion_tokens == 5
    assert f"HTTP: {proc.http}/ (console)" in "".join(lines)  # the OpenAI API through the same endpoint
    answer = httpx.post(f"{proc.http}/v1/completions", json={"prompt": "Hello", "max_tokens": 5, "ignore_eos": True},
                        timeout=60).json()
    assert answer["usage"]["completion_tokens"] == 5
    logs = {p.stem for p in (var / "logs").iterdir()}
    jobs = {"converter", "trainer"} if (REPO / "services" / "jobs" / "job_worker.py").is_file() else set()
    assert {"redis", "tokenizer", "endpoint", "inference-0"} | jobs <= logs
    assert (var / "redis" / "appendonlydir").is_dir()  # AOF persistence under var/
    children = pids_in_session(proc.pid)
    assert len(children) == 4 + len(jobs)

    # A worker that dies is started again and serves again. The stream it was serving has no other
    # worker to continue on, so that client (only) gets UNAVAILABLE, saying so.
    worker = next(p for p in children if "services.inference_worker" in open(f"/proc/{p}/cmdline").read())
    long = inference_pb2.GenerateRequest(text="Hello", params=common_pb2.SamplingParams(max_new_tokens=400,
                                                                                        ignore_eos=True))
    call = stub.Generate(long, timeout=60)
    next(call)
    os.kill(worker, signal.SIGKILL)
    with pytest.raises(grpc.RpcError) as lost:
        list(call)
    assert lost.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no other live worker can continue the request" in lost.value.details()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if stub.GenerateUnary(req, timeout=10).finish.completion_tokens == 5 and \
                    any("inference-0 exited" in line for line in lines):
                break
        except grpc.RpcError:
            time.sleep(0.5)
    else:
        raise AssertionError("the worker was not restarted:\n" + "".join(lines))

    # kill -9 of the endpoint and of the tokenizer service: both are started again on their ports,
    # and the stack answers again through the same address.
    tok = tokenizer_pb2_grpc.TokenizerStub(grpc.insecure_channel(address))  # passed through the endpoint
    for part in ("services.endpoint", "services.tokenizer_service"):
        pid = next(p for p in pids_in_session(proc.pid) if part in open(f"/proc/{p}/cmdline").read())
        os.kill(pid, signal.SIGKILL)
        name = part.removeprefix("services.").removesuffix("_service")
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if any(f"{name} exited" in line for line in lines) and \
                        stub.GenerateUnary(req, timeout=10).finish.completion_tokens == 5 and \
                        tok.Encode(tokenizer_pb2.EncodeRequest(text="Hello"), timeout=10).ids:
                    break
            except grpc.RpcError:
                pass
            time.sleep(0.5)
        else:
            raise AssertionError(f"{name} was not restarted:\n" + "".join(lines))

    children = pids_in_session(proc.pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 0
    assert all(not os.path.exists(f"/proc/{p}") or "Z" in open(f"/proc/{p}/stat").read().split()[2]
               for p in children), "a part of the stack outlived the launcher"
    assert any("stopping redis" in line for line in lines)


def test_prepare_model_converts_an_hf_folder_once(tiny_hf, tmp_path):
    argv = [sys.executable, "-m", "services.launcher", "prepare-model", "--hf-model", str(tiny_hf[1]),
            "--models-root", str(tmp_path / "models")]
    first = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    folder = first.stdout.strip().splitlines()[-1]
    assert folder == str((tmp_path / "models" / tiny_hf[1].name).resolve())
    assert "converting" in first.stdout
    from internlm_core.config import Config

    assert Config.from_checkpoint(folder).hidden_size == 64
    again = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.stdout.strip() == folder and "converting" not in again.stdout  # cached


def test_prepare_model_refuses_a_folder_without_a_model(tmp_path):
    r = subprocess.run([sys.executable, "-m", "services.launcher", "prepare-model", "--model", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "not a model folder" in r.stderr
