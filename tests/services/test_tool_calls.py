"""Tool calls against a real endpoint, tokenizer service and worker serving a tiny InternLM2 model (the
real InternLM2 tokenizer): the official ``openai`` client's tool loop (two tools, the call plain and
streamed, the result sent back as a ``tool`` message rendered as an environment turn, several calls
in one turn), the same over gRPC, the refusals; and InternLM v1 (the session's model) refused.

The model is random, so its answers are driven with the constraint (``tool_choice`` required or a
named tool); the parsing, rendering and streaming are each checked against the real tokenizer's ids."""
from __future__ import annotations

import json

import grpc
import httpx
import pytest

from internlm_core.convert import hf_to_ms
from internlm_core.tokenizer import Tokenizer
from internlm_core.tools import Tools, parse_answer
from services.pb import common_pb2, inference_pb2, inference_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc
from services.pb_convert import chat_to_pb, join_chunks
from tests.helpers import internlm2_checkpoint
from tests.services.conftest import model_stack
from tests.test_tools import ACTION_START, IM_END, IM_START, PLUGIN, TIME, WEATHER

jsonschema = pytest.importorskip("jsonschema")
openai = pytest.importorskip("openai")

SCHEMAS = {t.name: json.loads(t.parameters) for t in (WEATHER, TIME)}
TOOLS = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                           "parameters": json.loads(t.parameters)}} for t in (WEATHER, TIME)]
PB_TOOLS = [common_pb2.Tool(name=t.name, description=t.description, parameters=t.parameters) for t in (WEATHER, TIME)]
ASK = [{"role": "user", "content": "What is the weather in Paris, and the time there?"}]


@pytest.fixture(scope="module")
def v2(tmp_path_factory):
    """(model folder, worker, endpoint with HTTP, tokenizer service) for a tiny InternLM2 model."""
    root = tmp_path_factory.mktemp("tools-stack")
    _, hf = internlm2_checkpoint(root / "hf", seed=5, max_position_embeddings=512)
    model_dir = root / "internlm2-tools"
    hf_to_ms(hf, model_dir)
    with model_stack(model_dir, root, "tools", "--max-len", "512", "--max-batch", "4") as (worker, endpoint, tok):
        yield model_dir, worker, endpoint, tok


