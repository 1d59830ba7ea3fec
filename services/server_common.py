"""What every gRPC server here has: one error interceptor, health, reflection, Prometheus
metrics, and a graceful stop on SIGTERM; when asked, keys on every call but health and TLS
(``services/auth.py``).

    server = Server("worker", port=50061, metrics_port=9101)
    add_InferenceServicer_to_server(servicer, server.grpc)
    server.serve([SERVICE_NAME], on_stop=batcher.stop)   # returns after SIGTERM / SIGINT

``Server`` is a thread-pool server (a call holds a thread to its end: the workers and the tokenizer
service); ``AioServer`` has the same parts on ``grpc.aio`` for async servicers, every call a task of
one event loop (the endpoint, where streams wait long on workers), and the cap on long calls
(``StreamLimit``, shared with the HTTP door).

Errors: a servicer just raises; ``ErrorInterceptor`` (``AioErrorInterceptor``) turns the exception into one status code
with the exception's message, from the one table in ``internlm_core.errors`` (bad input ->
INVALID_ARGUMENT, unknown model, adapter or file -> NOT_FOUND, overload -> RESOURCE_EXHAUSTED,
...); an upstream call's status passes through; anything else -> INTERNAL, logged once with its
traceback. A request that is not valid protobuf (for
example a string field holding invalid UTF-8, which protobuf refuses while parsing) is answered
INVALID_ARGUMENT with the parser's message, instead of grpc's bare "Exception deserializing".
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
import os
import signal
import threading
import time
from concurrent import futures

import grpc
import redis
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from internlm_core import errors
from services.auth import (HEALTH_PREFIX, INTERNAL_TOKEN_ENV, NEED_KEY, AioKeyInterceptor, KeyInterceptor, client_channel,
                           server_credentials, tenant_of)

log = logging.getLogger("internlm.server")

GRACE_S = float(os.environ.get("INTERNLM_GRACE_S", "20"))  # SIGTERM: let running streams finish
# Long calls (every stream: Generate, WatchJob, reflection; and a unary call that generates) each
# hold a worker's slot or queue place, or a watcher's Redis subscription, while they run. The endpoint
# admits this many at once over both doors, and this many for one API key (``--max-streams`` /
# ``--max-streams-per-key``), so that one client cannot take them all; its Jobs pool (the short Jobs
# calls' threads, made as needed: watchers hold none) is sized the cap plus UNARY_HEADROOM.
MAX_STREAMS, MAX_STREAMS_PER_KEY, UNARY_HEADROOM = 96, 32, 32

RPCS = Counter("internlm_grpc_requests_total", "RPCs handled, by method and status code", ["method", "code"])
OPEN_STREAMS = Gauge("internlm_open_streams", "Long calls (streams) open, both doors")
STREAMS_REFUSED = Counter("internlm_streams_refused_total", "Long calls refused at a cap", ["cap"])
RPC_SECONDS = Histogram("internlm_grpc_request_duration_seconds", "RPC duration (whole stream)", ["method"],
                        buckets=(0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))


def status_of(e: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client gets for an exception: the core's table
    (``internlm_core.errors.STATUS``), plus what only the services meet."""
    if isinstance(e, grpc.RpcError) and callable(getattr(e, "code", None)):  # a call we made upstream
        return e.code(), e.details() or ""
    if isinstance(e, DecodeError):  # a request protobuf could not parse
        return grpc.StatusCode.INVALID_ARGUMENT, str(e)
    if isinstance(e, redis.exceptions.ConnectionError):  # the job queue's Redis, away for now
        return grpc.StatusCode.UNAVAILABLE, f"job queue unavailable: {e}"
    status = errors.status_of(e)
    if status == errors.INTERNAL:
        return grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}"
    return grpc.StatusCode[status], str(e)


def reported_status(method: str, e: BaseException) -> tuple[grpc.StatusCode, str]:
    """``status_of(e)`` for a call of ``method`` that raised ``e``, logging it (with its traceback)
    when it is INTERNAL: a bug, logged here once. What every door answers a raising servicer with:
    the gRPC server's ``ErrorInterceptor`` and the console's in-process calls."""
    code, message = status_of(e)
    if code == grpc.StatusCode.INTERNAL:
        log.error("%s failed", method, exc_info=e)
    return code, message


def too_large(code: grpc.StatusCode, message: str) -> bool:
    """Whether a status is grpc's own refusal of a message over its size limit (RESOURCE_EXHAUSTED,
    like a full queue, but a fault of the request: no other server would take it either)."""
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED and "message larger than max" in message


class _Undecodable:
    """Stands for a request that protobuf could not parse, so that it can be answered properly."""

    def __init__(self, error: Exception):
        self.error = error


