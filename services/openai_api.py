"""The endpoint's HTTP door: the OpenAI API (``/v1/models``, ``/v1/completions``,
``/v1/chat/completions``, plain and streamed as server-sent events), ``/health``, ``/metrics``
and the web console, on ``--http-port`` beside the gRPC port.

Every route is a translation to and from calls of the endpoint's gateway (``gateway.py``: the
least-loaded live worker, the same retries and mid-stream failover as gRPC clients get): an
OpenAI request is turned into one ``GenerateRequest`` per choice, each gateway stream read by a
task of the HTTP server's event loop (no thread each) and relayed, and a client that disconnects
(streamed or not, queued or generating) cancels its streams, so the worker frees the slot within
a step. Logprobs name their tokens as the worker that made them did (``GenerateResponse.tokens``),
with its own model's tokenizer.
Parameters are checked here by pydantic models named as OpenAI names them, so a bad value is a
400 that names the field (the worker's own checks remain behind them).
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from internlm_core.errors import ToolError
from services.http_server import CLIENT_GONE, Guard
from services.pb_convert import FINISH_FROM_PB, chat_to_pb, tools_to_pb
from services.openai_schema import (FINISH, MAX_PROMPT_CHARS, MAX_PROMPT_IDS, UNION_TAGS, ChatCompletionRequest,
                                    CompletionRequest, SamplingFields, error_response, http_error,
                                    rpc_error_response)
from services.pb import inference_pb2
from services.server_common import StreamLimit

CONSOLE = Path(__file__).resolve().parent / "console"


class Generation:
    """The choices of one OpenAI request in flight: each GenerateRequest's gateway stream read by a
    task of this loop (no thread) into one queue, merged as the responses come. ``cancel()`` (the
    client went away) cancels every stream at its worker at once, without awaiting anything."""

    END = object()

    def __init__(self, gateway, requests, authorization: str | None = None, streams: StreamLimit | None = None):
        """``streams``: the endpoint's cap on long calls, one place a choice for as long as it
        runs, all admitted or TooManyCalls raised here."""
        self.queue = asyncio.Queue()
        metadata = (("authorization", authorization),) if authorization else ()
        self.streams = [gateway.generate(r, metadata) for r in requests]
        self.left = len(requests)
        self.limit = streams
        self.tenant = streams.tenant(metadata) if streams else ""
        if streams is not None:
            streams.enter(self.tenant, len(requests))
        # held here: the loop keeps only weak references to its tasks
        self.tasks = [asyncio.ensure_future(self._pump(i, stream)) for i, stream in enumerate(self.streams)]

    async def _pump(self, i, stream) -> None:
        try:
            async for response in stream:
                self.queue.put_nowait((i, response))
        except Exception as e:  # noqa: BLE001 - handed to the reader, who answers the client with it
            if not stream.cancelled:  # not the Cancelled of our own cancel
                self.queue.put_nowait((i, e))
        finally:
            if self.limit is not None:
                self.limit.leave(self.tenant)
            self.queue.put_nowait((i, self.END))

    async def next(self):
        """(choice index, GenerateResponse), or None when every stream has ended."""
        while self.left:
            i, item = await self.queue.get()
            if item is self.END:
                self.left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                return i, item
        return None

    def cancel(self) -> None:
        for stream in self.streams:
            stream.cancel()


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


async def unless_gone(request: Request, work):
    """``work``'s result; if the client disconnects first, ``work`` is cancelled and ClientGone
    raised. Starlette tells a streamed response that its client left, but never a plain route,
    which would otherwise wait for the whole generation for nobody."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(disconnected(request))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
    if task not in done:
        raise ClientGone
    return task.result()


async def disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":  # the body, if unread, then the end
        pass


