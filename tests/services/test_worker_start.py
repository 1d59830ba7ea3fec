"""How a worker starts: it sizes itself by the memory available (here capped with
``INTERNLM_MEMORY_LIMIT``), its defaults cut to what fits, logged with the reason and reported by
ModelInfo; a model that cannot fit is refused at start, before a weight is read, with its numbers;
a Redis that is down is one log line, and the worker registers once it is up."""
from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest

from internlm_core.config import Config
from internlm_core.memory import MARGIN, RUNTIME_BYTES, cache_bytes, plan_serving, weight_bytes
from services.pb import inference_pb2, inference_pb2_grpc
from tests.helpers import REPO, free_port
from tests.services.conftest import Service


def test_the_defaults_are_cut_to_the_memory_available(chat_model_dir, tmp_path, monkeypatch):
    from internlm_core.engine import serving_dtypes

    cfg = Config.from_checkpoint(chat_model_dir)  # 256 positions
    weights, cache = serving_dtypes(cfg)  # what the worker holds them in
    # room for 3 slots beside the weights and the runtime (plus the scratch slot)
    limit = int((weight_bytes(cfg, weights) + RUNTIME_BYTES + cache_bytes(cfg, 3, 256, cache)) / MARGIN) + 4096
    want = plan_serving(cfg, weights, cache, limit)
    assert (want.max_batch, want.max_len) == (3, 256)
    monkeypatch.setenv("INTERNLM_MEMORY_LIMIT", str(limit))
    worker = Service("services.inference_worker", ["--model", str(chat_model_dir), "--redis-url", ""],
                     tmp_path / "worker.log", free_port(), free_port()).wait_healthy()
    try:
        info = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(worker.address)).ModelInfo(
            inference_pb2.ModelInfoRequest(), timeout=30)
        assert (info.max_batch, info.max_len) == (3, 256)
    finally:
        worker.stop()
    log = worker.log.read_text()
    assert f"3 slots x 256 positions ({weights} weights, {cache} KV cache): cut from 8 slots x 256 positions" in log


def test_a_model_that_cannot_fit_is_refused_before_loading(chat_model_dir):
    env = {**os.environ, "INTERNLM_MEMORY_LIMIT": "600M"}
    out = subprocess.run([sys.executable, "-m", "services.inference_worker", "--model", str(chat_model_dir),
                          "--redis-url", "", "--port", "0"], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=env)
    assert out.returncode != 0
    assert "cannot be served here: its weights take 0.0 GiB as float32" in out.stderr
    assert "only 0.6 GiB of memory is available" in out.stderr


def test_a_draft_model_that_cannot_serve_as_one_is_refused_at_start(chat_model_dir, tmp_path):
    """--draft-model with another tokenizer (the same vocabulary size in its config) is refused
    before any weights load, naming the flag and the reason; so are --speculate draft without one,
    a draft with --speculate ngram, and an exported draft."""
    from internlm_core.checkpoint import MANIFEST_FILE, copy_tokenizer
    from tests.helpers import DATA

    other = tmp_path / "v2-draft"
    other.mkdir()
    Config.from_name("tiny-v2", vocab_size=103168, max_position_embeddings=256).save(other)
    copy_tokenizer(DATA / "internlm2-tokenizer", other)

    def start(*extra):
        return subprocess.run([sys.executable, "-m", "services.inference_worker", "--model", str(chat_model_dir),
                               "--redis-url", "", "--port", "0", *extra], cwd=REPO, capture_output=True, text=True,
                              timeout=120)

    out = start("--draft-model", str(other))
    assert out.returncode != 0 and f"--draft-model {other}: the draft model's tokenizer" in out.stderr
    assert "differs from the target's" in out.stderr
    out = start("--speculate", "draft")
    assert out.returncode != 0 and "--speculate draft needs --draft-model DIR" in out.stderr
    out = start("--speculate", "ngram", "--draft-model", str(chat_model_dir))
    assert out.returncode != 0 and "a draft model is used by --speculate draft or auto, not ngram" in out.stderr
    exported = tmp_path / "exported"  # an exported pair is known by its manifest (never read here)
    exported.mkdir()
    (exported / MANIFEST_FILE).write_text("{}")
    out = start("--draft-model", str(exported))
    assert out.returncode != 0 and "an exported model cannot be a draft" in out.stderr
    out = start("--draft-model", str(short_draft(chat_model_dir, tmp_path)), "--max-len", "256")
    assert out.returncode != 0 and "--max-len 256 exceeds the draft model's 128 positions" in out.stderr
    assert "Traceback" not in out.stderr