@pytest.fixture(scope="module")
def client(v2):
    return openai.OpenAI(base_url=f"{v2[2].base}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tok(v2):
    return Tokenizer.for_model(v2[0], "internlm2")


def valid_call(call) -> bool:
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return call.id.startswith("call_") and call.type == "function"


def test_the_openai_tool_loop(client, v2, tok):
    model = v2[0].name
    ask = dict(model=model, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
               temperature=1.0, seed=7, max_tokens=80)
    plain = client.chat.completions.create(**ask)
    choice = plain.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert valid_call(call)

    # streamed: the name first (with id and type), then the arguments in pieces; no content
    chunks = list(client.chat.completions.create(**ask, stream=True))
    pieces = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert pieces[0].id.startswith("call_") and pieces[0].type == "function"
    assert pieces[0].function.name == call.function.name and pieces[0].function.arguments == ""
    assert all(p.index == 0 and p.id is None and p.function.name is None for p in pieces[1:])
    assert len(pieces) > 2
    assert "".join(p.function.arguments for p in pieces) == call.function.arguments
    assert all(not c.choices[0].delta.content for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # the result goes back as a tool message: an environment turn, exactly these ids
    result = '{"sky": "clear", "celsius": 21}'
    history = ASK + [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": result}]
    stub = tokenizer_pb2_grpc.TokenizerStub(grpc.insecure_channel(v2[3].address))
    core_history = ASK + [{"role": "assistant", "content": "", "tool_calls": [
        {"id": call.id, "name": call.function.name, "arguments": call.function.arguments}]},
        {"role": "tool", "content": result, "tool_call_id": call.id}]
    served = list(stub.ApplyChatTemplate(tokenizer_pb2.ChatTemplateRequest(
        messages=chat_to_pb(core_history).messages, tools=PB_TOOLS), timeout=30).ids)
    enc = lambda text: tok.encode(text, bos=False)  # noqa: E731
    call_json = json.dumps({"name": call.function.name, "parameters": json.loads(call.function.arguments)})
    tail = ([IM_START] + enc("assistant\n") + [ACTION_START, PLUGIN] + enc("\n" + call_json) + [tok.control_id(
        "<|action_end|>"), IM_END] + enc("\n") + [IM_START] + enc("environment name=") + [PLUGIN] + enc("\n" + result)
        + [IM_END] + enc("\n") + [IM_START] + enc("assistant\n"))
    assert served[-len(tail):] == tail
    assert served == tok.encode_chat(core_history, tools=Tools((WEATHER, TIME)).listed())
    answer = client.chat.completions.create(model=model, messages=history, tools=TOOLS, temperature=0, max_tokens=12)
    assert answer.usage.prompt_tokens == len(served)
    # the worker's prompt is those ids: its greedy answer is the core's from them
    from internlm_core.engine import Engine
    from internlm_core.generation import SamplingParams, generate
    from internlm_core.loader import load_model

    engine = Engine(load_model(v2[0]), max_batch=1, max_len=512)
    ids = [e.token_id for e in generate(engine, served, SamplingParams(max_new_tokens=12), tok)]
    content, calls = parse_answer(tok, [i for i in ids if i not in tok.stop_ids])
    assert answer.choices[0].message.content == content and not calls


def test_several_calls_in_one_turn(client, v2):
    r = client.chat.completions.create(model=v2[0].name, messages=ASK, tools=TOOLS, tool_choice="required",
                                       temperature=1.0, seed=1, n=8, max_tokens=160)
    counts = []
    for c in r.choices:
        if c.finish_reason == "length":  # a long string: cut short, still a call
            continue
        assert c.finish_reason == "tool_calls" and all(valid_call(t) for t in c.message.tool_calls)
        assert len({t.id for t in c.message.tool_calls}) == len(c.message.tool_calls)
        counts.append(len(c.message.tool_calls))
    assert len(counts) >= 6 and max(counts) >= 2, counts


def test_tool_calls_over_grpc_plain_and_streamed(v2, tok):
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(v2[2].address))
    request = inference_pb2.GenerateRequest(
        chat=chat_to_pb(ASK), params=common_pb2.SamplingParams(temperature=1.0, seed=3, max_new_tokens=80),
        tools=PB_TOOLS,
        tool_choice=common_pb2.ToolChoice(function="get_time"), parallel_tool_calls=False)
    unary = stub.GenerateUnary(request, timeout=120)
    assert unary.finish.reason == common_pb2.FINISH_REASON_TOOL_CALLS and unary.text == ""
    [call] = unary.tool_calls
    assert call.name == "get_time" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), SCHEMAS["get_time"])
    # the worker's calls are the core parser's of the same ids (less the stop id)
    content, calls = parse_answer(tok, [i for i in unary.token_ids if i not in tok.stop_ids])
    assert content == "" and [(c.name, c.arguments) for c in calls] == [(call.name, call.arguments)]
    stream = list(stub.Generate(request, timeout=120))
    pieces = [p for r in stream for p in r.tool_calls]
    assert pieces[0].name == "get_time" and pieces[0].id and not pieces[0].arguments
    assert "".join(p.arguments for p in pieces) == call.arguments and list(unary.token_ids) == [
        i for r in stream for i in r.token_ids]
    with pytest.raises(grpc.RpcError) as e:
        stub.GenerateUnary(inference_pb2.GenerateRequest(
            chat=chat_to_pb(ASK), tools=PB_TOOLS, tool_choice=common_pb2.ToolChoice(function="nope")), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no tool is named 'nope'" in e.value.details()


@pytest.mark.parametrize("extra, message", [
    ({"tools": TOOLS + TOOLS[:1]}, "the name 'get_weather' is given twice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "must be 1..64 letters"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "no tool is named 'nope'"),
    ({"tool_choice": "required"}, "tool_choice: the request has no tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "cannot be combined with a grammar"),
    ({"messages": [{"role": "tool", "content": "1"}]}, "a tool message needs tool_call_id"),
    ({"messages": [{"role": "user", "content": None}]}, "content is required"),
    ({"functions": [{"name": "f"}]}, "functions (deprecated by OpenAI: use tools and tool_choice)"),
])
def test_bad_tool_requests_are_a_400_naming_the_problem(v2, extra, message):
    body = {"model": v2[0].name, "messages": ASK, "max_tokens": 4, **extra}
    r = httpx.post(f"{v2[2].base}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"], r.json()


def test_internlm_v1_refuses_tools(http, endpoint):
    model = httpx.get(f"{http.base}/v1/models", timeout=30).json()["data"][0]["id"]
    r = httpx.post(f"{http.base}/v1/chat/completions", timeout=60,
                   json={"model": model, "messages": ASK, "tools": TOOLS, "max_tokens": 4})
    assert r.status_code == 400 and "(internlm) has no tool calls" in r.json()["error"]["message"], r.text
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(endpoint.address))
    with pytest.raises(grpc.RpcError) as e:
        stub.GenerateUnary(inference_pb2.GenerateRequest(chat=chat_to_pb(ASK), tools=[common_pb2.Tool(name="f")]),
                           timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "has no tool calls" in e.value.details()


def test_a_resumed_stream_goes_on_with_the_call_it_was_in(v2):
    """The endpoint resumes a stream on another worker with the tokens already sent (resume_ids): the
    worker's parser reads them first, so the rest of the call follows, not a new call or content."""
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(v2[1].address))
    request = inference_pb2.GenerateRequest(
        chat=chat_to_pb(ASK), params=common_pb2.SamplingParams(temperature=0, max_new_tokens=80),
        tools=PB_TOOLS,
        tool_choice=common_pb2.ToolChoice(mode="required"), parallel_tool_calls=False)
    whole = list(stub.Generate(request, timeout=120))
    [call] = join_chunks(whole).tool_calls
    ids = [i for r in whole for i in r.token_ids]
    m = next(k for k in range(1, len(whole)) if "".join(p.arguments for r in whole[:k] for p in r.tool_calls))
    sent = [p for r in whole[:m] for p in r.tool_calls]  # the name and some of the arguments
    request.resume_ids.extend(ids[:sum(len(r.token_ids) for r in whole[:m])])
    rest = list(stub.Generate(request, timeout=120))
    pieces = [p for r in rest for p in r.tool_calls]
    assert all(p.index == 0 and not p.name and not p.id for p in pieces) and pieces
    assert "".join(p.arguments for p in sent + pieces) == call.arguments
    assert "".join(r.text for r in rest) == "" and rest[-1].finish.reason == common_pb2.FINISH_REASON_TOOL_CALLS


def test_tool_choice_none_leaves_the_tools_out_of_the_prompt(client, v2, tok):
    ask = dict(model=v2[0].name, messages=ASK, tools=TOOLS, temperature=0, max_tokens=4)
    none = client.chat.completions.create(**ask, tool_choice="none")
    auto = client.chat.completions.create(**ask)
    assert none.usage.prompt_tokens == len(tok.encode_chat(ASK))
    assert auto.usage.prompt_tokens == len(tok.encode_chat(ASK, tools=Tools((WEATHER, TIME)).listed()))
    assert none.choices[0].message.tool_calls is None


def test_named_messages_render_their_names_on_both_doors(v2, client, tok, http):
    """A message's ``name`` reaches the prompt (``user name=...``, as InternLM's chat_format.md writes
    it) over HTTP and gRPC alike; a bad name is a 400 naming the field; v1 has no names."""
    named = [{"role": "user", "content": '[{"path": "data.csv"}]', "name": "file"},
             {"role": "user", "content": "Plot it.", "name": "alice"}]
    count = len(tok.encode_chat(named))
    assert count != len(tok.encode_chat([{k: v for k, v in m.items() if k != "name"} for m in named]))
    r = client.chat.completions.create(model=v2[0].name, messages=named, max_tokens=1)
    assert r.usage.prompt_tokens == count
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(v2[2].address))
    unary = stub.GenerateUnary(inference_pb2.GenerateRequest(
        chat=chat_to_pb(named), params=common_pb2.SamplingParams(max_new_tokens=1)), timeout=60)
    assert unary.finish.prompt_tokens == count
    bad = httpx.post(f"{v2[2].base}/v1/chat/completions", timeout=60, json={
        "model": v2[0].name, "max_tokens": 1, "messages": [{"role": "user", "content": "hi", "name": "two words"}]})
    assert bad.status_code == 400 and "name" in bad.json()["error"]["message"], bad.text
    model = httpx.get(f"{http.base}/v1/models", timeout=30).json()["data"][0]["id"]
    v1 = httpx.post(f"{http.base}/v1/chat/completions", timeout=60,
                    json={"model": model, "messages": named[1:], "max_tokens": 1})
    assert v1.status_code == 400 and "has no participant names" in v1.json()["error"]["message"], v1.text


def test_counted_tokens_list_the_tools_as_the_prompt_does(client, v2, tok):
    """CountTokens, from the tokenizer service and through the endpoint, counts a chat's tools as
    its prompt lists them: the ids ApplyChatTemplate gives, the prompt_tokens a completion reports;
    tools with a plain text are refused by name (a text has no prompt to list them in)."""
    chat = chat_to_pb(ASK)
    listed = len(tok.encode_chat(ASK, tools=Tools((WEATHER, TIME)).listed()))
    usage = client.chat.completions.create(model=v2[0].name, messages=ASK, tools=TOOLS, temperature=0,
                                           max_tokens=1).usage
    for address in (v2[3].address, v2[2].address):
        stub = tokenizer_pb2_grpc.TokenizerStub(grpc.insecure_channel(address))
        counted = stub.CountTokens(tokenizer_pb2.CountTokensRequest(chat=chat, tools=PB_TOOLS), timeout=30).count
        template = stub.ApplyChatTemplate(tokenizer_pb2.ChatTemplateRequest(messages=chat.messages, tools=PB_TOOLS),
                                          timeout=30).ids
        without = stub.CountTokens(tokenizer_pb2.CountTokensRequest(chat=chat), timeout=30).count
        assert counted == len(template) == listed == usage.prompt_tokens > without == len(tok.encode_chat(ASK))
        with pytest.raises(grpc.RpcError) as e:
            stub.CountTokens(tokenizer_pb2.CountTokensRequest(text="hi", tools=PB_TOOLS), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith("tools:")
