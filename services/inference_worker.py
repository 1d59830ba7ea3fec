"""An inference worker: ``python -m services.inference_worker --model DIR --port 50061 --redis-url URL``.

Holds one model (a folder made by the converter, or an exported one) behind a continuous
batcher, serves ``internlm.v1.Inference`` and ``internlm.v1.Tokenizer`` with the model's own
tokenizer (the endpoint's Tokenizer calls that name this model), and registers itself in Redis with its load so the
endpoint can find it. Every RPC is: request -> one batcher call -> responses. Clients reach it
through the endpoint: it listens on loopback unless ``--host`` says otherwise, and then
``--internal-token`` keeps others out.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import time
import uuid
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram

from internlm_core.batching import SPECULATION, Batcher, BatcherMetrics
from internlm_core.checkpoint import MANIFEST_FILE, read_config
from internlm_core.draft import CATCH_UP_ROWS, check_draft_model
from internlm_core.errors import AdapterError, CheckpointError, ModelNotFound, TokenizerError
from internlm_core.generation import FINISH_ABORTED, FINISH_EOS, SamplingParams
from internlm_core.memory import CACHE_DTYPES, DEFAULT_SLOTS, available_memory, plan_serving
from internlm_core.quantize import METHODS
from internlm_core.tokenizer import BOS, Tokenizer
from internlm_core.tools import FINISH_TOOL_CALLS, check_family, prepare

from services.pb_convert import (check_names, chunk_to_pb, finish_to_pb, join_chunks, prompt_from_pb,
                                 sampling_from_pb, tools_from_pb)
from services.pb import inference_pb2, inference_pb2_grpc, tokenizer_pb2_grpc
from services.registry import Registration
from services.auth import NEED_TOKEN, TENANT_HEADER, metadata_value
from services.server_common import Server, add_access_arguments, env_default, setup_logging
from services.tokenizer_service import SERVICE_NAME as TOKENIZER_SERVICE, TokenizerServicer

log = logging.getLogger("internlm.worker")
SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5, 10, 30)


def precision(engine) -> str:
    """What the served weights and KV cache are held in, e.g. "int8 linears, bfloat16 rest; float16
    KV cache": the console, the registry and the metrics show it."""
    q, dtype = getattr(engine, "quantization", None), engine.config.dtype
    weights = f"{q} linears, {dtype} rest" if q else dtype
    if not getattr(engine, "kernels", True):
        weights = "float32 (MindSpore ops)"
    return f"{weights}; {getattr(engine, 'cache_dtype', 'float32')} KV cache"


