"""The OpenAI API's wire forms for the endpoint's HTTP side (``openai_api``): the request
models, named as OpenAI names them (with vLLM's extras), so that pydantic refuses a bad value with
a 400 naming the field; OpenAI's error object, the one table from gRPC status to HTTP status, and
the one table of the limits the HTTP side puts on a request (the README lists them).
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import grpc
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, model_validator
from pydantic_core import PydanticCustomError

from internlm_core.errors import ToolError
from internlm_core.generation import MAX_NAME_CHARS, MAX_PROMPT_CHARS, MAX_PROMPT_IDS, MAX_TOP_LOGPROBS  # noqa: F401
from internlm_core.tools import MAX_TOOLS, Tool, Tools

from services.pb import common_pb2
from services.server_common import reported_status, too_large

# ---- limits: every bound the HTTP side puts on a request, named here once --------------------
MAX_BODY_BYTES = 8 * 2 ** 20     # a request body: 413 (by Content-Length, or counted while reading)
HEAD_TIMEOUT_S = 10.0            # a request's line and headers, from the connection's start or the last answer: closed
BODY_TIMEOUT_S = 60.0            # a request body, from its headers to its last byte: 408
MAX_CONNECTIONS = 512            # connections (or requests) at once: 503 beyond (uvicorn's limit_concurrency)
MAX_N = 16                       # choices per request (each takes a worker slot)
MAX_LOGPROBS = 5                 # completions' logprobs: alternatives per token (OpenAI's bound)
# and the core's (internlm_core.generation), the same over gRPC: MAX_PROMPT_CHARS (a prompt's text,
# chat: all messages) and MAX_PROMPT_IDS, checked before tokenizing (400); MAX_NAME_CHARS (model);
# MAX_TOP_LOGPROBS (chat's top_logprobs, OpenAI's bound)
MAX_TOOLS_CHARS = 262_144        # a request's tools as JSON (all of them; MAX_TOOLS of them at most): 400

# gRPC status -> (HTTP status, OpenAI error type)
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
}
INT32 = 2 ** 31 - 1  # the protobuf fields behind the counts
UNION_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}
# core -> OpenAI
FINISH = {"length": "length", "eos": "stop", "stop": "stop", "aborted": "abort", "tool_calls": "tool_calls"}


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code or status}},
                        status_code=status)


def http_error(e: BaseException, where: str = "HTTP") -> tuple[int, str, str]:
    """(HTTP status, OpenAI error type, message) for an exception from a gRPC call, the gateway or
    the core; a bug (INTERNAL) is logged once, with ``where`` it happened."""
    code, message = reported_status(where, e)
    if too_large(code, message):  # grpc's message size limit, on the way to a worker: not a 429
        return 413, "invalid_request_error", f"the request is too large: {message}"
    status, kind = HTTP_STATUS.get(code, (500, "internal_error"))
    return status, kind, message


def rpc_error_response(e: BaseException, where: str = "HTTP") -> JSONResponse:
    status, kind, message = http_error(e, where)
    return error_response(status, message, kind)


# ---- request models (OpenAI's names; vLLM's extras) ----------------------------------------

class StreamOptions(BaseModel):
    include_usage: bool = False


# Why a field the server does not implement is refused (400), where there is more to say than that.
NOT_IMPLEMENTED = {name: "deprecated by OpenAI: use tools and tool_choice" for name in ("functions", "function_call")}


class KnownFields(BaseModel):
    """A request object whose every field is one the server implements (or documents as ignored):
    any other field is a 400 naming it, since dropping it silently would give the client an answer
    other than the one it asked for (tools, logit_bias, ...). A field set to null asks for nothing
    and is taken as absent."""

    @model_validator(mode="before")
    @classmethod
    def _refuse_unknown(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = {f.alias or name for name, f in cls.model_fields.items()}
            unknown = [k for k, v in data.items() if k not in known and v is not None]
            if unknown:
                why = "; ".join(f"{k} ({NOT_IMPLEMENTED[k]})" if k in NOT_IMPLEMENTED else k for k in unknown)
                raise PydanticCustomError("unsupported_field", "unsupported field(s), not implemented by this "
                                          "server: {why}", {"why": why})
            data = {k: v for k, v in data.items() if k in known}
        return data


class JsonSchemaFormat(KnownFields):
    name: str
    description: str | None = None
    schema_: dict | bool = Field(alias="schema")
    strict: bool | None = None  # the schema is always enforced


class ResponseFormat(KnownFields):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


GUIDED = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar")


class SamplingFields(KnownFields):
    model: Annotated[str, Field(max_length=MAX_NAME_CHARS)] = ""
    max_tokens: Annotated[int, Field(ge=1, le=INT32)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=INT32)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0  # OpenAI's default: sampled
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=0, lt=2 ** 63)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Accepted and ignored (README): none changes the answer.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # Structured output (one at most): OpenAI's response_format, vLLM's guided_*
    response_format: ResponseFormat | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Field(min_length=1)] | None = None
    guided_grammar: str | None = None  # Lark, as llguidance takes it
    # vLLM's extras
    top_k: Annotated[int, Field(ge=-1, le=INT32)] = 0  # 0 or -1: off
    min_p: Annotated[float, Field(ge=0, lt=1)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0)] = 1.0
    min_tokens: Annotated[int, Field(ge=0, le=INT32)] = 0
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0, le=INT32)]] | None = None
    # ours: false opts out of the worker's speculative decoding (the same tokens either way)
    speculate: bool = True

    @model_validator(mode="after")
    def _one_grammar(self):
        given = [name for name in GUIDED if getattr(self, name) is not None
                 and not (name == "response_format" and self.response_format.type == "text")]
        if len(given) > 1:
            raise PydanticCustomError("conflict", "give one of {given}, not several", {"given": ", ".join(given)})
        rf = self.response_format
        if rf is not None and rf.type == "json_schema" and rf.json_schema is None:
            raise PydanticCustomError("missing", "response_format: type json_schema needs json_schema")
        return self

    def grammar(self) -> common_pb2.Grammar | None:
        """The structured-output grammar these fields ask for (compiled and checked by the worker)."""
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            return common_pb2.Grammar(json_object=True)
        if rf is not None and rf.type == "json_schema":
            return common_pb2.Grammar(json_schema=json.dumps(rf.json_schema.schema_))
        if self.guided_json is not None:
            schema = self.guided_json if isinstance(self.guided_json, str) else json.dumps(self.guided_json)
            return common_pb2.Grammar(json_schema=schema)
        if self.guided_regex is not None:
            return common_pb2.Grammar(regex=self.guided_regex)
        if self.guided_choice is not None:
            return common_pb2.Grammar(choice=common_pb2.Choices(choices=self.guided_choice))
        if self.guided_grammar is not None:
            return common_pb2.Grammar(lark=self.guided_grammar)
        return None

    def sampling(self, default_max: int, logprobs: bool, top: int) -> common_pb2.SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        p = common_pb2.SamplingParams(
            max_new_tokens=self.max_completion_tokens or self.max_tokens or default_max,
            min_new_tokens=self.min_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=max(self.top_k, 0), min_p=self.min_p, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            stop=stop, ignore_eos=self.ignore_eos, logprobs=logprobs, top_logprobs=top, speculate=self.speculate)
        if self.stop_token_ids is not None:
            p.stop_token_ids.ids.extend(self.stop_token_ids)
        if (grammar := self.grammar()) is not None:
            p.grammar.CopyFrom(grammar)
        return p


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None  # the chosen tokens' and this many alternatives
    echo: Literal[False] = False
    suffix: None = None
    best_of: Annotated[int, Field(ge=1)] | None = None


class FunctionCall(KnownFields):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(KnownFields):
    """A call an assistant made, sent back in the history."""
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(KnownFields):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[dict] | None = None  # may be null in an assistant message with tool_calls
    tool_calls: list[ToolCall] | None = None  # an assistant's
    tool_call_id: str | None = None  # a tool's result: the call it answers
    # The participant's name, in the turn's header (ChatML's "user name=..."); on a tool's result it
    # is accepted and not rendered: InternLM's format names the environment <|plugin|>.
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] | None = None

    @model_validator(mode="after")
    def _content(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise PydanticCustomError("missing", "content is required (null only in an assistant message with "
                                      "tool_calls)")
        if self.tool_calls and self.role != "assistant":
            raise PydanticCustomError("invalid", "tool_calls: only in an assistant message")
        if self.role == "tool" and not self.tool_call_id:
            raise PydanticCustomError("missing", "a tool message needs tool_call_id")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:  # the list form: text parts only (no images here)
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("messages: only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)

    def core(self) -> dict:
        """The message as the core's chat template takes it."""
        m = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            m["tool_calls"] = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                               for c in self.tool_calls]
        if self.tool_call_id:
            m["tool_call_id"] = self.tool_call_id
        if self.name:
            m["name"] = self.name
        return m


