"""The OpenAI API's wire forms for the endpoint's HTTP side (``openai_api``): the request
models, named as OpenAI names them (with vLLM's extras), so that pydantic refuses a bad value with
a 400 naming the field; OpenAI's error object, the one table from gRPC status to HTTP status, and
the one table of the limits the HTTP side puts on a request (the README lists them).
"""
from __future__ import annotations

from typing import Annotated, Literal

import grpc
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from services.pb import common_pb2
from services.server_common import status_of, too_large

# ---- limits: every bound the HTTP side puts on a request, named here once --------------------
MAX_BODY_BYTES = 8 * 2 ** 20     # a request body: 413 (by Content-Length, or counted while reading)
MAX_PROMPT_CHARS = 1_000_000     # a prompt's text (chat: all messages), checked before tokenizing: 400
MAX_PROMPT_IDS = 262_144         # a prompt given as token ids: 400
MAX_N = 16                       # choices per request (each takes a worker slot)
MAX_LOGPROBS = 5                 # completions' logprobs: alternatives per token (OpenAI's bound)
MAX_TOP_LOGPROBS = 20            # chat's top_logprobs (OpenAI's bound)
MAX_JOBS_LISTED = 1000           # GET /api/jobs?limit=

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
FINISH = {"length": "length", "eos": "stop", "stop": "stop", "aborted": "abort"}  # core -> OpenAI


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code or status}},
                        status_code=status)


def http_error(e: BaseException) -> tuple[int, str, str]:
    """(HTTP status, OpenAI error type, message) for an exception from a gRPC call or the core."""
    code, message = status_of(e)
    if too_large(code, message):  # grpc's message size limit, on the way to a worker: not a 429
        return 413, "invalid_request_error", f"the request is too large: {message}"
    status, kind = HTTP_STATUS.get(code, (500, "internal_error"))
    return status, kind, message


def rpc_error_response(e: BaseException) -> JSONResponse:
    status, kind, message = http_error(e)
    return error_response(status, message, kind)


# ---- request models (OpenAI's names; vLLM's extras) ----------------------------------------

class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")  # fields of newer API versions we do not use are ignored

    model: str = ""
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
    user: str | None = None
    # vLLM's extras
    top_k: Annotated[int, Field(ge=-1, le=INT32)] = 0  # 0 or -1: off
    min_p: Annotated[float, Field(ge=0, le=1)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0)] = 1.0
    min_tokens: Annotated[int, Field(ge=0, le=INT32)] = 0
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0, le=INT32)]] | None = None

    def sampling(self, default_max: int, logprobs: bool, top: int) -> common_pb2.SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        p = common_pb2.SamplingParams(
            max_new_tokens=self.max_completion_tokens or self.max_tokens or default_max,
            min_new_tokens=self.min_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=max(self.top_k, 0), min_p=self.min_p, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            stop=stop, ignore_eos=self.ignore_eos, logprobs=logprobs, top_logprobs=top)
        if self.stop_token_ids is not None:
            p.stop_token_ids.ids.extend(self.stop_token_ids)
        return p


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None  # the chosen tokens' and this many alternatives
    echo: Literal[False] = False
    suffix: None = None
    best_of: Annotated[int, Field(ge=1)] | None = None


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[dict]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:  # the list form: text parts only (no images here)
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("messages: only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
