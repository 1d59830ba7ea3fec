"""Conversions between the protobuf messages and the core's types (from_pb / to_pb)."""
from __future__ import annotations

from internlm_core.generation import (FINISH_ABORTED, FINISH_EOS, FINISH_LENGTH, FINISH_STOP, MAX_NAME_CHARS,
                                      MAX_PROMPT_CHARS, MAX_PROMPT_IDS, SCALAR_PARAMS, SamplingParams)

from internlm_core.structured import Grammar
from internlm_core.tokenizer import thinking_chat
from internlm_core.tools import FINISH_TOOL_CALLS, Tool, ToolCallDelta, Tools

from services.pb import common_pb2, inference_pb2

FINISH_TO_PB = {
    FINISH_LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FINISH_EOS: common_pb2.FINISH_REASON_EOS,
    FINISH_STOP: common_pb2.FINISH_REASON_STOP_SEQUENCE,
    FINISH_ABORTED: common_pb2.FINISH_REASON_ABORTED,
    FINISH_TOOL_CALLS: common_pb2.FINISH_REASON_TOOL_CALLS,
}
FINISH_FROM_PB = {v: k for k, v in FINISH_TO_PB.items()}

def sampling_from_pb(p: common_pb2.SamplingParams) -> SamplingParams:
    """Unset fields keep the core's defaults; the values are checked by ``validate`` (ValueError)."""
    kw = {name: getattr(p, name) for name in SCALAR_PARAMS if p.HasField(name)}
    kw["stop"] = tuple(p.stop)
    if p.HasField("stop_token_ids"):
        kw["stop_token_ids"] = tuple(p.stop_token_ids.ids)
    if p.HasField("grammar"):
        kw["grammar"] = grammar_from_pb(p.grammar)
    if p.HasField("speculate"):
        kw["speculate"] = p.speculate
    return SamplingParams(ignore_eos=p.ignore_eos, logprobs=p.logprobs, **kw).validate()


def sampling_to_pb(s: SamplingParams) -> common_pb2.SamplingParams:
    p = common_pb2.SamplingParams(stop=list(s.stop), ignore_eos=s.ignore_eos, logprobs=s.logprobs,
                                  speculate=s.speculate)
    for name in SCALAR_PARAMS:
        value = getattr(s, name)
        if value is not None:
            setattr(p, name, value)
    if s.stop_token_ids is not None:
        p.stop_token_ids.ids.extend(s.stop_token_ids)
    if s.grammar is not None:
        p.grammar.CopyFrom(grammar_to_pb(s.grammar))
    return p


def grammar_from_pb(g: common_pb2.Grammar) -> Grammar:
    kind = g.WhichOneof("kind")
    if kind is None or (kind == "json_object" and not g.json_object):
        raise ValueError("grammar: set one of json_schema, json_object (true), regex, choice, lark")
    if kind == "choice":
        return Grammar("choice", choices=tuple(g.choice.choices))
    return Grammar(kind, "" if kind == "json_object" else getattr(g, kind))


def grammar_to_pb(g: Grammar) -> common_pb2.Grammar:
    if g.kind == "choice":
        return common_pb2.Grammar(choice=common_pb2.Choices(choices=list(g.choices)))
    return common_pb2.Grammar(**{g.kind: True if g.kind == "json_object" else g.text})


def chat_from_pb(messages) -> list[dict]:
    out = []
    for m in messages:
        out.append({"role": m.role, "content": m.content})
        if m.tool_calls:
            out[-1]["tool_calls"] = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in m.tool_calls]
        if m.tool_call_id:
            out[-1]["tool_call_id"] = m.tool_call_id
        if m.name:
            out[-1]["name"] = m.name
    return out


def chat_to_pb(messages: list[dict]) -> common_pb2.ChatMessages:
    return common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(
        role=m["role"], content=m["content"], tool_call_id=m.get("tool_call_id", ""), name=m.get("name", ""),
        tool_calls=[common_pb2.ToolCall(**c) for c in m.get("tool_calls", ())]) for m in messages])


def tools_from_pb(request: inference_pb2.GenerateRequest) -> Tools | None:
    """The request's tools and tool choice (checked), or None when it has none."""
    choice = request.tool_choice.WhichOneof("choice") if request.HasField("tool_choice") else None
    if not request.tools:
        if choice is not None:
            raise ValueError("tool_choice: the request has no tools")
        return None
    mode = getattr(request.tool_choice, choice) if choice else "auto"
    if choice == "mode" and mode not in ("auto", "none", "required"):
        raise ValueError(f"tool_choice.mode must be auto, none or required, got {mode!r} "
                         f"(a tool: tool_choice.function)")
    parallel = request.parallel_tool_calls if request.HasField("parallel_tool_calls") else True
    return Tools(tools_of(request.tools), mode, parallel).validate()


def tools_of(tools) -> tuple[Tool, ...]:
    return tuple(Tool(t.name, t.description, t.parameters) for t in tools)


