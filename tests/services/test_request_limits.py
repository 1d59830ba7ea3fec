"""The sizes a gRPC request may have beyond its sampling parameters (``internlm_core.generation``:
MAX_PROMPT_CHARS, MAX_PROMPT_IDS, MAX_NAME_CHARS), the same as the HTTP door's: a prompt's text or
chat over the bound is refused by its size before any tokenizing, token ids by their count, model
and adapter names by their length (an unknown name is quoted back, and a quote of megabytes made
the refusal itself too large: RESOURCE_EXHAUSTED, which the endpoint retries). At the endpoint and
at the worker behind it."""
from __future__ import annotations

import grpc
import httpx
import pytest

from internlm_core.generation import MAX_NAME_CHARS, MAX_PROMPT_CHARS, MAX_PROMPT_IDS
from services.pb import common_pb2, inference_pb2, inference_pb2_grpc

PARAMS = common_pb2.SamplingParams(max_new_tokens=2)
OVER = {
    "text": (inference_pb2.GenerateRequest(text="a" * (MAX_PROMPT_CHARS + 1), params=PARAMS),
             f"text: {MAX_PROMPT_CHARS + 1} characters, over the {MAX_PROMPT_CHARS}"),
    "chat": (inference_pb2.GenerateRequest(chat=common_pb2.ChatMessages(messages=[
        common_pb2.ChatMessage(role="system", content="a" * (MAX_PROMPT_CHARS // 2)),
        common_pb2.ChatMessage(role="user", content="b" * (MAX_PROMPT_CHARS // 2 + 1))]), params=PARAMS),
             f"chat: {MAX_PROMPT_CHARS + 1} characters, over the {MAX_PROMPT_CHARS}"),
    "ids": (inference_pb2.GenerateRequest(ids=common_pb2.TokenIds(ids=[1] * (MAX_PROMPT_IDS + 1)), params=PARAMS),
            f"ids: {MAX_PROMPT_IDS + 1} token ids, over the {MAX_PROMPT_IDS}"),
    "model": (inference_pb2.GenerateRequest(text="Hello", model="m" * 2_000_000, params=PARAMS),
              f"model: 2000000 characters, over the {MAX_NAME_CHARS}"),
    "adapter": (inference_pb2.GenerateRequest(text="Hello", adapter="a" * (MAX_NAME_CHARS + 1), params=PARAMS),
                f"adapter: {MAX_NAME_CHARS + 1} characters, over the {MAX_NAME_CHARS}"),
}


@pytest.mark.parametrize("server", ["endpoint", "worker"])
@pytest.mark.parametrize("case", list(OVER))
def test_oversized_prompts_and_names_are_refused_by_size(endpoint, worker, server, case):
    request, message = OVER[case]
    address = (endpoint if server == "endpoint" else worker).address
    with grpc.insecure_channel(address) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        for call in (lambda: list(stub.Generate(request, timeout=30)), lambda: stub.GenerateUnary(request, timeout=30)):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details(), e.value
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfo(inference_pb2.ModelInfoRequest(model="m" * (MAX_NAME_CHARS + 1)), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "model:" in e.value.details()
        # Within the bounds, the same requests are served (or refused for what they are).
        assert stub.GenerateUnary(inference_pb2.GenerateRequest(text="Hello", params=PARAMS), timeout=30).token_ids


def test_http_model_names_are_bounded(http):
    r = httpx.post(f"{http.base}/v1/completions", timeout=30,
                   json={"prompt": "Hello", "max_tokens": 2, "model": "m" * (MAX_NAME_CHARS + 1)})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text
