"""The public endpoint: ``python -m services.endpoint --port 50051 --redis-url URL``.

One address for clients. It serves ``internlm.v1.Inference`` by sending each request to the
least-loaded live inference worker (workers register in Redis, see ``registry.py``; adding or
removing one needs no change here), ``internlm.v1.Tokenizer`` by passing calls through to the
tokenizer service, ``internlm.v1.Endpoint`` to list the workers, and the Jobs API when the
jobs package is installed. Plain gRPC all the way; statuses from behind pass through as they are.

With ``--http-port`` it also serves HTTP (``services/openai_api.py``): the OpenAI API, health,
metrics and the web console, over the same router. ``--api-key`` (or INTERNLM_API_KEY; several,
comma-separated) makes every call on both doors need ``authorization: Bearer <key>``, but health
and the console's static files; without it both doors are open. ``--tls-cert`` / ``--tls-key`` put
both doors on TLS. ``--internal-token`` is what it sends to the workers and the tokenizer service
(``services/auth.py``). ``--allowed-origins`` (or INTERNLM_ALLOWED_ORIGINS) names the web pages
elsewhere that may send the HTTP door POSTs (by default only its own, the console).
"""
from __future__ import annotations

import argparse
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field, replace
from types import SimpleNamespace

import grpc
import redis
from prometheus_client import Counter, Gauge

from internlm_core.errors import ModelNotFound, Unavailable
from services.auth import (API_KEY_ENV, INTERNAL_TOKEN_ENV, TENANT_HEADER, TLS_CERT_ENV, TLS_KEY_ENV, parse_keys,
                           tenant_of, tls_pair, with_bearer)
from services.pb_convert import check_names, join_chunks
from services.pb import endpoint_pb2, endpoint_pb2_grpc, inference_pb2, inference_pb2_grpc, jobs_pb2, tokenizer_pb2
from services.registry import TTL_S, list_workers
from services.server_common import (MAX_STREAMS, MAX_STREAMS_PER_KEY, Server, StreamLimit, env_default, setup_logging,
                                   too_large)

log = logging.getLogger("internlm.endpoint")

INFERENCE = inference_pb2.DESCRIPTOR.services_by_name["Inference"]
TOKENIZER = tokenizer_pb2.DESCRIPTOR.services_by_name["Tokenizer"]
ENDPOINT = endpoint_pb2.DESCRIPTOR.services_by_name["Endpoint"]
JOBS = jobs_pb2.DESCRIPTOR.services_by_name["Jobs"]
# Unary calls that can hold a thread long, counted with the streams (``StreamLimit``): generation,
# and the tokenizer's, each waiting on the tokenizer service (a few threads) for megabytes of text.
HELD = [f"/{INFERENCE.full_name}/GenerateUnary", *(f"/{TOKENIZER.full_name}/{m.name}" for m in TOKENIZER.methods)]
# The worker has stopped serving the request (or never took it): another worker takes it over
# (not a request grpc refused as too large, which every worker would refuse: see ``too_large``).
RETRY = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)

ROUTED = Counter("internlm_endpoint_routed_total", "Generate requests sent to workers", ["worker"])
LOST = Counter("internlm_endpoint_worker_failures_total", "Calls that found a worker gone", ["worker"])
CONTINUED = Counter("internlm_endpoint_continued_total", "Requests continued on another worker mid-stream")


@dataclass(eq=False)
class WorkerRef:
    id: str
    address: str
    model: str
    load: int = 0               # at its last heartbeat (includes other endpoints' requests)
    max_batch: int = 0
    inflight: int = 0           # this endpoint's requests on it now (exact, unlike ``load``)
    routed: int = 0
    precision: str = ""         # what its weights and KV cache are held in (the console shows it)
    last_pick: float = 0.0
    down_until: float = 0.0
    retired: bool = False
    channel: grpc.Channel = field(default=None, repr=False)
    stub: inference_pb2_grpc.InferenceStub = field(default=None, repr=False)