class PrometheusMetrics(BatcherMetrics):
    """The batcher's reports as Prometheus series (names after vLLM's / TGI's)."""

    def __init__(self):
        self.ttft = Histogram("internlm_time_to_first_token_seconds", "Submit to first token", buckets=_LATENCY)
        self.itl = Histogram("internlm_inter_token_latency_seconds", "Between a request's tokens", buckets=_LATENCY)
        self.batch = Histogram("internlm_batch_size", "Sequences in each decode step",
                               buckets=(1, 2, 4, 8, 16, 32, 64))
        self.generated = Counter("internlm_generated_tokens_total", "Tokens generated")
        self.requests = Counter("internlm_requests_finished_total", "Requests ended, by finish reason",
                                ["finish_reason"])
        self.duration = Histogram("internlm_request_duration_seconds", "Submit to last token",
                                  buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.queue = Gauge("internlm_queue_size", "Requests waiting for a slot")
        self.active = Gauge("internlm_active_requests", "Requests holding a slot")
        self.prefix_queries = Counter("internlm_prefix_cache_queries_tokens_total", "Prompt tokens admitted")
        self.prefix_hits = Counter("internlm_prefix_cache_hits_tokens_total",
                                   "Prompt tokens whose KV was reused from a slot instead of computed")
        # method: where the proposals came from, ngram (prompt lookup) or draft (a draft model)
        self.drafts = Counter("internlm_spec_decode_draft_tokens_total",
                              "Proposed tokens verified (speculative decoding)", ["method"])
        self.accepted = Counter("internlm_spec_decode_accepted_tokens_total", "Proposed tokens kept", ["method"])
        self.per_step = Histogram("internlm_spec_decode_tokens_per_step",
                                  "Tokens one sequence got from one decode step (speculative decoding on)",
                                  ["method"], buckets=(1, 2, 3, 4, 5, 6, 7, 8))
        self.cache = Gauge("internlm_kv_cache_bytes", "KV cache allocated (with a draft model's)")
        self.weights = Gauge("internlm_weight_bytes", "Model weights held, by the precision they are held in",
                             ["precision"])
        # MindSpore compiles a graph per step shape (seconds each): a count that keeps growing under
        # steady traffic means the batcher's shape buckets do not fit the load.
        self.shapes = Gauge("internlm_step_shapes", "Distinct step shapes (rows, tokens, attended positions) "
                            "run so far; each was compiled once")

    def watch(self, batcher: Batcher) -> None:
        """Read the gauges from the batcher at each scrape."""
        self.queue.set_function(lambda: batcher.queued)
        self.active.set_function(lambda: batcher.active)
        draft = batcher.drafter.engine.cache_bytes if batcher.drafter else 0
        self.cache.set(batcher.engine.cache_bytes + draft)
        if batcher.speculate:  # its series are there, at zero, before the first step
            for series in (self.drafts, self.accepted, self.per_step):
                series.labels(batcher.method)
        self.weights.labels(precision(batcher.engine)).set(getattr(batcher.engine, "weight_bytes", 0))
        self.shapes.set_function(lambda: len(getattr(batcher.engine, "shapes_run", ())))


    def time_to_first_token(self, seconds):
        self.ttft.observe(seconds)

    def inter_token_latency(self, seconds):
        self.itl.observe(seconds)

    def batch_size(self, size):
        self.batch.observe(size)

    def prefix_cache(self, reused, prompt):
        self.prefix_queries.inc(prompt)
        self.prefix_hits.inc(reused)

    def tokens(self, n):
        self.generated.inc(n)

    def speculation(self, proposed, accepted, method):
        self.drafts.labels(method).inc(proposed)
        self.accepted.labels(method).inc(accepted)
        self.per_step.labels(method).observe(accepted + 1)

    def finished(self, reason, seconds):
        self.requests.labels(reason).inc()
        self.duration.observe(seconds)


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, batcher: Batcher, tokenizer: Tokenizer, name: str, draft_name: str = ""):
        self.batcher, self.tok, self.name, self.draft_name = batcher, tokenizer, name, draft_name

    def _check_model(self, request) -> None:
        check_names(request)
        model = request.model
        if model and model != self.name:
            raise ModelNotFound(f"unknown model {model!r}; this worker serves {self.name!r}")

    def _generate(self, request, context):
        """The responses of one request; a client's cancel or deadline cancels its handle."""
        self._check_model(request)
        tools = tools_from_pb(request)
        if tools is not None:
            check_family(self.tok)  # before rendering: the error says what the model lacks
        prompt = prompt_from_pb(request, self.tok, tools)
        params, parser = sampling_from_pb(request.params), None  # parser: the answer's calls, with tools
        if tools is not None:
            params, parser = prepare(tools, self.tok, params, request.resume_ids)
        tenant = metadata_value(context.invocation_metadata(), TENANT_HEADER) or ""
        handle = self.batcher.submit(prompt, params, request.adapter or None, resume=request.resume_ids,
                                     tenant=tenant)
        context.add_callback(handle.cancel)  # runs on cancel, deadline and normal end alike
        done = len(request.resume_ids)
        # Tokens named by this worker's own tokenizer: the model's, whatever family it is.
        token_text = self.token_text if params.logprobs or params.top_logprobs else None

        def chunk(events, reason):
            if parser is None:
                return chunk_to_pb(events, reason and finish_to_pb(reason, len(prompt), done, handle.seed),
                                   token_text=token_text)
            content, calls = parser.split(((e.token_id, e.text) for e in events), end=bool(reason))
            if reason == FINISH_EOS and parser.calls:
                reason = FINISH_TOOL_CALLS
            return chunk_to_pb(events, reason and finish_to_pb(reason, len(prompt), done, handle.seed), content, calls,
                               token_text)

        while (events := handle.next_events()) is not None:
            done += len(events)
            reason = events[-1].finish_reason
            yield chunk(events, reason)
            if reason:
                return
        # Aborted without a final token (worker stopping): still end with a final message.
        yield chunk([], FINISH_ABORTED)

    def token_text(self, token_id: int) -> str:
        """One token's own text, as logprobs name it: the id decoded alone."""
        return self.tok.decode([token_id])

    def Generate(self, request, context):
        yield from self._generate(request, context)

    def GenerateUnary(self, request, context):
        return join_chunks(self._generate(request, context))

    def ModelInfo(self, request, context):
        self._check_model(request)
        return model_info(self.batcher.engine, self.name, self.batcher.method, self.draft_name)