def oversized(prompt) -> str | None:
    """Why a prompt is past the limits, or None: checked here, before a worker spends time
    tokenizing it (or grpc refuses the message as too large)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        size, unit, limit = len(prompt), "token ids", MAX_PROMPT_IDS
    else:  # text, or chat messages
        size = len(prompt) if isinstance(prompt, str) else sum(
            len(m["content"]) + sum(len(c["arguments"]) for c in m.get("tool_calls", ())) for m in prompt)
        unit, limit = "characters", MAX_PROMPT_CHARS
    return f"{size} {unit}, over the {limit} this server takes" if size > limit else None


class Choice:
    """One choice's stream as it comes: text, token ids, logprobs, the final FinishInfo."""

    def __init__(self, index: int):
        self.index, self.text, self.ids, self.logprobs, self.top, self.finish = index, [], [], [], [], None
        self.tokens: list[str] = []  # each token's own text, named by the worker that made it
        self.calls: dict[int, dict] = {}  # index -> OpenAI's tool call, its arguments joined

    def add_calls(self, pieces) -> None:
        for piece in pieces:
            call = self.calls.setdefault(piece.index, {"id": piece.id, "type": "function",
                                                       "function": {"name": piece.name, "arguments": ""}})
            call["function"]["arguments"] += piece.arguments


def call_deltas(pieces) -> list[dict]:
    """A response's tool-call pieces as OpenAI streams them: a call's first piece with its id, type
    and name (arguments ""), then its arguments' pieces; pieces of one call in a chunk are one entry."""
    out: dict[int, dict] = {}
    for piece in pieces:
        entry = out.setdefault(piece.index, {"index": piece.index, "function": {"arguments": ""}})
        if piece.name:
            entry.update(id=piece.id, type="function")
            entry["function"]["name"] = piece.name
        entry["function"]["arguments"] += piece.arguments
    return list(out.values())


def model_entries(info) -> list[dict]:
    """OpenAI's model objects for a served model (its ModelInfo) and each of its adapters."""
    name = info.model
    return [{"id": n, "object": "model", "created": 0, "owned_by": "internlm", "root": name, "parent": parent,
             "max_model_len": info.max_len} for n, parent in [(name, None), *((a, name) for a in info.adapters)]]


def generate_requests(gateway, body: SamplingFields, prompt, default_max: int, logprobs: bool, top: int, tools=None):
    """One GenerateRequest per choice (n of them: seeds seed, seed + 1, ... when a seed is given);
    ``tools``: the core's Tools of a chat request, or None."""
    model, adapter, info = gateway.resolve(body.model)
    out = []
    for i in range(body.n):
        r = inference_pb2.GenerateRequest(model=model, adapter=adapter,
                                          params=body.sampling(default_max or info.max_len, logprobs, top),
                                          thinking=getattr(body, "thinking", False),
                                          **(tools_to_pb(tools) if tools else {}))
        if body.seed is not None:
            r.params.seed = (body.seed + i) % 2 ** 63
        if isinstance(prompt, str):
            r.text = prompt
        elif prompt and isinstance(prompt[0], dict):
            r.chat.CopyFrom(chat_to_pb(prompt))
        else:
            r.ids.ids.extend(prompt)
        out.append(r)
    return out