def tools_to_pb(tools: Tools) -> dict:
    """GenerateRequest's fields for ``tools``."""
    choice = ({"mode": tools.choice} if tools.choice in ("auto", "none", "required") else {"function": tools.choice})
    return {"tools": [common_pb2.Tool(name=t.name, description=t.description, parameters=t.parameters)
                      for t in tools.tools],
            "tool_choice": common_pb2.ToolChoice(**choice), "parallel_tool_calls": tools.parallel}


def prompt_from_pb(request: inference_pb2.GenerateRequest, tokenizer, tools: Tools | None = None) -> list[int]:
    """Token ids of the request's prompt (text gets <s>; chat gets the InternLM template, with
    ``tools`` listed); special-token strings typed in text or content are plain text unless the
    request sets allow_special_tokens."""
    kind = request.WhichOneof("prompt")
    if kind is None:
        raise ValueError("the request has no prompt: set one of text, ids, chat")
    if tools is not None and kind != "chat":
        raise ValueError("tools: need a chat prompt (they are listed in the chat's template)")
    if request.thinking and kind != "chat":
        raise ValueError("thinking: needs a chat prompt (thinking mode is a system turn)")
    if kind == "text":
        if not request.text:
            raise ValueError("empty prompt")
        check_size(len(request.text), MAX_PROMPT_CHARS, "text", "characters")
        return tokenizer.encode(request.text, allow_special=request.allow_special_tokens)
    if kind == "ids":
        check_size(len(request.ids.ids), MAX_PROMPT_IDS, "ids", "token ids")
        return list(request.ids.ids)
    check_size(sum(len(m.content) for m in request.chat.messages), MAX_PROMPT_CHARS, "chat", "characters")
    messages = chat_from_pb(request.chat.messages)
    if request.thinking:
        messages = thinking_chat(messages, tokenizer.family)
    return tokenizer.encode_chat(messages, allow_special=request.allow_special_tokens,
                                 tools=tools.listed() if tools else None)


def check_names(request) -> None:
    """A request's model and adapter names within MAX_NAME_CHARS (ValueError otherwise)."""
    for name in ("model", "adapter"):
        if name in request.DESCRIPTOR.fields_by_name:
            check_size(len(getattr(request, name)), MAX_NAME_CHARS, name, "characters")


def check_size(size: int, limit: int, field: str, unit: str) -> None:
    """ValueError naming ``field`` when ``size`` (in ``unit``) is over ``limit``."""
    if size > limit:
        raise ValueError(f"{field}: {size} {unit}, over the {limit} this server takes")


def chunk_to_pb(events, finish=None, text: str | None = None,
                tool_calls: list[ToolCallDelta] = (), token_text=None) -> inference_pb2.GenerateResponse:
    """One streamed message from consecutive TokenEvents; ``finish`` on the last one. With tools,
    ``text`` (the content) and ``tool_calls`` come from the answer's ToolCallParser. ``token_text``
    (id -> its text, the serving tokenizer's): given when logprobs were asked for, names each
    token (``tokens``) and each top alternative."""
    r = inference_pb2.GenerateResponse(token_ids=[e.token_id for e in events],
                                       text="".join(e.text for e in events) if text is None else text,
                                       tool_calls=[common_pb2.ToolCall(index=d.index, id=d.id, name=d.name,
                                                                       arguments=d.arguments) for d in tool_calls])
    r.logprobs.extend(e.logprob for e in events if e.logprob is not None)
    if token_text is not None:
        r.tokens.extend(token_text(e.token_id) for e in events)
    for e in events:
        if e.top_logprobs is not None:
            ids = [i for i, _ in e.top_logprobs]
            r.top_logprobs.add(ids=ids, logprobs=[lp for _, lp in e.top_logprobs],
                               tokens=[token_text(i) for i in ids] if token_text is not None else [])
    if finish is not None:
        r.finish.CopyFrom(finish)
    return r


def finish_to_pb(reason: str, prompt_tokens: int, completion_tokens: int, seed: int) -> inference_pb2.FinishInfo:
    return inference_pb2.FinishInfo(reason=FINISH_TO_PB[reason], prompt_tokens=prompt_tokens,
                                    completion_tokens=completion_tokens, seed=seed)


def join_chunks(chunks) -> inference_pb2.GenerateResponse:
    """A stream's messages joined into the unary answer (each tool call whole)."""
    out = inference_pb2.GenerateResponse()
    texts, calls = [], {}
    for c in chunks:
        out.token_ids.extend(c.token_ids)
        out.logprobs.extend(c.logprobs)
        out.tokens.extend(c.tokens)
        out.top_logprobs.extend(c.top_logprobs)
        texts.append(c.text)
        for piece in c.tool_calls:
            call = calls.setdefault(piece.index, common_pb2.ToolCall(index=piece.index))
            call.id, call.name = call.id or piece.id, call.name or piece.name
            call.arguments += piece.arguments
        if c.HasField("finish"):
            out.finish.CopyFrom(c.finish)
    out.text = "".join(texts)
    out.tool_calls.extend(calls[i] for i in sorted(calls))
    return out
