"""An InternLM2 model served by a real inference worker: its own tokenizer's chat format (ChatML)
on the gRPC chat path, the same tokens as the core, GQA's smaller KV cache in ModelInfo; and a
worker refusing a tokenizer of the wrong family at start."""
from __future__ import annotations

import shutil
import subprocess
import sys

import grpc

from internlm_core.config import Config
from internlm_core.convert import hf_to_ms
from internlm_core.engine import Engine
from internlm_core.generation import SamplingParams, generate
from internlm_core.loader import load_model
from internlm_core.tokenizer import Tokenizer
from services.pb import common_pb2, inference_pb2, inference_pb2_grpc
from services.pb_convert import chat_to_pb
from tests.helpers import REPO, hf_reference_model, save_internlm2_folder
from tests.services.conftest import start_worker

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The river"}]


def test_a_worker_serves_an_internlm2_chat_as_the_core_does(v2_tokenizer_file, tmp_path):
    cfg = Config.from_name("tiny-v2").replace(vocab_size=1200)  # the trained tokenizer's vocabulary
    hf = save_internlm2_folder(hf_reference_model(cfg, seed=5), cfg, tmp_path / "hf")
    shutil.copyfile(v2_tokenizer_file, hf / "tokenizer.model")
    model_dir = tmp_path / "ms"
    hf_to_ms(hf, model_dir)
    worker = start_worker(model_dir, "", tmp_path, "worker-v2", "--max-len", "128").wait_healthy()
    try:
        stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(worker.address))
        info = stub.ModelInfo(inference_pb2.ModelInfoRequest(), timeout=30)
        assert info.kv_cache_bytes_per_slot == 2 * cfg.num_layers * 128 * cfg.kv_heads * cfg.head_dim * 4
        params = SamplingParams(max_new_tokens=12, ignore_eos=True)
        served = stub.GenerateUnary(inference_pb2.GenerateRequest(
            chat=chat_to_pb(CHAT), params=common_pb2.SamplingParams(max_new_tokens=12, ignore_eos=True)), timeout=60)
        tok = Tokenizer(v2_tokenizer_file)
        prompt = tok.encode_chat(CHAT)
        assert served.finish.prompt_tokens == len(prompt)
        engine = Engine(load_model(model_dir), max_batch=1, max_len=128)
        assert list(served.token_ids) == [e.token_id for e in generate(engine, prompt, params, tok)]
    finally:
        worker.stop()


def test_a_worker_refuses_a_tokenizer_of_another_family(v2_tokenizer_file, tmp_path):
    """An InternLM2 model folder holding a v1 tokenizer (no <|im_end|>) would chat in the wrong
    format and never stop: the worker exits at start, saying so."""
    cfg = Config.from_name("tiny-v2")
    hf = save_internlm2_folder(hf_reference_model(cfg, seed=5), cfg, tmp_path / "hf")
    hf_to_ms(hf, tmp_path / "ms")  # no tokenizer in the folder: the worker would take the bundled v1 one
    out = subprocess.run([sys.executable, "-m", "services.inference_worker", "--model", str(tmp_path / "ms"),
                          "--redis-url", "", "--port", "0"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "no single piece for <|im_end|>, <|im_start|>" in out.stderr + out.stdout
