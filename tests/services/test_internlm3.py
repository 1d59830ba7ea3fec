"""A tiny InternLM3 (8 query heads on 2 k/v heads, head_dim 16 given explicitly, its own
tokenizer files naming the chat ids) converted from its HF folder and served by a real worker
behind a real endpoint: gRPC chat and ``/v1/chat/completions`` give the core's tokens for the
ChatML prompt with the checkpoint's own ids."""
from __future__ import annotations

import shutil

import grpc
import httpx
import pytest

from internlm_core.config import Config
from internlm_core.convert import hf_to_ms
from internlm_core.engine import Engine
from internlm_core.generation import SamplingParams, generate
from internlm_core.loader import load_model
from internlm_core.tokenizer import Tokenizer
from services.pb import common_pb2, inference_pb2, inference_pb2_grpc
from services.pb_convert import chat_to_pb
from tests.helpers import hf_reference_model, save_internlm3_folder, v3_tokenizer_folder
from tests.services.conftest import model_stack

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell a story about a river."}]


@pytest.fixture(scope="module")
def v3_stack(tmp_path_factory):
    """(model folder, worker, endpoint with HTTP)."""
    root = tmp_path_factory.mktemp("v3-stack")
    cfg = Config.from_name("tiny-v3")
    hf = save_internlm3_folder(hf_reference_model(cfg, seed=5), cfg, root / "hf")
    tok = v3_tokenizer_folder(root / "tok", cfg.vocab_size)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(tok / name, hf / name)
    model_dir = root / "internlm3-tiny"
    hf_to_ms(hf, model_dir)
    # room for thinking mode's long system prompt (dynamic NTK past the 64 trained positions)
    with model_stack(model_dir, root, "v3", "--max-len", "2048") as (worker, endpoint, _):
        yield model_dir, worker, endpoint


def core_answer(model_dir, n):
    tok = Tokenizer.for_model(model_dir, "internlm3")
    prompt = tok.encode_chat(CHAT)
    engine = Engine(load_model(model_dir), max_batch=1, max_len=2048)
    events = list(generate(engine, prompt, SamplingParams(max_new_tokens=n, temperature=0.0), tok))
    return prompt, [e.token_id for e in events], "".join(e.text for e in events)


def test_grpc_and_http_chat_give_the_cores_tokens_with_the_checkpoints_chat_ids(v3_stack):
    model_dir, worker, endpoint = v3_stack
    prompt, ids, text = core_answer(model_dir, 12)
    tok = Tokenizer.for_model(model_dir, "internlm3")
    assert prompt[1] == tok.special_tokens["<|im_start|>"] == tok.sp.piece_to_id("[UNUSED_TOKEN_0]")
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(worker.address))
    served = stub.GenerateUnary(inference_pb2.GenerateRequest(
        chat=chat_to_pb(CHAT), params=common_pb2.SamplingParams(max_new_tokens=12)), timeout=60)
    assert served.finish.prompt_tokens == len(prompt) and list(served.token_ids) == ids and served.text == text
    r = httpx.post(f"{endpoint.base}/v1/chat/completions", timeout=60,
                   json={"model": model_dir.name, "messages": CHAT, "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["prompt_tokens"] == len(prompt) and body["choices"][0]["message"]["content"] == text


def test_thinking_mode_over_http_and_grpc_puts_the_published_prompt_first(v3_stack):
    """``chat_template_kwargs: {"thinking": true}`` (HTTP) and ``GenerateRequest.thinking`` (gRPC):
    the worker renders InternLM3's thinking system prompt first; a chat with its own system prompt, a
    prompt that is not a chat and an unknown template switch are refused, naming the reason."""
    from internlm_core.tokenizer import thinking_chat

    model_dir, worker, endpoint = v3_stack
    tok = Tokenizer.for_model(model_dir, "internlm3")
    user = [{"role": "user", "content": "What is 17 * 23?"}]
    want = len(tok.encode_chat(thinking_chat(user, "internlm3")))
    assert want > 1000
    url = f"{endpoint.base}/v1/chat/completions"
    r = httpx.post(url, timeout=120, json={"model": model_dir.name, "messages": user, "max_tokens": 2,
                                           "chat_template_kwargs": {"thinking": True}})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == want
    plain = httpx.post(url, timeout=60, json={"model": model_dir.name, "messages": user, "max_tokens": 2})
    assert plain.json()["usage"]["prompt_tokens"] == len(tok.encode_chat(user))
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(worker.address))
    served = stub.GenerateUnary(inference_pb2.GenerateRequest(
        chat=chat_to_pb(user), thinking=True, params=common_pb2.SamplingParams(max_new_tokens=2)), timeout=120)
    assert served.finish.prompt_tokens == want
    own = httpx.post(url, timeout=60, json={"model": model_dir.name, "messages": CHAT, "max_tokens": 2,
                                            "chat_template_kwargs": {"thinking": True}})
    assert own.status_code == 400 and "thinking mode sets the system prompt" in own.text
    with pytest.raises(grpc.RpcError) as e:
        stub.GenerateUnary(inference_pb2.GenerateRequest(text="hi", thinking=True), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "thinking: needs a chat prompt" in e.value.details()
    other = httpx.post(url, timeout=60, json={"model": model_dir.name, "messages": user, "max_tokens": 2,
                                              "chat_template_kwargs": {"enable_thinking": True}})
    assert other.status_code == 400 and "enable_thinking" in other.text


def test_a_family_without_thinking_mode_is_refused():
    from internlm_core.errors import TokenizerError
    from services.pb_convert import prompt_from_pb
    from tests.helpers import V2_TOKENIZER

    request = inference_pb2.GenerateRequest(chat=chat_to_pb([{"role": "user", "content": "hi"}]), thinking=True)
    with pytest.raises(TokenizerError, match="internlm2 has no thinking mode"):
        prompt_from_pb(request, Tokenizer(V2_TOKENIZER))
