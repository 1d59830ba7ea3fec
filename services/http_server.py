"""The endpoint's HTTP plumbing, below the OpenAI routes (``openai_api``): uvicorn on a thread
beside the gRPC server, and one ASGI middleware that checks the API key and records the HTTP
metrics for every route."""
from __future__ import annotations

import secrets
import threading
import time

from fastapi import FastAPI
from prometheus_client import Counter, Histogram

from services.openai_schema import error_response
from services.server_common import GRACE_S

HTTP_REQUESTS = Counter("internlm_http_requests_total", "HTTP requests, by route and status", ["route", "status"])
HTTP_SECONDS = Histogram("internlm_http_request_duration_seconds", "HTTP request duration (to the last byte)",
                         ["route"], buckets=(0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))


class Guard:
    """ASGI middleware: the API key (when set) and the HTTP metrics, for every route. Plain ASGI,
    not Starlette's BaseHTTPMiddleware, so streamed responses and client disconnects pass untouched."""

    def __init__(self, app, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, start, status = scope["path"], time.monotonic(), [500]
        route = path if not path.startswith(("/console/", "/api/jobs/")) else path.rsplit("/", 1)[0] + "/*"
        public = path == "/" or path.startswith("/console/")  # the console's static files hold no data
        if self.api_key and not public:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, f"Bearer {self.api_key}".encode()):
                HTTP_REQUESTS.labels(route, "401").inc()
                response = error_response(401, "a valid API key is required: Authorization: Bearer <key>",
                                          "authentication_error")
                return await response(scope, receive, send)

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            HTTP_REQUESTS.labels(route, str(status[0])).inc()
            HTTP_SECONDS.labels(route).observe(time.monotonic() - start)


class HttpServer:
    """uvicorn serving the app on a thread beside the gRPC server; ``stop()`` ends it."""

    def __init__(self, app: FastAPI, host: str, port: int):
        import uvicorn

        # On stop, open streams finish (up to the same grace as the gRPC side), new ones are refused.
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    access_log=False, lifespan="off",
                                                    timeout_graceful_shutdown=int(GRACE_S)))
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