def model_info(engine, name: str, speculation: str = "off", draft_model: str = "") -> inference_pb2.ModelInfoResponse:
    cfg = engine.config
    return inference_pb2.ModelInfoResponse(speculation=speculation, draft_model=draft_model,
        model=name, preset=cfg.name, dtype=cfg.dtype, max_len=engine.max_len, vocab_size=cfg.vocab_size,
        adapters=sorted(engine.adapters), max_batch=engine.max_batch,
        num_parameters=cfg.num_parameters(), kv_cache_bytes=engine.cache_bytes,
        kv_cache_bytes_per_slot=engine.cache_bytes_per_slot,
        quantization=getattr(engine, "quantization", None) or "", weight_bytes=getattr(engine, "weight_bytes", 0))


def advertised(host: str, port: int, advertise: str | None) -> str:
    """The address the endpoint should dial: given, or this host's own address when listening on
    all interfaces (in compose: the container's address, distinct for every replica)."""
    if advertise:
        return advertise
    if host in ("0.0.0.0", "::", "[::]"):
        name = socket.gethostname()
        try:
            host = socket.gethostbyname(name)
        except OSError:
            host = name
    return f"{host}:{port}"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.environ.get("INTERNLM_MODEL"), help="model folder ($INTERNLM_MODEL)")
    ap.add_argument("--name", help="the model name requests use (default: the folder's name)")
    ap.add_argument("--host", default=env_default("INTERNLM_HOST", "127.0.0.1"))
    ap.add_argument("--port", type=int, default=50061)
    ap.add_argument("--advertise", help="address to register (default: host:port; on 0.0.0.0 this host's own address)")
    ap.add_argument("--metrics-port", type=int, default=9101)
    add_access_arguments(ap)
    ap.add_argument("--redis-url", default=env_default("INTERNLM_REDIS_URL", "redis://127.0.0.1:6379/0"),
                    help="where to register; '' = do not register")
    ap.add_argument("--max-batch", type=int, default=int(env_default("INTERNLM_MAX_BATCH", "0")),
                    help="slots in the running batch (0 = up to 8, as many as the memory available holds)")
    ap.add_argument("--max-queue", type=int, default=int(env_default("INTERNLM_MAX_QUEUE", "32")),
                    help="requests waiting for a slot before RESOURCE_EXHAUSTED")
    ap.add_argument("--max-len", type=int, default=int(env_default("INTERNLM_MAX_LEN", "0")),
                    help="positions per slot: prompt + generated (0 = the model's, at most 4096, fewer where "
                         "the memory available needs it)")
    ap.add_argument("--quantize", choices=METHODS, default=env_default("INTERNLM_QUANTIZE", "") or None,
                    help="quantise a float model's linears while loading ($INTERNLM_QUANTIZE): int8 (per-channel "
                         "scales), a quarter of fp32's bytes, half of bf16's; int4 (a scale per 32 inputs), "
                         "about a sixth of fp32's")
    ap.add_argument("--kv-cache-dtype", choices=CACHE_DTYPES,
                    default=env_default("INTERNLM_KV_CACHE_DTYPE", "") or None,
                    help="the KV cache's dtype (default: float16 where the CPU kernels serve, half the bytes of "
                         "float32 with the same greedy tokens on the parity tests; float32 on MindSpore's ops)")
    ap.add_argument("--speculate", choices=("auto", *SPECULATION), default=env_default("INTERNLM_SPECULATE", "auto"),
                    help="speculative decoding ($INTERNLM_SPECULATE): ngram verifies prompt-lookup proposals in the "
                         "decode steps, draft the proposals of --draft-model (greedy: the same tokens as without; "
                         "sampled: the same distribution; a request's speculate=false opts out); auto: draft with "
                         "--draft-model, else ngram where the CPU kernels serve, off on MindSpore's ops (not exact "
                         "there)")
    ap.add_argument("--draft-model", default=env_default("INTERNLM_DRAFT_MODEL", "") or None, metavar="DIR",
                    help="a smaller model folder with the same tokenizer whose tokens are verified as proposals "
                         "(greedy ones, or for a sampled request samples kept by the rejection rule) "
                         "($INTERNLM_DRAFT_MODEL; its own KV cache of the same slots, counted in the memory plan; "
                         "the positions are cut to the draft's)")
    ap.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                    help="serve a LoRA adapter folder under NAME (repeatable); requests pick it by name")
    return ap


