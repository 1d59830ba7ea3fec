"""LoRA at serve time: a worker started with ``--adapter NAME=DIR`` serves base and adapter
requests side by side in one batch, each as the core computes it; ModelInfo lists the adapter."""
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from internlm_core.generation import SamplingParams, SequenceState, generate
from services.pb_convert import sampling_to_pb
from services.pb import common_pb2, inference_pb2, inference_pb2_grpc
from tests.helpers import free_port, serving_adapter
from tests.services.conftest import WORKER_LEN, Service

NAME = "sea-lora"


@pytest.fixture(scope="module")
def adapter_dir(chat_model_dir, tmp_path_factory):
    return serving_adapter(chat_model_dir, tmp_path_factory.mktemp("lora") / NAME)


@pytest.fixture(scope="module")
def lora_worker(chat_model_dir, adapter_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("lora-worker") / "worker.log"
    s = Service("services.inference_worker", ["--model", str(chat_model_dir), "--redis-url", "", "--max-batch", "2",
                                    "--max-len", str(WORKER_LEN), "--adapter", f"{NAME}={adapter_dir}"],
                log, free_port(), free_port())
    yield s.wait_healthy()
    s.stop()


def with_adapter(chat_model_dir, adapter_dir, tok, prompt, params):
    """The core's answer for a prompt under the adapter: prefill and decode with its index."""
    from internlm_core.engine import Engine
    from internlm_core.loader import load_model

    engine = Engine(load_model(chat_model_dir), max_batch=1, max_len=WORKER_LEN)
    index = engine.load_adapter(NAME, adapter_dir)
    state = SequenceState(prompt, params, tok, engine.config.vocab_size)
    logits = engine.prefill([0], [prompt], adapters=[index])[0]
    while True:
        ev = state.step(logits, engine.max_len)
        if ev.finish_reason:
            return state.generated
        logits = engine.decode(np.array([ev.token_id]), np.array([state.length - 1]), adapters=[index])[0]


def test_adapter_and_base_requests_share_a_batch(lora_worker, chat_model_dir, adapter_dir, core_engine,
                                                 core_tokenizer):
    s = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(lora_worker.address))
    assert list(s.ModelInfo(inference_pb2.ModelInfoRequest(), timeout=30).adapters) == [NAME]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    prompt = core_tokenizer.encode("The sea was")
    base_req = inference_pb2.GenerateRequest(ids=common_pb2.TokenIds(ids=prompt), params=sampling_to_pb(params))
    lora_req = inference_pb2.GenerateRequest(ids=common_pb2.TokenIds(ids=prompt), params=sampling_to_pb(params),
                                             adapter=NAME)
    steps0, rows0 = lora_worker.metric("internlm_batch_size_count"), lora_worker.metric("internlm_batch_size_sum")
    with ThreadPoolExecutor(2) as pool:
        base, lora = pool.map(lambda r: s.GenerateUnary(r, timeout=60), [base_req, lora_req])
    steps = lora_worker.metric("internlm_batch_size_count") - steps0
    rows = lora_worker.metric("internlm_batch_size_sum") - rows0
    assert rows > steps, (rows, steps)  # some decode steps ran both requests' rows, base and adapter together
    assert list(base.token_ids) == [e.token_id for e in generate(core_engine, prompt, params, core_tokenizer)]
    assert list(lora.token_ids) == with_adapter(chat_model_dir, adapter_dir, core_tokenizer, prompt, params)
    assert list(lora.token_ids) != list(base.token_ids)  # the adapter really changes the model
