"""An InternLM2 checkpoint as InternLM publishes it (the real tokenizer.model, whose chat ids are
named [UNUSED_TOKEN_*], and the tokenizer_config.json that names them <|im_start|> etc.) served by a
real worker behind a real endpoint and tokenizer service: the published chat ids on the gRPC chat
path, on ``/v1/chat/completions`` and from the tokenizer service's template, the same tokens as the
core; and a worker refusing a folder whose tokenizer cannot speak its family's chat format."""
from __future__ import annotations

import shutil
import subprocess
import sys

import grpc
import httpx
import pytest

from internlm_core.convert import hf_to_ms
from internlm_core.engine import Engine
from internlm_core.generation import SamplingParams, generate
from internlm_core.loader import load_model
from internlm_core.tokenizer import Tokenizer
from services.pb import common_pb2, inference_pb2, inference_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc
from services.pb_convert import chat_to_pb
from tests.helpers import REPO, V2_TOKENIZER, internlm2_checkpoint
from tests.services.conftest import model_stack

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "讲一个关于河流的故事。"}]


@pytest.fixture(scope="module")
def v2_stack(tmp_path_factory):
    """(model folder, worker, endpoint with HTTP, tokenizer service, HF reference chat ids of CHAT)."""
    from transformers import LlamaTokenizer

    root = tmp_path_factory.mktemp("v2-stack")
    _, hf = internlm2_checkpoint(root / "hf", seed=5)
    model_dir = root / "internlm2-tiny"
    hf_to_ms(hf, model_dir)
    # the reference tokenizer: see tests/test_tokenizer_internlm2.py for why LlamaTokenizer(legacy=True)
    ref_ids = list(LlamaTokenizer.from_pretrained(str(hf), legacy=True).apply_chat_template(
        CHAT, add_generation_prompt=True, tokenize=True))
    with model_stack(model_dir, root, "v2", "--max-len", "128") as (worker, endpoint, tok):
        yield model_dir, worker, endpoint, tok, ref_ids


def core_answer(model_dir, prompt, n):
    tok = Tokenizer.for_model(model_dir, "internlm2")
    engine = Engine(load_model(model_dir), max_batch=1, max_len=128)
    events = list(generate(engine, prompt, SamplingParams(max_new_tokens=n, temperature=0.0), tok))
    return [e.token_id for e in events], "".join(e.text for e in events)


def test_grpc_chat_uses_the_published_chat_ids(v2_stack):
    model_dir, worker, _, _, ref_ids = v2_stack
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(worker.address))
    served = stub.GenerateUnary(inference_pb2.GenerateRequest(
        chat=chat_to_pb(CHAT), params=common_pb2.SamplingParams(max_new_tokens=12)), timeout=60)
    ids, text = core_answer(model_dir, ref_ids, 12)
    assert served.finish.prompt_tokens == len(ref_ids)
    assert list(served.token_ids) == ids and served.text == text and "[UNUSED_TOKEN" not in served.text


def test_http_chat_completions_use_the_published_chat_ids(v2_stack):
    model_dir, _, endpoint, _, ref_ids = v2_stack
    r = httpx.post(f"{endpoint.base}/v1/chat/completions", timeout=60,
                   json={"model": model_dir.name, "messages": CHAT, "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    _, text = core_answer(model_dir, ref_ids, 12)
    assert body["usage"]["prompt_tokens"] == len(ref_ids)
    assert body["choices"][0]["message"]["content"] == text


def test_the_tokenizer_service_renders_the_published_template(v2_stack):
    *_, tok, ref_ids = v2_stack
    stub = tokenizer_pb2_grpc.TokenizerStub(grpc.insecure_channel(tok.address))
    r = stub.ApplyChatTemplate(tokenizer_pb2.ChatTemplateRequest(messages=chat_to_pb(CHAT).messages),
                               timeout=30)
    assert list(r.ids) == ref_ids
    assert r.text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n") and r.text.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("tokenizer_files, message", [
    ((), "has no tokenizer.model: an internlm2 model needs its own tokenizer"),
    (("tokenizer.model",), "the internlm2 chat format needs <|im_end|>, <|im_start|>, which this tokenizer does not "
                           "have: tokenizer.model has no such pieces and there is no"),
], ids=["no tokenizer", "no tokenizer_config.json"])
def test_a_worker_refuses_a_folder_whose_tokenizer_cannot_speak_its_format(tmp_path, tokenizer_files, message):
    """Served anyway, such a model would chat in the wrong format and never stop: the worker exits
    at start, before loading the weights, saying which file should have named the tokens."""
    _, hf = internlm2_checkpoint(tmp_path / "hf", seed=5)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (hf / name).unlink()
    hf_to_ms(hf, tmp_path / "ms")
    (tmp_path / "ms" / "tokenizer.model").unlink()  # conversion gives a folder without one the bundled v1 tokenizer
    for name in tokenizer_files:
        shutil.copyfile(V2_TOKENIZER / name, tmp_path / "ms" / name)
    out = subprocess.run([sys.executable, "-m", "services.inference_worker", "--model", str(tmp_path / "ms"),
                          "--redis-url", "", "--port", "0"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert message in out.stderr + out.stdout