def check_draft(args, cfg, tokenizer):
    """The config of ``--draft-model`` (None without one), or SystemExit naming what is wrong
    (``draft.check_draft_model``: checked before any weights load)."""
    try:
        return check_draft_model(args.speculate, args.draft_model, args.model, cfg, tokenizer)
    except ValueError as e:
        raise SystemExit(f"worker: {e}") from None


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if not args.model:
        raise SystemExit("worker: give --model DIR (or set INTERNLM_MODEL)")
    setup_logging("worker")
    from internlm_core.engine import open_engine, serving_dtypes

    folder = Path(args.model)
    name = args.name or folder.resolve().name
    try:  # the model's family picks the chat format and stops; its tokenizer must name their tokens.
        # Checked before the weights load: a wrong folder is refused in a second, not after minutes.
        cfg = read_config(folder)
        tokenizer = Tokenizer.for_model(folder, cfg.family)
    except (TokenizerError, CheckpointError) as e:
        raise SystemExit(f"worker: {e}") from None
    draft_cfg = check_draft(args, cfg, tokenizer)
    max_batch, max_len = args.max_batch or None, args.max_len or None
    try:
        if not (folder / MANIFEST_FILE).is_file():  # an exported pair is sized by its manifest
            weights_dtype, cache_dtype = serving_dtypes(cfg, args.quantize, args.kv_cache_dtype)
            draft = draft_cfg and (draft_cfg, serving_dtypes(draft_cfg, args.quantize, args.kv_cache_dtype)[0])
            plan = plan_serving(cfg, weights_dtype, cache_dtype, available_memory(), max_batch, max_len, draft)
            log.info("%d slots x %d positions (%s weights, %s KV cache): %s", plan.max_batch, plan.max_len,
                     weights_dtype, cache_dtype, plan.reason)
            max_batch, max_len = plan.max_batch, plan.max_len
        engine = open_engine(folder, max_batch=max_batch or DEFAULT_SLOTS, max_len=max_len, quantize=args.quantize,
                             cache_dtype=args.kv_cache_dtype)
    except (ValueError, CheckpointError) as e:  # e.g. --quantize on an exported model
        raise SystemExit(f"worker: {e}") from None
    except MemoryError as e:  # refused before loading: say so plainly instead of a traceback
        raise SystemExit(f"worker: {e}") from None
    for spec in args.adapter:
        adapter, _, path = spec.partition("=")
        if not adapter or not path:
            raise SystemExit(f"worker: --adapter takes NAME=DIR, got {spec!r}")
        try:
            engine.load_adapter(adapter, path)
        except AdapterError as e:  # not an adapter of this model, or an engine that has none
            raise SystemExit(f"worker: --adapter {spec}: {e}") from None
    metrics = PrometheusMetrics()
    speculate = args.speculate
    if speculate == "auto":  # a draft model given is used (the batcher refuses it off the kernels)
        speculate = "draft" if args.draft_model else "ngram" if engine.kernels else "off"
    draft = None
    if args.draft_model:
        try:  # the same slots and positions as the target's, its cache in the same dtype
            draft = open_engine(args.draft_model, max_batch=engine.max_batch, max_len=engine.max_len,
                                quantize=args.quantize, cache_dtype=engine.cache_dtype)
        except (ValueError, CheckpointError, MemoryError) as e:
            raise SystemExit(f"worker: --draft-model {args.draft_model}: {e}") from None
    try:
        batcher = Batcher(engine, tokenizer, args.max_queue, metrics, speculate=speculate, draft=draft).start()
    except ValueError as e:  # ngram or draft asked for on an engine without the kernels
        raise SystemExit(f"worker: --speculate {args.speculate}: {e}") from None
    metrics.watch(batcher)
    # Compile prefill and every decode shape now, not on a client's time.
    started = time.monotonic()
    shapes = engine.warmup(batcher.speculate_rows) if batcher.speculate else engine.warmup()
    if draft is not None:  # its first step feeds up to two tokens a sequence (draft.CATCH_UP_ROWS)
        shapes += draft.warmup(CATCH_UP_ROWS * draft.max_batch)
    log.info("compiled %d step shapes in %.1f s", shapes, time.monotonic() - started)
    if batcher.speculate and (cost := batcher.measure()):
        log.info("decode step: %.2f ms + %.3f ms a row; proposals fill the rows that pay for themselves",
                 cost.fixed * 1e3, cost.per_row * 1e3)
    batcher.submit([BOS, BOS], SamplingParams(max_new_tokens=2, ignore_eos=True)).result()
    quantization = getattr(engine, "quantization", None)
    log.info("serving %s (%s, weights %s%s, %d slots x %d positions, KV cache %s %.0f MiB, %.1f MiB a slot, %s)",
             name, engine.config.name,
             f"{quantization} linears + {engine.config.dtype}" if quantization else engine.config.dtype,
             f" {engine.weight_bytes / 2**20:.0f} MiB" if getattr(engine, "weight_bytes", 0) else "",
             engine.max_batch, engine.max_len, getattr(engine, "cache_dtype", "float32"), engine.cache_bytes / 2**20,
             engine.cache_bytes_per_slot / 2**20, "CPU kernels" if getattr(engine, "kernels", False) else "MindSpore ops")
    log.info("speculative decoding: %s%s", speculate, f" (draft model {args.draft_model})" if draft else "")

    server = Server("worker", args.port, args.host, args.metrics_port,
                    max_workers=engine.max_batch + args.max_queue + 8, metrics_host=args.metrics_host,
                    keys=[args.internal_token] if args.internal_token else [], refusal=NEED_TOKEN)
    draft_name = Path(args.draft_model).resolve().name if draft else ""
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(batcher, tokenizer, name, draft_name),
                                                       server.grpc)
    tokenizer_pb2_grpc.add_TokenizerServicer_to_server(TokenizerServicer(tokenizer, name), server.grpc)
    address = advertised(args.host, args.port, args.advertise)

    def info():  # what the endpoint reads from the registry, renewed every heartbeat
        return {"address": address, "model": name, "load": batcher.load, "active": batcher.active,
                "queued": batcher.queued, "max_batch": engine.max_batch, "pid": os.getpid(),
                "precision": precision(engine), "weight_bytes": getattr(engine, "weight_bytes", 0)}

    registration = None
    if args.redis_url:
        registration = Registration(args.redis_url, f"{address}-{uuid.uuid4().hex[:6]}", info)

    def start():
        if registration:
            registration.start()

    def stop():  # leave the registry first, then let the running streams finish
        if registration:
            registration.stop()
        batcher.stop(drain=True, timeout=float(env_default("INTERNLM_GRACE_S", "20")))

    server.serve([SERVICE_NAME, TOKENIZER_SERVICE], on_start=start, on_stop=stop)


if __name__ == "__main__":
    main()