class FunctionDef(KnownFields):
    name: str
    description: str | None = None
    parameters: dict | None = None  # a JSON Schema
    strict: bool | None = None  # tool_choice required / a named tool always enforces the schema; auto never


class ToolDef(KnownFields):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(KnownFields):
    name: str


class NamedToolChoice(KnownFields):
    type: Literal["function"]
    function: NamedFunction


class ChatTemplateKwargs(KnownFields):
    """vLLM's ``chat_template_kwargs`` extra; the one switch the InternLM templates have."""
    thinking: bool = False  # InternLM3's thinking mode: its published thinking system prompt first


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    tools: Annotated[list[ToolDef], Field(min_length=1, max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None

    @property
    def thinking(self) -> bool:
        return bool(self.chat_template_kwargs and self.chat_template_kwargs.thinking)

    def tool_spec(self) -> Tools | None:
        """The core's Tools for this request (ToolError naming the problem), None without tools."""
        if not self.tools:
            if self.tool_choice not in (None, "none"):
                raise ToolError("tool_choice: the request has no tools")
            return None
        size = len(json.dumps([t.model_dump(exclude_none=True) for t in self.tools]))
        if size > MAX_TOOLS_CHARS:
            raise ToolError(f"tools: {size} characters of JSON, more than the {MAX_TOOLS_CHARS} this server takes")
        choice = self.tool_choice or "auto"
        tools = tuple(Tool(t.function.name, t.function.description or "",
                           json.dumps(t.function.parameters) if t.function.parameters is not None else "")
                      for t in self.tools)
        return Tools(tools, choice if isinstance(choice, str) else choice.function.name,
                     self.parallel_tool_calls is not False).validate()