class Router:
    """The live workers, refreshed from Redis in the background; picks the least loaded."""

    def __init__(self, redis_url: str, refresh_s: float = 0.5, token: str | None = None):
        self.r = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self.refresh_s, self.token = refresh_s, token  # the internal token, sent on every call to a worker
        self.workers: dict[str, WorkerRef] = {}
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._warned = False
        Gauge("internlm_endpoint_workers", "Live inference workers").set_function(lambda: len(self.workers))

    def start(self) -> "Router":
        self.refresh()
        threading.Thread(target=self._loop, name="router", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - the thread must outlive any one bad refresh, or routing stops for good
                log.exception("refreshing the worker list failed; keeping the workers known")

    def refresh(self) -> None:
        try:
            found = list_workers(self.r)
            self._warned = False
        except redis.RedisError as e:  # keep routing to the workers we know until Redis is back
            if not self._warned:
                log.warning("cannot read the worker registry: %s", e)
                self._warned = True
            return
        with self.lock:
            for wid, info in found.items():
                w = self.workers.get(wid)
                if w is None:
                    w = self.workers[wid] = WorkerRef(wid, info["address"], info["model"])
                    w.channel = with_bearer(grpc.insecure_channel(w.address), self.token)
                    w.stub = inference_pb2_grpc.InferenceStub(w.channel)
                    log.info("worker %s at %s (%s) joined", wid, w.address, w.model)
                w.load, w.max_batch, w.precision = info["load"], info["max_batch"], info["precision"]
            for wid in set(self.workers) - set(found):
                w = self.workers.pop(wid)
                w.retired = True
                log.info("worker %s at %s left", wid, w.address)
                if w.inflight == 0:
                    w.channel.close()

    def acquire(self, model: str, exclude=()) -> WorkerRef:
        """The least-loaded live worker for ``model`` ('' = any); count a request on it."""
        now = time.monotonic()
        with self.lock:
            serving = [w for w in self.workers.values() if not model or w.model == model]
            if not serving:
                if model and self.workers:
                    known = sorted({w.model for w in self.workers.values()})
                    raise ModelNotFound(f"unknown model {model!r}; served here: {', '.join(known)}")
                raise Unavailable("no inference worker is registered; start one (or wait for it to load)")
            live = [w for w in serving if w.id not in exclude and w.down_until <= now]
            if not live:
                raise Unavailable(f"no live inference worker for {model or 'the default model'} right now")
            # This endpoint's own count is exact and current; the heartbeat's load is up to a beat
            # old (it would still show requests that just ended), so it only breaks ties, where it
            # stands for the other endpoints' requests; then the one picked least recently.
            w = min(live, key=lambda w: (w.inflight, w.load, w.last_pick))
            w.inflight += 1
            w.routed += 1
            w.last_pick = now
        ROUTED.labels(w.address).inc()
        return w

    def release(self, w: WorkerRef) -> None:
        with self.lock:
            w.inflight -= 1
            if w.retired and w.inflight == 0:
                w.channel.close()

    def lost(self, w: WorkerRef) -> None:
        """Route around a worker that failed to answer until its registration would have expired."""
        LOST.labels(w.address).inc()
        with self.lock:
            w.down_until = time.monotonic() + TTL_S

    def snapshot(self) -> list[WorkerRef]:
        """The live workers now (copies, by address), for reports."""
        with self.lock:
            return [replace(w) for w in sorted(self.workers.values(), key=lambda w: w.address)]

    def any_worker(self, model: str) -> WorkerRef:
        w = self.acquire(model)
        self.release(w)
        return w


def with_seed(request: inference_pb2.GenerateRequest) -> inference_pb2.GenerateRequest:
    """A sampled request without a seed gets one here, before any worker sees it: a continuation
    on another worker then draws the same numbers as the worker that went away."""
    if request.params.temperature <= 0 or request.params.HasField("seed"):
        return request
    seeded = inference_pb2.GenerateRequest()
    seeded.CopyFrom(request)
    seeded.params.seed = secrets.randbits(63)
    return seeded


def _timeout(context) -> float | None:
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining < 1e6 else None


class InferenceProxy(inference_pb2_grpc.InferenceServicer):
    def __init__(self, router: Router, tenants: bool = False):
        """``tenants``: tell workers whose key each call came with (``auth.tenant_of``), so that
        cached prompt rows are reused within one key only; without keys every caller is one."""
        self.router, self.tenants = router, tenants

    def _next(self, request, tried: set, error):
        try:
            w = self.router.acquire(request.model, tried)
        except Unavailable:
            if error is not None:  # every worker refused: pass on the last one's own status
                raise error from None
            raise
        tried.add(w.id)
        return w

    def _failed(self, w: WorkerRef, e: grpc.RpcError) -> None:
        if e.code() == grpc.StatusCode.UNAVAILABLE:
            self.router.lost(w)

    def Generate(self, request, context):
        """The worker's stream; when a worker goes away mid-stream, another continues the request
        from the tokens already streamed (``resume_ids``), so the client sees one stream."""
        check_names(request)  # before the router quotes an unknown name back
        request = with_seed(request)
        tenant = ((TENANT_HEADER, tenant_of(context.invocation_metadata()) if self.tenants else ""),)
        tried, error, produced = set(), None, []
        while True:
            try:
                w = self._next(request, tried, error)
            except grpc.RpcError as e:
                if produced:
                    raise Unavailable(f"the worker went away after {len(produced)} token(s) and no other live "
                                      f"worker can continue the request: {e.details()}") from None
                raise
            attempt = request
            if produced:
                attempt = inference_pb2.GenerateRequest()
                attempt.CopyFrom(request)
                attempt.resume_ids.extend(produced)
                CONTINUED.inc()
                log.warning("continuing a request on %s after %d token(s): %s", w.address, len(produced),
                            error.details())
            call = w.stub.Generate(attempt, timeout=_timeout(context), metadata=tenant)
            context.add_callback(call.cancel)  # the client's cancel or deadline reaches the worker
            try:
                for response in call:
                    produced.extend(response.token_ids)
                    yield response
                return
            except grpc.RpcError as e:
                self._failed(w, e)
                if e.code() not in RETRY or too_large(e.code(), e.details() or ""):
                    raise
                error = e
            finally:
                self.router.release(w)

    def GenerateUnary(self, request, context):
        # Joined from the stream, so a worker lost half way loses none of the work done.
        return join_chunks(self.Generate(request, context))

    def ModelInfo(self, request, context):
        check_names(request)
        return self.router.any_worker(request.model).stub.ModelInfo(request, timeout=_timeout(context) or 10)


class EndpointServicer(endpoint_pb2_grpc.EndpointServicer):
    def __init__(self, router: Router):
        self.router = router

    def ListWorkers(self, request, context):
        return endpoint_pb2.ListWorkersResponse(workers=[
            endpoint_pb2.WorkerInfo(id=w.id, address=w.address, model=w.model, load=w.load,
                                    max_batch=w.max_batch, requests_routed=w.routed) for w in self.router.snapshot()])


def tokenizer_passthrough(channel: grpc.Channel) -> grpc.GenericRpcHandler:
    """Every Tokenizer method forwarded as raw bytes to the tokenizer service (nothing re-parsed)."""
    def forward(path):
        upstream = channel.unary_unary(path)  # no (de)serializers: bytes in, bytes out

        def handler(request: bytes, context):
            return upstream(request, timeout=_timeout(context) or 30)
        return grpc.unary_unary_rpc_method_handler(handler)

    return grpc.method_handlers_generic_handler(
        TOKENIZER.full_name, {m.name: forward(f"/{TOKENIZER.full_name}/{m.name}") for m in TOKENIZER.methods})


def add_jobs(server: Server, redis_url: str, store: str | None):
    """The jobs API (services.jobs.api), when that package is present: its servicer, or None."""
    try:
        from services.jobs import api
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("services.jobs"):
            return None
        raise
    return api.add_to_server(server.grpc, SimpleNamespace(redis_url=redis_url, store_root=store))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default=env_default("INTERNLM_HOST", "127.0.0.1"))
    ap.add_argument("--port", type=int, default=50051)
    ap.add_argument("--metrics-port", type=int, default=9100)
    ap.add_argument("--metrics-host", default=env_default("INTERNLM_METRICS_HOST", "127.0.0.1"),
                    help="address of the Prometheus metrics port ($INTERNLM_METRICS_HOST; default loopback: "
                         "from outside, GET /metrics on the HTTP port, behind the API key)")
    ap.add_argument("--redis-url", default=env_default("INTERNLM_REDIS_URL", "redis://127.0.0.1:6379/0"))
    ap.add_argument("--tokenizer-address", default=env_default("INTERNLM_TOKENIZER_ADDRESS", "127.0.0.1:50052"))
    ap.add_argument("--store", default=env_default("INTERNLM_STORE", ""), help="the jobs' model store root")
    ap.add_argument("--no-jobs", action="store_true", help="do not serve the Jobs API")
    ap.add_argument("--http-port", type=int, default=int(env_default("INTERNLM_HTTP_PORT", "0")),
                    help="serve the OpenAI API and the web console on this port (0: no HTTP)")
    ap.add_argument("--api-key", default=env_default(API_KEY_ENV, ""),
                    help=f"require 'authorization: Bearer <key>' on every gRPC and HTTP call but health (${API_KEY_ENV}; "
                         "several keys comma-separated, any of them accepted)")
    ap.add_argument("--internal-token", default=env_default(INTERNAL_TOKEN_ENV, ""),
                    help=f"sent to the inference workers and the tokenizer service (${INTERNAL_TOKEN_ENV}), "
                         "which require it when they are given it too")
    ap.add_argument("--tls-cert", default=env_default(TLS_CERT_ENV, ""),
                    help=f"PEM certificate (chain) for TLS on the gRPC and HTTP ports (${TLS_CERT_ENV}); with --tls-key")
    ap.add_argument("--tls-key", default=env_default(TLS_KEY_ENV, ""), help=f"its PEM private key (${TLS_KEY_ENV})")
    ap.add_argument("--max-streams", type=int, default=int(env_default("INTERNLM_MAX_STREAMS", str(MAX_STREAMS))),
                    help="long calls open at once over both doors (every gRPC stream, GenerateUnary, the Tokenizer "
                         "calls forwarded, an HTTP generation's choices); beyond, RESOURCE_EXHAUSTED / 429 "
                         "($INTERNLM_MAX_STREAMS)")
    ap.add_argument("--max-streams-per-key", type=int,
                    default=int(env_default("INTERNLM_MAX_STREAMS_PER_KEY", str(MAX_STREAMS_PER_KEY))),
                    help="the same, for the calls of one API key (with --api-key) ($INTERNLM_MAX_STREAMS_PER_KEY)")
    ap.add_argument("--allowed-origins", default=env_default("INTERNLM_ALLOWED_ORIGINS", ""),
                    help="comma-separated origins (https://host:port) of pages elsewhere that may POST to "
                         "the HTTP side (default: none but its own)")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    keys, tls = parse_keys(args.api_key), tls_pair(args.tls_cert, args.tls_key)
    setup_logging("endpoint")
    try:
        streams = StreamLimit(args.max_streams, args.max_streams_per_key, keyed=bool(keys))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    server = Server("endpoint", args.port, args.host, args.metrics_port, metrics_host=args.metrics_host,
                    keys=keys, tls=tls, streams=streams, held=HELD)
    token = args.internal_token or None
    router = Router(args.redis_url, token=token).start()
    tokenizer = with_bearer(grpc.insecure_channel(args.tokenizer_address), token)
    proxy = InferenceProxy(router, tenants=bool(keys))
    inference_pb2_grpc.add_InferenceServicer_to_server(proxy, server.grpc)
    endpoint_pb2_grpc.add_EndpointServicer_to_server(EndpointServicer(router), server.grpc)
    server.grpc.add_generic_rpc_handlers([tokenizer_passthrough(tokenizer)])
    services = [INFERENCE.full_name, TOKENIZER.full_name, ENDPOINT.full_name]
    jobs = None if args.no_jobs else add_jobs(server, args.redis_url, args.store or None)
    if jobs is not None:
        services.append(JOBS.full_name)
    if not keys:
        log.warning("no API key: anyone who reaches %s:%d can call every service (see --api-key)", args.host, args.port)
    http = []

    def start_http():
        if not args.http_port:
            return
        from services.console_api import InProcess
        from services.http_server import HttpServer
        from services.openai_api import create_app

        # The console's job pages call this endpoint's Jobs servicer in this process: no channel,
        # so neither a key nor a TLS client of their own (the HTTP door has checked the caller).
        app = create_app(proxy, router, tokenizer, keys, jobs and InProcess(jobs),
                         [o for o in args.allowed_origins.split(",") if o], streams)
        http.append(HttpServer(app, args.host, args.http_port, tls).start())
        log.info("HTTP (OpenAI API, console) on %s:%d%s", args.host, http[0].port, " with TLS" if tls else "")

    def stop():
        for h in http:
            h.stop()
        router.stop()

    server.serve(services, on_start=start_http, on_stop=stop)


if __name__ == "__main__":
    main()