def usage(choices: list[Choice]) -> dict:
    prompt = max((c.finish.prompt_tokens for c in choices if c.finish), default=0)
    completion = sum(c.finish.completion_tokens if c.finish else len(c.ids) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(finish) -> str | None:
    return FINISH[FINISH_FROM_PB[finish.reason]] if finish is not None else None


def create_app(gateway, api_keys=(), allowed_origins=(), streams: StreamLimit | None = None) -> FastAPI:
    """The HTTP app over the endpoint's ``gateway.Gateway`` (its jobs, when it has them, serve the
    console's job pages). ``api_keys``: any of them needed (none: open); ``allowed_origins``: the
    pages elsewhere (``https://host:port``) that may POST here; ``streams``: the cap on long calls
    that the gRPC door shares (None: no cap)."""
    app = FastAPI(title="InternLM endpoint", docs_url="/docs", redoc_url=None)
    app.add_middleware(Guard, api_keys=api_keys, routes=app.router.routes, allowed_origins=allowed_origins)

    @app.exception_handler(StarletteHTTPException)
    async def http_exception(request: Request, exc: StarletteHTTPException):  # e.g. a body that is not UTF-8
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        return error_response(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query")]
        while loc and (loc[-1] in UNION_TAGS or "[" in loc[-1]):  # pydantic names the union member tried
            loc.pop()
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {first.get('msg')}")
        return error_response(400, f"{param or 'body'}: {first.get('msg', 'invalid value')}", param=param)

    @app.get("/health")
    def health():
        n = len(gateway.workers())
        return JSONResponse({"status": "ok" if n else "no workers", "workers": n}, status_code=200 if n else 503)

    @app.get("/metrics")
    def metrics():
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    def list_models():
        try:
            return {"object": "list", "data": [m for info in gateway.models() for m in model_entries(info)]}
        except Exception as e:  # noqa: BLE001 - every failure answered as OpenAI's error object
            return rpc_error_response(e)

    @app.get("/v1/models/{model_id}")
    def get_model(model_id: str):
        try:
            found = [m for info in gateway.models() for m in model_entries(info) if m["id"] == model_id]
        except Exception as e:  # noqa: BLE001
            return rpc_error_response(e)
        return found[0] if found else error_response(404, f"the model {model_id!r} does not exist",
                                                     "not_found_error", param="model")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if body.best_of not in (None, body.n):
            return error_response(400, "best_of must equal n (no server-side best-of)", param="best_of")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                return error_response(400, "prompt: one prompt per request (a list of one string or token list)",
                                      param="prompt")
            prompt = prompt[0]
        if not prompt:
            return error_response(400, "prompt: must not be empty", param="prompt")
        return await answer(request, body, prompt, 16, body.logprobs is not None, body.logprobs or 0, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        try:
            messages = [m.core() for m in body.messages]
        except ValueError as e:
            return error_response(400, str(e), param="messages")
        if body.top_logprobs and not body.logprobs:
            return error_response(400, "top_logprobs: needs logprobs set to true", param="top_logprobs")
        try:
            tools = body.tool_spec()
        except ToolError as e:  # its message starts with the field at fault
            return error_response(400, str(e), param="tool_choice" if str(e).startswith("tool_choice") else "tools")
        return await answer(request, body, messages, 0, body.logprobs, body.top_logprobs or 0, chat=True, tools=tools)

    async def answer(request: Request, body: SamplingFields, prompt, default_max: int, want_logprobs: bool, top: int,
                     chat: bool, tools=None):
        param = "messages" if chat else "prompt"
        if why := oversized(prompt):
            return error_response(400, f"{param}: {why}", param=param)
        try:
            requests = await asyncio.to_thread(generate_requests, gateway, body, prompt, default_max, want_logprobs,
                                               top, tools)
        except Exception as e:  # noqa: BLE001 - unknown model, no worker
            return rpc_error_response(e)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created, model = int(time.time()), body.model or requests[0].model
        kind = "chat.completion" if chat else "text_completion"
        choices = [Choice(i) for i in range(len(requests))]
        try:
            gen = Generation(gateway, requests, request.headers.get("authorization"), streams)
        except Exception as e:  # noqa: BLE001 - too many streams open, a bad name
            return rpc_error_response(e)
        try:  # the first response before any byte goes out, so that a refusal gets its HTTP status
            first = await unless_gone(request, gen.next())
        except ClientGone:  # while queued at a worker
            gen.cancel()
            return Response(status_code=CLIENT_GONE)
        except Exception as e:  # noqa: BLE001
            gen.cancel()
            return rpc_error_response(e)

        def piece(i, response) -> None:
            c = choices[i]
            c.text.append(response.text)
            c.ids.extend(response.token_ids)
            c.tokens.extend(response.tokens)
            c.logprobs.extend(response.logprobs)
            c.top.extend(response.top_logprobs)
            c.add_calls(response.tool_calls)
            if response.HasField("finish"):
                c.finish = response.finish

        def logprob_fields(names, lps, tops) -> dict | None:
            """OpenAI's logprobs object for these tokens (chat: ``content``; completions: the
            legacy parallel lists), each named as the worker that made it named it."""
            if not want_logprobs:
                return None
            names = list(names)
            alts = [list(zip(t.tokens, t.logprobs)) for t in tops] or [[] for _ in names]
            if chat:
                return {"content": [{"token": s, "logprob": lp, "bytes": list(s.encode()),
                                     "top_logprobs": [{"token": a, "logprob": alp, "bytes": list(a.encode())}
                                                      for a, alp in alt]}
                                    for s, lp, alt in zip(names, lps, alts)]}
            offsets, at = [], 0
            for name in names:
                offsets.append(at)
                at += len(name)
            return {"tokens": names, "token_logprobs": list(lps), "top_logprobs": [dict(a) for a in alts],
                    "text_offset": offsets}

        async def collect() -> None:
            item = first
            while item is not None:
                piece(*item)
                item = await gen.next()

        if not body.stream:
            try:
                await unless_gone(request, collect())
            except ClientGone:
                return Response(status_code=CLIENT_GONE)  # nobody reads it; the metrics count it
            except Exception as e:  # noqa: BLE001 - e.g. every worker gone mid-way
                return rpc_error_response(e)
            finally:  # also when the client went away: free the slots now
                gen.cancel()
            out = []
            for c in choices:
                lp = logprob_fields(c.tokens, c.logprobs, c.top)
                text = "".join(c.text)
                entry = {"index": c.index, "finish_reason": finish_reason(c.finish), "logprobs": lp}
                if not chat:
                    entry["text"] = text
                elif c.calls:  # OpenAI's content is null beside tool calls when the model said nothing
                    entry["message"] = {"role": "assistant", "content": text or None,
                                        "tool_calls": [c.calls[i] for i in sorted(c.calls)]}
                else:
                    entry["message"] = {"role": "assistant", "content": text}
                out.append(entry)
            return {"id": rid, "object": kind, "created": created, "model": model, "choices": out,
                    "usage": usage(choices)}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"

        def event(payload: dict) -> str:
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        def chunk(i, response) -> str:
            piece(i, response)
            reason = finish_reason(response.finish) if response.HasField("finish") else None
            entry = {"index": i, "finish_reason": reason,
                     "logprobs": logprob_fields(response.tokens, response.logprobs, response.top_logprobs)}
            if not chat:
                entry["text"] = response.text
            elif response.tool_calls:
                entry["delta"] = {**({"content": response.text} if response.text else {}),
                                  "tool_calls": call_deltas(response.tool_calls)}
            else:
                entry["delta"] = {"content": response.text}
            payload = {"id": rid, "object": chunk_kind, "created": created, "model": model, "choices": [entry]}
            if include_usage:
                payload["usage"] = None
            return event(payload)

        async def sse():
            try:
                if chat:  # the role first, as OpenAI sends it
                    for c in choices:
                        yield event({"id": rid, "object": chunk_kind, "created": created, "model": model,
                                     "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                                  "finish_reason": None, "logprobs": None}]})
                item = first
                while item is not None:
                    yield chunk(*item)
                    item = await gen.next()
                if include_usage:
                    yield event({"id": rid, "object": chunk_kind, "created": created, "model": model,
                                 "choices": [], "usage": usage(choices)})
            except Exception as e:  # noqa: BLE001 - mid-stream: the error as an event, then the end
                status, kind_, message = http_error(e)
                yield event({"error": {"message": message, "type": kind_, "param": None, "code": status}})
            finally:  # also when the client went away (the task is cancelled): free the slots now
                gen.cancel()
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    if gateway.jobs is not None:
        from services import console_api
        console_api.add_routes(app, gateway)
    if CONSOLE.is_dir():
        app.mount("/console", StaticFiles(directory=CONSOLE), name="console")

        @app.get("/")
        def index():
            return Response((CONSOLE / "index.html").read_bytes(), media_type="text/html")
    return app
