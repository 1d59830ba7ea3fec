"""The endpoint's HTTP plumbing, below the OpenAI routes (``openai_api``): uvicorn on a thread
beside the gRPC server (with TLS when given a certificate), and one ASGI middleware that checks the
API key (``services/auth.py``) and records the HTTP metrics for every route."""
from __future__ import annotations

import threading
import time

from fastapi import FastAPI
from prometheus_client import Counter, Histogram

from services.auth import NEED_KEY, authorized
from services.openai_schema import error_response
from services.server_common import GRACE_S

HTTP_REQUESTS = Counter("internlm_http_requests_total", "HTTP requests, by route and status", ["route", "status"])
HTTP_SECONDS = Histogram("internlm_http_request_duration_seconds", "HTTP request duration (to the last byte)",
                         ["route"], buckets=(0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))


class Guard:
    """ASGI middleware: the API key (when set) and the HTTP metrics, for every route. Plain ASGI,
    not Starlette's BaseHTTPMiddleware, so streamed responses and client disconnects pass untouched."""

    def __init__(self, app, api_keys=()):
        self.app, self.api_keys = app, tuple(api_keys)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, start, status = scope["path"], time.monotonic(), [500]
        route = path if not path.startswith(("/console/", "/api/jobs/")) else path.rsplit("/", 1)[0] + "/*"
        # health: for probes, as on the gRPC side; the console's static files hold no data
        public = path in ("/", "/health") or path.startswith("/console/")
        if self.api_keys and not public:
            if not authorized(self.api_keys, dict(scope["headers"]).get(b"authorization")):
                HTTP_REQUESTS.labels(route, "401").inc()
                response = error_response(401, NEED_KEY, "authentication_error")
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

    def __init__(self, app: FastAPI, host: str, port: int, tls: tuple[str, str] | None = None):
        import uvicorn

        cert, key = tls or (None, None)  # PEM certificate and key: HTTPS
        # On stop, open streams finish (up to the same grace as the gRPC side), new ones are refused.
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    access_log=False, lifespan="off",
                                                    timeout_graceful_shutdown=int(GRACE_S),
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
