"""The public endpoint: ``python -m services.endpoint --port 50051 --redis-url URL``.

One address for clients, two doors onto one in-process gateway (``gateway.py``: routing to the
least-loaded live inference worker, generation with failover, model info, the jobs). The gRPC
door, here: ``internlm.v1.Inference`` and ``internlm.v1.Endpoint`` (the workers) as calls of the
gateway, the Jobs API when the jobs package is installed, and ``internlm.v1.Tokenizer`` passed
through (as bytes) to the tokenizer service, or to a worker of the model a request names (the
gateway's ``tokenizer_call``). Statuses from behind pass through as they are. The door is a
``grpc.aio`` server on the gateway's own event loop (``server_common.AioServer``): a call, a stream
included, is a task of that loop and holds no thread.

With ``--http-port`` it also serves HTTP (``services/openai_api.py``): the OpenAI API, health,
metrics and the web console, over the same gateway. ``--api-key`` (or INTERNLM_API_KEY; several,
comma-separated) makes every call on both doors need ``authorization: Bearer <key>``, but health
and the console's static files; without it both doors are open. ``--tls-cert`` / ``--tls-key`` put
both doors on TLS. ``--internal-token`` is what it sends to the workers and the tokenizer service
(``services/auth.py``). ``--allowed-origins`` (or INTERNLM_ALLOWED_ORIGINS) names the web pages
elsewhere that may send the HTTP door POSTs (by default only its own, the console).
"""
from __future__ import annotations

import argparse
import logging
from concurrent import futures
from types import SimpleNamespace

import grpc

from services.auth import API_KEY_ENV, INTERNAL_TOKEN_ENV, TLS_CERT_ENV, TLS_KEY_ENV, parse_keys, tls_pair
from services.gateway import Gateway, Router
from services.pb_convert import join_chunks
from services.pb import endpoint_pb2, endpoint_pb2_grpc, inference_pb2, inference_pb2_grpc, jobs_pb2, jobs_pb2_grpc, tokenizer_pb2
from services.server_common import (MAX_STREAMS, MAX_STREAMS_PER_KEY, UNARY_HEADROOM, AioServer, StreamLimit, env_default,
                                    setup_logging)

log = logging.getLogger("internlm.endpoint")

INFERENCE = inference_pb2.DESCRIPTOR.services_by_name["Inference"]
TOKENIZER = tokenizer_pb2.DESCRIPTOR.services_by_name["Tokenizer"]
ENDPOINT = endpoint_pb2.DESCRIPTOR.services_by_name["Endpoint"]
JOBS = jobs_pb2.DESCRIPTOR.services_by_name["Jobs"]
# Unary calls that run long, counted with the streams (``StreamLimit``): generation (a worker's slot
# or queue place), and the tokenizer's, each waiting on the tokenizer service or a worker for
# megabytes of text.
HELD = [f"/{INFERENCE.full_name}/GenerateUnary", *(f"/{TOKENIZER.full_name}/{m.name}" for m in TOKENIZER.methods)]


def _timeout(context) -> float | None:
    """The seconds left to a gRPC call's deadline; None when it has none."""
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining < 1e6 else None


class InferenceDoor(inference_pb2_grpc.InferenceServicer):
    """The gRPC door of the gateway's generation and model info, on the gateway's own loop: a
    stream is read there directly, no thread each. A client's cancel or deadline cancels the call's
    task, which cancels the worker's call (``gateway.Stream``)."""

    def __init__(self, gateway: Gateway):
        self.gateway = gateway

    def _stream(self, request, context):
        return self.gateway.generate(request, context.invocation_metadata(), _timeout(context))

    async def Generate(self, request, context):
        async for response in self._stream(request, context):
            yield response

    async def GenerateUnary(self, request, context):
        # Joined from the stream, so a worker lost half way loses none of the work done.
        return join_chunks([response async for response in self._stream(request, context)])

    async def ModelInfo(self, request, context):
        return await self.gateway.model_info_async(request.model, _timeout(context))