def _lenient(deserialize):
    if deserialize is None:  # raw bytes (a pass-through proxy)
        return None

    def parse(data: bytes):
        try:
            return deserialize(data)
        except (DecodeError, ValueError) as e:  # upb: DecodeError; pure-Python protobuf: UnicodeDecodeError
            return _Undecodable(e)
    return parse


def _aborted(context) -> bool:
    """Whether the call was already aborted with its own status (its exception passes as it is)."""
    return context.code() not in (None, grpc.StatusCode.OK)


def _within(behaviour, scope):
    """A ``grpc.aio`` handler's behaviour (a coroutine function, or an async generator function for
    a response stream) run inside ``scope(request, context)``, an async context manager (what to do
    first, with an exception, and at the end), keeping its form."""
    if inspect.isasyncgenfunction(behaviour):
        async def responses(request, context):
            async with scope(request, context):
                async for response in behaviour(request, context):
                    yield response
        return responses

    async def response(request, context):
        async with scope(request, context):
            return await behaviour(request, context)
    return response


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps exceptions to status codes and counts RPCs, for every method of the server."""

    def intercept_service(self, continuation, details):
        return self._wrap(continuation(details), details.method)

    def _wrap(self, handler, method: str):
        if handler is None or handler.request_streaming:
            return handler
        kind, wrap = ("unary_stream", self._stream) if handler.response_streaming else ("unary_unary", self._unary)
        return handler._replace(**{kind: wrap(method, getattr(handler, kind))},
                                request_deserializer=_lenient(handler.request_deserializer))

    @staticmethod
    def _fail(method: str, e: BaseException, context) -> None:
        if _aborted(context):
            raise e
        context.abort(*reported_status(method, e))

    @staticmethod
    def _done(method: str, context, start: float) -> None:
        code = context.code() or grpc.StatusCode.OK
        RPCS.labels(method, code.name).inc()
        RPC_SECONDS.labels(method).observe(time.monotonic() - start)

    def _begin(self, method: str, request, context) -> None:
        """What every call does first: count it when it ends, refuse bytes that were no request."""
        start = time.monotonic()
        context.add_callback(lambda: self._done(method, context, start))
        if isinstance(request, _Undecodable):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {request.error}")

    def _unary(self, method, behaviour):
        def wrapper(request, context):
            self._begin(method, request, context)
            try:
                return behaviour(request, context)
            except Exception as e:  # noqa: BLE001 - mapped to a status here, once, for every method
                self._fail(method, e, context)
        return wrapper

    def _stream(self, method, behaviour):
        def wrapper(request, context):
            self._begin(method, request, context)
            try:
                yield from behaviour(request, context)
            except Exception as e:  # noqa: BLE001
                self._fail(method, e, context)
        return wrapper


class AioErrorInterceptor(ErrorInterceptor, grpc.aio.ServerInterceptor):
    """``ErrorInterceptor`` on a ``grpc.aio`` server: the same mapping and metrics, for async servicers."""

    async def intercept_service(self, continuation, details):
        return self._wrap(await continuation(details), details.method)

    def _unary(self, method, behaviour):
        @contextlib.asynccontextmanager
        async def mapped(request, context):
            start = time.monotonic()
            context.add_done_callback(lambda _: self._done(method, context, start))
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {request.error}")
            try:
                yield
            except Exception as e:  # noqa: BLE001 - mapped to a status here, once, for every method
                if _aborted(context):
                    raise
                await context.abort(*reported_status(method, e))
        return _within(behaviour, mapped)

    _stream = _unary  # ``_within`` keeps the behaviour's form


class StreamLimit:
    """The long calls open on a server's doors, overall and per API key: ``enter`` admits a call
    (or ``n`` at once, all or none) or raises TooManyCalls (RESOURCE_EXHAUSTED, HTTP 429) naming the
    cap; ``leave`` when each ends. Without API keys (``keyed`` False) every caller is one tenant
    and only the total applies: a caller could otherwise claim a fresh share with any header."""

    def __init__(self, total: int = MAX_STREAMS, per_key: int = MAX_STREAMS_PER_KEY, keyed: bool = False):
        if total < 1 or per_key < 1:
            raise ValueError(f"stream limits must be >= 1, got {total} and {per_key} per key")
        self.total, self.per_key, self.keyed = total, per_key, keyed
        self.open, self.by_tenant, self.lock = 0, collections.Counter(), threading.Lock()

    def tenant(self, metadata) -> str:
        """Whose call this is for the per-key cap: ``auth.tenant_of`` with keys, "" (nobody's) without."""
        return tenant_of(metadata) if self.keyed else ""

    def enter(self, tenant: str, n: int = 1) -> None:
        with self.lock:
            if tenant and self.by_tenant[tenant] + n > self.per_key:
                STREAMS_REFUSED.labels("key").inc()
                raise errors.TooManyCalls(
                    f"too many streams: this API key has {self.by_tenant[tenant]} open and one key may hold "
                    f"{self.per_key} at once (--max-streams-per-key); {n} more refused: retry when one ends")
            if self.open + n > self.total:
                STREAMS_REFUSED.labels("total").inc()
                raise errors.TooManyCalls(
                    f"too many streams: the server has {self.open} open and serves {self.total} at once "
                    f"(--max-streams); {n} more refused: retry when one ends")
            self.open += n
            if tenant:
                self.by_tenant[tenant] += n
        OPEN_STREAMS.inc(n)

    def leave(self, tenant: str, n: int = 1) -> None:
        with self.lock:
            self.open -= n
            if tenant:
                self.by_tenant[tenant] -= n
                if self.by_tenant[tenant] <= 0:
                    del self.by_tenant[tenant]
        OPEN_STREAMS.dec(n)


class StreamLimitInterceptor(grpc.aio.ServerInterceptor):
    """Every stream but health's (a stream of responses, of requests, or both: reflection's waits on
    its client) and the unary methods named in ``held`` go through ``limit`` for as long as they
    run (a stream holds no thread on the endpoint's ``grpc.aio`` server, but a worker's slot or
    queue place, or the tokenizer service's time); a call refused is answered RESOURCE_EXHAUSTED
    with the cap's message."""

    def __init__(self, limit: StreamLimit, held=()):
        self.limit, self.held = limit, frozenset(held)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if (handler is None or details.method.startswith(HEALTH_PREFIX)
                or not (handler.request_streaming or handler.response_streaming or details.method in self.held)):
            return handler
        limit, tenant = self.limit, self.limit.tenant(details.invocation_metadata)
        # the handler's one behaviour: unary_unary, unary_stream, stream_unary or stream_stream
        kind = "_".join("stream" if streaming else "unary"
                        for streaming in (handler.request_streaming, handler.response_streaming))

        @contextlib.asynccontextmanager
        async def admitted(request, context):
            try:
                limit.enter(tenant)
            except errors.TooManyCalls as e:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
            try:
                yield
            finally:
                limit.leave(tenant)
        return handler._replace(**{kind: _within(getattr(handler, kind), admitted)})


def setup_logging(name: str) -> None:
    logging.basicConfig(level=os.environ.get("INTERNLM_LOGLEVEL", "INFO").upper(),
                        format=f"%(asctime)s {name}[%(process)d] %(levelname)s %(name)s: %(message)s")


OPTIONS = [("grpc.so_reuseport", 0)]  # a port in use is an error at start, not shared with another server


class Server:
    """A grpc server with the standard parts; add services to ``.grpc``, then ``serve()``."""

    def __init__(self, name: str, port: int, host: str = "127.0.0.1", metrics_port: int | None = None,
                 max_workers: int = 32, metrics_host: str = "127.0.0.1", keys=(), refusal: str = NEED_KEY,
                 tls: tuple[str, str] | None = None):
        """``max_workers``: its threads, one per call running (a stream holds one to its end);
        ``keys``: one of them needed on every call but health (``refusal`` says so otherwise);
        ``tls``: (certificate, key) PEM files to serve TLS instead of plain text."""
        self._configure(name, host, port, metrics_port, metrics_host, tls)
        # The error interceptor first, so refused calls are counted in the RPC metrics too.
        interceptors = [ErrorInterceptor(), *([KeyInterceptor(keys, refusal)] if keys else [])]
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers, thread_name_prefix=name),
                                interceptors=interceptors, options=OPTIONS)
        self.health = health.HealthServicer(experimental_non_blocking=True,
                                            experimental_thread_pool=futures.ThreadPoolExecutor(2))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)

    def _configure(self, name, host, port, metrics_port, metrics_host, tls) -> None:
        self.name, self.host, self.port, self.metrics_port = name, host, port, metrics_port
        self.metrics_host, self.tls = metrics_host, tls
        self._stop = threading.Event()

    def _listen(self, services: list[str]) -> None:
        """Reflection over ``services`` and the standard ones, the port bound (TLS when given), metrics served."""
        reflection.enable_server_reflection([*services, health.SERVICE_NAME, reflection.SERVICE_NAME], self.grpc)
        address = f"{self.host}:{self.port}"
        if self.tls:
            bound = self.grpc.add_secure_port(address, server_credentials(*self.tls))
        else:
            bound = self.grpc.add_insecure_port(address)
        if not bound:
            raise RuntimeError(f"{self.name}: cannot listen on {address}")
        self.port = bound
        if self.metrics_port:
            start_http_server(self.metrics_port, addr=self.metrics_host)

    def _listening(self) -> None:
        log.info("%s listening on %s:%d%s (metrics on %s:%s)", self.name, self.host, self.port,
                 " with TLS" if self.tls else "", self.metrics_host, self.metrics_port)

    def start(self, services: list[str]) -> "Server":
        self._listen(services)
        self.grpc.start()
        for s in ["", *services]:
            self.health.set(s, health_pb2.HealthCheckResponse.SERVING)
        self._listening()
        return self

    def _shut(self, on_stop) -> None:
        """Health NOT_SERVING, ``on_stop``, then GRACE_S for the calls running."""
        self.health.enter_graceful_shutdown()
        if on_stop is not None:
            on_stop()
        self.grpc.stop(GRACE_S).wait()

    def stop(self) -> None:
        self._stop.set()

    def serve(self, services: list[str], on_start=None, on_stop=None) -> None:
        """Start, then block until SIGTERM/SIGINT (or ``stop()``); then drain and stop.

        Health turns NOT_SERVING first so that balancers stop sending; ``on_stop`` runs next
        (e.g. leave the worker registry, finish the running streams); then grpc gets GRACE_S.
        """
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        self.start(services)
        if on_start is not None:
            on_start()
        self._stop.wait()
        log.info("%s stopping (grace %.0fs)", self.name, GRACE_S)
        self._shut(on_stop)
        log.info("%s stopped", self.name)


