"""The endpoint's HTTP plumbing, below the OpenAI routes (``openai_api``): uvicorn on a thread
beside the gRPC server (with TLS when given a certificate), and one ASGI middleware that guards
every route (same-origin writes, the API key (``services/auth.py``), JSON bodies within the size
limit), adds the browser security headers and records the HTTP metrics."""
from __future__ import annotations

import asyncio
import functools
import threading
import time
from urllib.parse import urlsplit

from fastapi import FastAPI
from prometheus_client import Counter, Histogram
from starlette.datastructures import Headers
from starlette.routing import Match
from uvicorn.protocols.http.h11_impl import H11Protocol

from services.auth import NEED_KEY, authorized
from services.openai_schema import (BODY_TIMEOUT_S, HEAD_TIMEOUT_S, MAX_BODY_BYTES, MAX_CONNECTIONS,
                                    error_response)
from services.server_common import GRACE_S

HTTP_REQUESTS = Counter("internlm_http_requests_total", "HTTP requests, by route and status", ["route", "status"])
HTTP_SECONDS = Histogram("internlm_http_request_duration_seconds", "HTTP request duration (to the last byte)",
                         ["route"], buckets=(0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
UNMATCHED = "unmatched"  # the one route label of every path no route serves
CLIENT_GONE = 499        # the status recorded for a client that left before its answer (nginx's)
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}

# Every response: no framing (clickjacking), no MIME sniffing, no Referer to other sites, and a
# page may load only this server's own files (the console loads nothing else and has no inline
# script or style). FastAPI's /docs page loads Swagger UI from jsdelivr and starts it inline.
CSP = "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
            "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
            "img-src 'self' data: https://fastapi.tiangolo.com; frame-ancestors 'none'")
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer")]


