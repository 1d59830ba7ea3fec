"""Conversions between the protobuf messages and the core's types (from_pb / to_pb)."""
from __future__ import annotations

from internlm_core.generation import (FINISH_ABORTED, FINISH_EOS, FINISH_LENGTH, FINISH_STOP, MAX_NAME_CHARS,
                                      MAX_PROMPT_CHARS, MAX_PROMPT_IDS, SCALAR_PARAMS, SamplingParams)

from internlm_core.structured import Grammar

from services.pb import common_pb2, inference_pb2

FINISH_TO_PB = {
    FINISH_LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FINISH_EOS: common_pb2.FINISH_REASON_EOS,
    FINISH_STOP: common_pb2.FINISH_REASON_STOP_SEQUENCE,
    FINISH_ABORTED: common_pb2.FINISH_REASON_ABORTED,
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
    return SamplingParams(ignore_eos=p.ignore_eos, logprobs=p.logprobs, **kw).validate()


def sampling_to_pb(s: SamplingParams) -> common_pb2.SamplingParams:
    p = common_pb2.SamplingParams(stop=list(s.stop), ignore_eos=s.ignore_eos, logprobs=s.logprobs)
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
    return [{"role": m.role, "content": m.content} for m in messages]


def chat_to_pb(messages: list[dict]) -> common_pb2.ChatMessages:
    return common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(**m) for m in messages])


def prompt_from_pb(request: inference_pb2.GenerateRequest, tokenizer) -> list[int]:
    """Token ids of the request's prompt (text gets <s>; chat gets the InternLM template); special-token
    strings typed in text or content are plain text unless the request sets allow_special_tokens."""
    kind = request.WhichOneof("prompt")
    if kind is None:
        raise ValueError("the request has no prompt: set one of text, ids, chat")
    if kind == "text":
        if not request.text:
            raise ValueError("empty prompt")
        check_size(len(request.text), MAX_PROMPT_CHARS, "text", "characters")
        return tokenizer.encode(request.text, allow_special=request.allow_special_tokens)
    if kind == "ids":
        check_size(len(request.ids.ids), MAX_PROMPT_IDS, "ids", "token ids")
        return list(request.ids.ids)
    check_size(sum(len(m.content) for m in request.chat.messages), MAX_PROMPT_CHARS, "chat", "characters")
    return tokenizer.encode_chat(chat_from_pb(request.chat.messages), allow_special=request.allow_special_tokens)


def check_names(request) -> None:
    """A request's model and adapter names within MAX_NAME_CHARS (ValueError otherwise)."""
    for name in ("model", "adapter"):
        if name in request.DESCRIPTOR.fields_by_name:
            check_size(len(getattr(request, name)), MAX_NAME_CHARS, name, "characters")


def check_size(size: int, limit: int, field: str, unit: str) -> None:
    """ValueError naming ``field`` when ``size`` (in ``unit``) is over ``limit``."""
    if size > limit:
        raise ValueError(f"{field}: {size} {unit}, over the {limit} this server takes")


def chunk_to_pb(events, finish=None) -> inference_pb2.GenerateResponse:
    """One streamed message from consecutive TokenEvents; ``finish`` on the last one."""
    r = inference_pb2.GenerateResponse(token_ids=[e.token_id for e in events], text="".join(e.text for e in events))
    r.logprobs.extend(e.logprob for e in events if e.logprob is not None)
    for e in events:
        if e.top_logprobs is not None:
            r.top_logprobs.add(ids=[i for i, _ in e.top_logprobs], logprobs=[lp for _, lp in e.top_logprobs])
    if finish is not None:
        r.finish.CopyFrom(finish)
    return r


def finish_to_pb(reason: str, prompt_tokens: int, completion_tokens: int, seed: int) -> inference_pb2.FinishInfo:
    return inference_pb2.FinishInfo(reason=FINISH_TO_PB[reason], prompt_tokens=prompt_tokens,
                                    completion_tokens=completion_tokens, seed=seed)


def join_chunks(chunks) -> inference_pb2.GenerateResponse:
    """A stream's messages joined into the unary answer."""
    out = inference_pb2.GenerateResponse()
    texts = []
    for c in chunks:
        out.token_ids.extend(c.token_ids)
        out.logprobs.extend(c.logprobs)
        out.top_logprobs.extend(c.top_logprobs)
        texts.append(c.text)
        if c.HasField("finish"):
            out.finish.CopyFrom(c.finish)
    out.text = "".join(texts)
    return out