class EndpointServicer(endpoint_pb2_grpc.EndpointServicer):
    def __init__(self, gateway: Gateway):
        self.gateway = gateway

    async def ListWorkers(self, request, context):
        return endpoint_pb2.ListWorkersResponse(workers=[
            endpoint_pb2.WorkerInfo(id=w.id, address=w.address, model=w.model, load=w.load,
                                    max_batch=w.max_batch, requests_routed=w.routed) for w in self.gateway.workers()])


def tokenizer_passthrough(gateway: Gateway) -> grpc.GenericRpcHandler:
    """Every Tokenizer method, its request and response as bytes (no (de)serializers), through the
    gateway, which sends it to the tokenizer service or to a worker of the model it names."""
    def forward(method):
        async def handler(request: bytes, context):
            return await gateway.tokenizer_call(method, request, _timeout(context) or 30)
        return grpc.unary_unary_rpc_method_handler(handler)

    return grpc.method_handlers_generic_handler(TOKENIZER.full_name, {m.name: forward(m.name) for m in TOKENIZER.methods})


def jobs_api(redis_url: str, store: str | None):
    """The Jobs API (``services.jobs.api.Jobs``), when that package is present; else None."""
    try:
        from services.jobs import api
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("services.jobs"):
            return None
        raise
    return api.Jobs(SimpleNamespace(redis_url=redis_url, store_root=store))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default=env_default("INTERNLM_HOST", "127.0.0.1"))
    ap.add_argument("--port", type=int, default=50051)
    ap.add_argument("--metrics-port", type=int, default=9100)
    ap.add_argument("--metrics-host", default=env_default("INTERNLM_METRICS_HOST", "127.0.0.1"),
                    help="address of the Prometheus metrics port ($INTERNLM_METRICS_HOST; default loopback: "
                         "from outside, GET /metrics on the HTTP port, behind the API key)")
    ap.add_argument("--redis-url", default=env_default("INTERNLM_REDIS_URL", "redis://127.0.0.1:6379/0"))
    ap.add_argument("--tokenizer-address", default=env_default("INTERNLM_TOKENIZER_ADDRESS", "127.0.0.1:50052"),
                    help="the tokenizer service, for Tokenizer calls that name no model (those naming a model go "
                         "to its workers) ($INTERNLM_TOKENIZER_ADDRESS)")
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
    token = args.internal_token or None
    jobs = None if args.no_jobs else jobs_api(args.redis_url, args.store or None)
    gateway = Gateway(Router(args.redis_url, token=token).start(), keyed=bool(keys), jobs=jobs,
                      tokenizer=args.tokenizer_address)
    server = AioServer("endpoint", args.port, gateway.router.loop, args.host, args.metrics_port,
                       metrics_host=args.metrics_host, keys=keys, tls=tls, streams=streams, held=HELD)
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceDoor(gateway), server.grpc)
    endpoint_pb2_grpc.add_EndpointServicer_to_server(EndpointServicer(gateway), server.grpc)
    server.grpc.add_generic_rpc_handlers([tokenizer_passthrough(gateway)])
    services = [INFERENCE.full_name, TOKENIZER.full_name, ENDPOINT.full_name]
    if jobs is not None:
        from services.jobs.api import AioJobsServicer

        # Jobs reads Redis and the store with blocking clients: its short calls run on threads of their
        # own, made as needed (a watcher is a task on redis.asyncio, holding none).
        pool = futures.ThreadPoolExecutor(streams.total + UNARY_HEADROOM, thread_name_prefix="jobs")
        jobs_pb2_grpc.add_JobsServicer_to_server(AioJobsServicer(jobs, pool), server.grpc)
        services.append(JOBS.full_name)
    if not keys:
        log.warning("no API key: anyone who reaches %s:%d can call every service (see --api-key)", args.host, args.port)
    http = []

    def start_http():
        if not args.http_port:
            return
        from services.http_server import HttpServer
        from services.openai_api import create_app

        app = create_app(gateway, keys, [o for o in args.allowed_origins.split(",") if o], streams)
        http.append(HttpServer(app, args.host, args.http_port, tls).start())
        log.info("HTTP (OpenAI API, console) on %s:%d%s", args.host, http[0].port, " with TLS" if tls else "")

    def stop():
        for h in http:
            h.stop()
        gateway.router.stop()

    server.serve(services, on_start=start_http, on_stop=stop)


if __name__ == "__main__":
    main()