class Refused(Exception):
    """A request the Guard answers itself, with this status and OpenAI's error object."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


class Guard:
    """ASGI middleware, for every route: a state-changing request from a page of another origin is
    refused (403), the API key (when set) checked (401), a body must be JSON (415) and within
    MAX_BODY_BYTES (413); the security headers go on every response, and the HTTP metrics are
    counted by route template. Plain ASGI, not Starlette's BaseHTTPMiddleware, so streamed
    responses and client disconnects pass untouched."""

    def __init__(self, app, api_keys=(), routes: list = (), allowed_origins=()):
        self.app, self.api_keys, self.routes = app, tuple(api_keys), routes  # routes: the app's, live
        self.allowed_origins = {o.strip().rstrip("/").lower() for o in allowed_origins if o.strip()}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, route = time.monotonic(), [500], self.route_of(scope)
        csp = (DOCS_CSP if scope["path"].startswith("/docs") else CSP).encode()

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"content-security-policy", csp),
                                                  *SECURITY_HEADERS]}
            await send(message)

        try:
            try:
                admitted = await self.admit(scope, receive)
            except Refused as e:
                return await error_response(e.status, str(e), e.kind)(scope, receive, sending)
            if admitted is None:  # the client left while sending its body
                status[0] = CLIENT_GONE
                return
            await self.app(scope, admitted, sending)
        finally:
            HTTP_REQUESTS.labels(route, str(status[0])).inc()
            HTTP_SECONDS.labels(route).observe(time.monotonic() - start)

    def route_of(self, scope) -> str:
        """The template of the route the path matches (``/api/jobs/{job_id}``), never the path
        itself: the metrics keep one series per route whatever paths clients send."""
        for r in self.routes:
            if r.matches(scope)[0] is not Match.NONE:
                return getattr(r, "path_format", UNMATCHED)
        return UNMATCHED

    async def admit(self, scope, receive):
        """The receive to hand the app (the body read already, when there is one); raises Refused."""
        headers = Headers(scope=scope)
        self.check(scope, headers)
        if not has_body(headers):
            return receive
        try:  # a body trickled in slowly would hold its connection and its task as long as it lasts
            async with asyncio.timeout(BODY_TIMEOUT_S):
                body = await read_body(receive)
        except TimeoutError:
            raise Refused(408, f"the body did not arrive within {BODY_TIMEOUT_S:g} s") from None
        return None if body is None else replay(body, receive)

    def check(self, scope, headers: Headers) -> None:
        origin = headers.get("origin")
        # A page elsewhere can make a browser send a form or a "simple" fetch here (with the
        # user's network position); browsers name that page in Origin on every such request.
        if scope["method"] not in SAFE_METHODS and origin is not None and not self.same_origin(origin, headers):
            raise Refused(403, f"a request from the page at {origin} is refused: that is not this server's "
                               "origin nor one of --allowed-origins", "permission_error")
        # health: for probes, as on the gRPC side; the console's static files hold no data
        public = scope["path"] in ("/", "/health") or scope["path"].startswith("/console/")
        if self.api_keys and not public:
            if not authorized(self.api_keys, headers.get("authorization", "").encode() or None):
                raise Refused(401, NEED_KEY, "authentication_error")
        if has_body(headers):
            # Every body this server takes is JSON. Refusing the rest refuses what a page elsewhere
            # can send without a CORS preflight (forms, text/plain, a Blob with no type at all).
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            if media != "application/json":
                raise Refused(415, f"the body must be JSON (Content-Type: application/json), "
                                   f"not {media or 'untyped'}")
            if int(headers.get("content-length", "0")) > MAX_BODY_BYTES:
                raise Refused(413, f"the body is over {MAX_BODY_BYTES} bytes")

    def same_origin(self, origin: str, headers: Headers) -> bool:
        origin = origin.strip().rstrip("/").lower()
        netloc = urlsplit(origin).netloc  # "null" (a sandboxed or file: page) has none
        return origin in self.allowed_origins or bool(netloc) and netloc == headers.get("host", "").lower()


def has_body(headers: Headers) -> bool:
    return "transfer-encoding" in headers or headers.get("content-length", "0") != "0"


async def read_body(receive) -> bytes | None:
    """The whole body, read here so that a chunked one (no length to check first) is refused with
    a 413 as soon as it passes MAX_BODY_BYTES; None if the client disconnects meanwhile."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > MAX_BODY_BYTES:
            raise Refused(413, f"the body is over {MAX_BODY_BYTES} bytes")
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive):
    """A receive that gives the app the body read already, then the client's own messages (its
    disconnect, which streamed and plain routes both watch for)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def again():
        return pending.pop() if pending else await receive()
    return again


class TimedHead(H11Protocol):
    """uvicorn's HTTP/1.1 protocol (h11) with a deadline on each request's head (its request line
    and headers), from the connection's start or the end of its previous answer; a connection past
    it is closed. uvicorn itself times only the idle wait between requests and restarts that timer
    on every byte, so a client sending its headers a byte at a time (slowloris) would hold its
    connection forever (h11 bounds only their size, 16 KiB)."""

    def __init__(self, *args, head_timeout: float = HEAD_TIMEOUT_S, **kw):
        super().__init__(*args, **kw)
        self.head_timeout, self.head_timer = head_timeout, None

    def connection_made(self, transport):
        super().connection_made(transport)
        self.wait_for_head()

    def on_response_complete(self):
        super().on_response_complete()
        self.wait_for_head()

    def connection_lost(self, exc):
        if self.head_timer is not None:
            self.head_timer.cancel()
        super().connection_lost(exc)

    def wait_for_head(self):
        if self.head_timer is not None:
            self.head_timer.cancel()
        self.head_timer = self.loop.call_later(self.head_timeout, self.head_late, self.cycle)

    def head_late(self, cycle):
        # No request begun since the timer was set (each head starts a new cycle), or none running.
        running = self.cycle is not None and not self.cycle.response_complete
        if self.cycle is cycle and not running and not self.transport.is_closing():
            self.transport.close()


class HttpServer:
    """uvicorn serving the app on a thread beside the gRPC server; ``stop()`` ends it."""

    def __init__(self, app: FastAPI, host: str, port: int, tls: tuple[str, str] | None = None,
                 head_timeout: float = HEAD_TIMEOUT_S):
        import uvicorn

        cert, key = tls or (None, None)  # PEM certificate and key: HTTPS
        # On stop, open streams finish (up to the same grace as the gRPC side), new ones are refused.
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    access_log=False, lifespan="off",
                                                    timeout_graceful_shutdown=int(GRACE_S),
                                                    http=functools.partial(TimedHead, head_timeout=head_timeout),
                                                    limit_concurrency=MAX_CONNECTIONS,
                                                    ssl_certfile=cert, ssl_keyfile=key))
        self.server.install_signal_handlers = lambda: None  # the gRPC server owns SIGTERM / SIGINT
        self.thread = threading.Thread(target=self.server.run, name="http", daemon=True)

    def start(self, timeout: float = 10) -> "HttpServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start (is the port free?)")
            time.sleep(0.02)
        return self

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(GRACE_S + 5)