class AioServer(Server):
    """``Server``'s standard parts on ``grpc.aio``: every call, a stream or not, is a task of
    ``loop`` (an event loop that runs on a thread of its own, e.g. the endpoint's gateway's), so an
    open stream holds no thread. Servicers must be async; ``serve()`` is ``Server``'s (it blocks
    the calling thread, which handles the signals)."""

    def __init__(self, name: str, port: int, loop: asyncio.AbstractEventLoop, host: str = "127.0.0.1",
                 metrics_port: int | None = None, metrics_host: str = "127.0.0.1", keys=(),
                 refusal: str = NEED_KEY, tls: tuple[str, str] | None = None, streams: StreamLimit | None = None,
                 held=()):
        self._configure(name, host, port, metrics_port, metrics_host, tls)
        self.loop = loop
        # As ``Server``'s, and ``streams`` (the cap on long calls: every stream, and the unary methods
        # in ``held``) after the key check, so that a caller without a key never takes a place.
        interceptors = [AioErrorInterceptor(), *([AioKeyInterceptor(keys, refusal)] if keys else []),
                        *([StreamLimitInterceptor(streams, held)] if streams else [])]

        def build():  # an aio server (and the health servicer's conditions) belong to the loop they are made on
            return grpc.aio.server(interceptors=interceptors, options=OPTIONS), health.aio.HealthServicer()
        self.grpc, self.health = self.call(build)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)

    def run(self, coroutine):
        """Run ``coroutine`` on the server's loop and wait for its result (from another thread)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def call(self, function, *args):
        """``function(*args)`` called on the server's loop (what makes aio objects: channels), its result."""
        async def on_loop():
            return function(*args)
        return self.run(on_loop())

    def start(self, services: list[str]) -> "AioServer":
        async def start():
            self._listen(services)
            await self.grpc.start()
            for s in ["", *services]:
                await self.health.set(s, health_pb2.HealthCheckResponse.SERVING)
        self.run(start())
        self._listening()
        return self

    def _shut(self, on_stop) -> None:
        self.run(self.health.enter_graceful_shutdown())
        if on_stop is not None:
            on_stop()
        self.run(self.grpc.stop(GRACE_S))


def wait_healthy(address: str, timeout: float = 60.0, service: str = "", tls_ca: str | None = None) -> None:
    """Block until the server at ``address`` answers SERVING (for launchers and tests); ``tls_ca``:
    the server speaks TLS, with a certificate this CA signed."""
    deadline = time.monotonic() + timeout
    with client_channel(address, ca=tls_ca) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} did not become healthy in {timeout:.0f}s")
            time.sleep(0.2)


def env_default(name: str, default: str) -> str:
    return os.environ.get(name, default)


def add_access_arguments(ap) -> None:
    """Who reaches a part behind the endpoint (inference worker, tokenizer service) beside ``--host``."""
    ap.add_argument("--metrics-host", default=env_default("INTERNLM_METRICS_HOST", "127.0.0.1"),
                    help="address of the Prometheus metrics port ($INTERNLM_METRICS_HOST; default loopback)")
    ap.add_argument("--internal-token", default=env_default(INTERNAL_TOKEN_ENV, ""),
                    help=f"refuse every call but health without 'authorization: Bearer <token>' (${INTERNAL_TOKEN_ENV}; "
                         "the endpoint sends it): for parts listening beyond loopback")