def short_draft(model_dir, tmp_path):
    """The model of ``model_dir`` as a draft that has 128 trained positions (the target 256)."""
    import shutil

    folder = tmp_path / "short-draft"
    shutil.copytree(model_dir, folder)
    Config.from_checkpoint(folder).replace(max_position_embeddings=128).save(folder)
    return folder


def test_a_draft_with_fewer_positions_cuts_the_workers_and_model_info_names_it(chat_model_dir, tmp_path):
    """A draft of 128 positions beside a target of 256: the worker's positions are cut to 128
    (logged with the reason) before anything loads, and ModelInfo names the draft and the method."""
    draft = short_draft(chat_model_dir, tmp_path)
    worker = Service("services.inference_worker", ["--model", str(chat_model_dir), "--redis-url", "",
                                                   "--max-batch", "2", "--draft-model", str(draft)],
                     tmp_path / "worker.log", free_port(), free_port()).wait_healthy()
    try:
        info = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(worker.address)).ModelInfo(
            inference_pb2.ModelInfoRequest(), timeout=30)
        assert (info.max_len, info.speculation, info.draft_model) == (128, "draft", "short-draft")
    finally:
        worker.stop()
    assert "2 slots x 128 positions" in worker.log.read_text()
    assert "positions cut to the draft model's 128" in worker.log.read_text()


def test_a_worker_whose_redis_is_down_serves_and_registers_once_it_is_up(chat_model_dir, tmp_path):
    """A worker started before its Redis says so in one line (no traceback), serves on its own
    port, and shows up in the registry once Redis is reachable."""
    from services.registry import list_workers
    from tests.helpers import RedisServer

    redis_port = free_port()
    worker = Service("services.inference_worker", ["--model", str(chat_model_dir), "--redis-url",
                                                   f"redis://127.0.0.1:{redis_port}/0", "--max-batch", "1"],
                     tmp_path / "worker.log", free_port(), free_port()).wait_healthy()
    server = None
    try:
        log = worker.log.read_text()
        assert "cannot reach Redis to register" in log and "Traceback" not in log
        server = RedisServer(tmp_path / "redis", port=redis_port).start()
        import time

        import redis

        deadline = time.monotonic() + 30
        while not list_workers(redis.Redis.from_url(server.url)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(list_workers(redis.Redis.from_url(server.url))) == 1
    finally:
        worker.stop()
        if server:
            server.stop()


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_a_worker_started_with_quantize_serves_it_and_says_so(chat_model_dir, tmp_path, method):
    """``--quantize int8`` (or int4) on an fp32 folder: the linears are quantised while loading, the
    worker answers, and ModelInfo and the start log report the method and the bytes held (1 byte, or
    half, a linear's weight + its scales; the embedding table and norms fp32 as stored)."""
    from internlm_core.generation import SamplingParams
    from services.pb import common_pb2
    from services.pb_convert import sampling_to_pb

    worker = Service("services.inference_worker", ["--model", str(chat_model_dir), "--redis-url", "",
                                                   "--quantize", method, "--max-batch", "2"],
                     tmp_path / "worker.log", free_port(), free_port()).wait_healthy()
    try:
        stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(worker.address))
        info = stub.ModelInfo(inference_pb2.ModelInfoRequest(), timeout=30)
        out = stub.GenerateUnary(inference_pb2.GenerateRequest(
            ids=common_pb2.TokenIds(ids=[1, 333, 4444, 55]),
            params=sampling_to_pb(SamplingParams(max_new_tokens=6, ignore_eos=True))), timeout=60)
    finally:
        worker.stop()
    cfg = Config.from_checkpoint(chat_model_dir)
    assert info.quantization == method and info.dtype == "float32"
    from internlm_core.quantize import GROUP, quantized_names

    shapes = [cfg.param_shapes()[n] for n in quantized_names(cfg)]
    # int8: 1 byte a weight + a 4-byte scale a row; int4: half a byte + a 4-byte scale per 32 of a row
    held = sum(r * c + 4 * r if method == "int8" else r * c // 2 + 4 * r * c // GROUP for r, c in shapes)
    assert info.weight_bytes == weight_bytes(cfg, "float32") - sum(4 * r * c for r, c in shapes) + held
    assert info.weight_bytes == weight_bytes(cfg, method)  # what the worker planned its memory with
    assert len(out.token_ids) == 6
    assert f"weights {method} linears + float32" in worker.log.read_text()
