"""The endpoint's gateway: everything its two doors serve, called in process.

    gateway = Gateway(Router(redis_url, token=token).start(), keyed=bool(keys), jobs=Jobs(settings),
                      tokenizer="127.0.0.1:50052")
    stream = gateway.generate(request, metadata, timeout)   # async for: GenerateResponses; stream.cancel()
    gateway.model_info("m") (await gateway.model_info_async("m") on the router's loop),
    gateway.resolve("adapter-or-model"), gateway.workers(), gateway.jobs
    await gateway.tokenizer_call("Encode", request_bytes, timeout)  # on the router's loop: the tokenizer service's or a model's

The gRPC servicers (``endpoint.py``) and the HTTP routes (``openai_api.py``, ``console_api.py``)
each only translate their wire form to and from these calls, so routing, failover, model info and
the jobs behave the same on both doors. Errors are raised (the core's, or a worker's status as a
``grpc.RpcError``) and each door maps them through the one table (``server_common.status_of``).
Token strings (logprobs) come from the worker that generated them, named by its own tokenizer
(``GenerateResponse.tokens``), so models of different families can serve side by side; for the
same reason a Tokenizer call naming a model is answered by a worker of that model.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field, replace

import grpc
import redis
from prometheus_client import Counter, Gauge

from internlm_core.errors import Cancelled, DeadlineExceeded, ModelNotFound, Unavailable
from services.auth import TENANT_HEADER, bearer, tenant_of
from services.pb import inference_pb2, inference_pb2_grpc, tokenizer_pb2
from services.pb_convert import check_names
from services.registry import TTL_S, list_workers
from services.server_common import too_large

log = logging.getLogger("internlm.gateway")

# The worker has stopped serving the request (or never took it): another worker takes it over
# (not a request grpc refused as too large, which every worker would refuse: see ``too_large``).
RETRY = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
INFO_TTL_S = 5.0  # a model's info is reused this long by resolve() and models(): one call per request otherwise
TOKENIZER = tokenizer_pb2.DESCRIPTOR.services_by_name["Tokenizer"]
# Each Tokenizer method's request type: the gateway reads the model a call names from it.
TOKENIZER_REQUESTS = {m.name: getattr(tokenizer_pb2, m.input_type.name) for m in TOKENIZER.methods}

ROUTED = Counter("internlm_endpoint_routed_total", "Generate requests sent to workers", ["worker"])
LOST = Counter("internlm_endpoint_worker_failures_total", "Calls that found a worker gone", ["worker"])
WORKERS = Gauge("internlm_endpoint_workers", "Live inference workers")
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
    channel: grpc.aio.Channel = field(default=None, repr=False)  # opened on the router's loop at first use
    stub: inference_pb2_grpc.InferenceStub = field(default=None, repr=False)


class Router:
    """The live workers, refreshed from Redis in the background; picks the least loaded. Its calls
    to the workers run on its one event loop (``loop``, a thread of its own) over ``grpc.aio``
    channels: a stream costs no thread here, whichever door it came in by. The endpoint's gRPC
    server runs on the same loop (``server_common.AioServer``)."""

    def __init__(self, redis_url: str, refresh_s: float = 0.5, token: str | None = None):
        self.r = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self.refresh_s = refresh_s
        self.metadata = (bearer(token),) if token else ()  # the internal token, sent on every call to a worker
        self.workers: dict[str, WorkerRef] = {}
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self._stop = threading.Event()
        self._warned = False
        WORKERS.set_function(lambda: len(self.workers))  # the latest router's (one a process, but in tests)

    def start(self) -> "Router":
        threading.Thread(target=self.loop.run_forever, name="gateway-loop", daemon=True).start()
        self.refresh()
        threading.Thread(target=self._loop, name="router", daemon=True).start()
        return self

    def run(self, coroutine):
        """Run ``coroutine`` on the loop and wait for its result (from a thread not the loop's)."""
        if _running_loop() is self.loop:  # waiting here would stop the loop for good (the gRPC door runs on it)
            coroutine.close()
            raise RuntimeError("Router.run called on the router's own loop: await the coroutine instead")
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def channel(self, w: WorkerRef) -> grpc.aio.Channel:
        """``w``'s channel, opened now if it has none yet (on the loop)."""
        self.stub(w)
        return w.channel

    def stub(self, w: WorkerRef) -> inference_pb2_grpc.InferenceStub:
        """``w``'s stub, its channel opened now if it has none yet (on the loop: an aio channel is its loop's)."""
        with self.lock:
            if w.stub is None:
                w.channel = grpc.aio.insecure_channel(w.address)
                w.stub = inference_pb2_grpc.InferenceStub(w.channel)
            return w.stub

    def _close(self, w: WorkerRef) -> None:
        """Close a retired worker's channel (called with the lock held, from any thread)."""
        if w.channel is not None:
            asyncio.run_coroutine_threadsafe(w.channel.close(), self.loop)

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
                    log.info("worker %s at %s (%s) joined", wid, w.address, w.model)
                w.load, w.max_batch, w.precision = info["load"], info["max_batch"], info["precision"]
            for wid in set(self.workers) - set(found):
                w = self.workers.pop(wid)
                w.retired = True
                log.info("worker %s at %s left", wid, w.address)
                if w.inflight == 0:
                    self._close(w)

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

    def next_worker(self, model: str, tried: set, error: grpc.RpcError | None) -> WorkerRef:
        """``acquire`` a worker for ``model`` not ``tried`` yet (added to it); when none is left
        after ``error`` (the last one's refusal), that error."""
        try:
            w = self.acquire(model, tried)
        except Unavailable:
            if error is not None:  # every worker refused: pass on the last one's own status
                raise error from None
            raise
        tried.add(w.id)
        return w

    def release(self, w: WorkerRef) -> None:
        with self.lock:
            w.inflight -= 1
            if w.retired and w.inflight == 0:
                self._close(w)

    def lost(self, w: WorkerRef) -> None:
        """Route around a worker that failed to answer until its registration would have expired."""
        LOST.labels(w.address).inc()
        with self.lock:
            w.down_until = time.monotonic() + TTL_S

    def snapshot(self) -> list[WorkerRef]:
        """The live workers now (copies, by address), for reports."""
        with self.lock:
            return [replace(w) for w in sorted(self.workers.values(), key=lambda w: w.address)]

    def served(self) -> list[str]:
        """The models the live workers serve, by name."""
        with self.lock:
            return sorted({w.model for w in self.workers.values()})


def with_seed(request: inference_pb2.GenerateRequest) -> inference_pb2.GenerateRequest:
    """A sampled request without a seed gets one here, before any worker sees it: a continuation
    on another worker then draws the same numbers as the worker that went away."""
    if request.params.temperature <= 0 or request.params.HasField("seed"):
        return request
    seeded = inference_pb2.GenerateRequest()
    seeded.CopyFrom(request)
    seeded.params.seed = secrets.randbits(63)
    return seeded


class Stream:
    """One request's generation. When a worker goes away mid-stream, another continues the request
    from the tokens already streamed (``resume_ids``), so the caller sees one stream. ``async for`` it
    on any event loop: on the router's own (the gRPC door) it reads the one failover loop,
    ``_responses``, directly; on another (the HTTP door) each step is run on the router's loop. ``cancel()``,
    from any thread (the caller went away, its deadline passed), cancels the worker's call at
    once, so the worker frees the slot within a step; the stream then ends with ``Cancelled``."""

    def __init__(self, router: Router, request, tenant: str, deadline: float | None):
        self.router, self.request, self.deadline = router, request, deadline
        self.metadata = (*router.metadata, (TENANT_HEADER, tenant))
        self._call, self.cancelled = None, False

    def cancel(self) -> None:
        self.cancelled = True
        self.router.loop.call_soon_threadsafe(self._cancel_call)

    def _cancel_call(self) -> None:
        if self._call is not None:
            self._call.cancel()

    async def _responses(self):
        tried, error, produced = set(), None, []
        while True:
            try:
                w = self.router.next_worker(self.request.model, tried, error)
            except grpc.RpcError as e:
                if produced:
                    raise Unavailable(f"the worker went away after {len(produced)} token(s) and no other live "
                                      f"worker can continue the request: {e.details()}") from None
                raise
            attempt = self.request
            if produced:
                attempt = inference_pb2.GenerateRequest()
                attempt.CopyFrom(self.request)
                attempt.resume_ids.extend(produced)
                CONTINUED.inc()
                log.warning("continuing a request on %s after %d token(s): %s", w.address, len(produced),
                            error.details())
            timeout = None if self.deadline is None else max(self.deadline - time.monotonic(), 0.0)
            call = None
            try:
                call = self._call = self.router.stub(w).Generate(attempt, timeout=timeout, metadata=self.metadata)
                if self.cancelled:  # cancelled while no call was open
                    call.cancel()
                async for response in call:
                    produced.extend(response.token_ids)
                    yield response
                return
            except asyncio.CancelledError:  # the call cancelled (an aio call's cancel ends its reads so)
                if self.cancelled:
                    raise Cancelled("the call was cancelled") from None
                raise
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    self.router.lost(w)
                if e.code() not in RETRY or too_large(e.code(), e.details() or ""):
                    raise
                error = e
            finally:
                if call is not None:
                    call.cancel()  # a no-op once it ended; else (the reader left) the worker stops
                self.router.release(w)

    def _step(self, responses):
        return asyncio.run_coroutine_threadsafe(anext(responses), self.router.loop)

    def _close(self, responses) -> None:
        asyncio.run_coroutine_threadsafe(_aclose(responses), self.router.loop)

    async def __aiter__(self):
        if asyncio.get_running_loop() is self.router.loop:  # a door on the router's own loop (gRPC's): no hop
            async with contextlib.aclosing(self._responses()) as responses:
                async for response in responses:
                    yield response
            return
        responses = self._responses()  # on another loop (HTTP's): each step run on the router's
        try:
            while True:
                try:
                    yield await asyncio.wrap_future(self._step(responses))
                except StopAsyncIteration:
                    return
        finally:
            self._close(responses)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # no loop runs on this thread
        return None


async def _aclose(responses) -> None:
    try:
        await responses.aclose()
    except RuntimeError:  # still running a step that its cancel is ending: it ends on its own
        pass


class Gateway:
    """Routing, generation with failover, model info and the jobs, for both doors of the endpoint."""

    def __init__(self, router: Router, keyed: bool = False, jobs=None, tokenizer: str = ""):
        """``keyed``: the doors take API keys; then workers are told whose key each call came with
        (``auth.tenant_of``), so that cached prompt rows are reused within one key only (without
        keys every caller is one). ``jobs``: the Jobs API (``services.jobs.api.Jobs``), or None.
        ``tokenizer``: the tokenizer service's address (Tokenizer calls that name no model)."""
        self.router, self.keyed, self.jobs = router, keyed, jobs
        self.tokenizer_address, self._tokenizer = tokenizer, None  # its channel: opened on the loop at first use
        self._infos: dict[str, tuple[float, inference_pb2.ModelInfoResponse]] = {}

    def tenant(self, metadata) -> str:
        """Whose call this is (``(name, value)`` metadata pairs, its ``authorization`` among them)."""
        return tenant_of(metadata) if self.keyed else ""

    def generate(self, request: inference_pb2.GenerateRequest, metadata=(), timeout: float | None = None) -> Stream:
        """The request's Stream (nothing is sent before it is iterated); ``timeout``: seconds left
        to the caller's deadline, None for none."""
        check_names(request)  # before the router quotes an unknown name back
        return Stream(self.router, with_seed(request), self.tenant(metadata),
                      None if timeout is None else time.monotonic() + timeout)

    async def model_info_async(self, model: str, timeout: float | None = None) -> inference_pb2.ModelInfoResponse:
        """A live worker's ModelInfo for ``model`` ('' = any), asked now (on the router's loop);
        another worker of it answers for one that is gone."""
        request = inference_pb2.ModelInfoRequest(model=model)
        check_names(request)
        return await self._on_a_worker(
            model, lambda w, left: self.router.stub(w).ModelInfo(request, timeout=left, metadata=self.router.metadata),
            time.monotonic() + (timeout or 10))

    def model_info(self, model: str, timeout: float | None = None) -> inference_pb2.ModelInfoResponse:
        """``model_info_async`` from a thread not the router's loop."""
        return self.router.run(self.model_info_async(model, timeout))

    def cached_info(self, model: str) -> inference_pb2.ModelInfoResponse:
        """``model_info``, reused for INFO_TTL_S (adapters can come with a worker that joins later)."""
        hit = self._infos.get(model)
        if hit and time.monotonic() - hit[0] < INFO_TTL_S:
            return hit[1]
        info = self.model_info(model)
        self._infos[model] = (time.monotonic(), info)
        return info

    def models(self) -> list[inference_pb2.ModelInfoResponse]:
        """The info of each model served now, by name (its adapters listed in it)."""
        return [self.cached_info(name) for name in self.router.served()]

    def resolve(self, model_id: str) -> tuple[str, str, inference_pb2.ModelInfoResponse]:
        """(model, adapter, the model's info) for a name that is a served model, one of its
        adapters, or '' (any model)."""
        if not model_id or model_id in self.router.served():
            return model_id, "", self.cached_info(model_id)
        infos = self.models()
        for info in infos:
            if model_id in info.adapters:
                return info.model, model_id, info
        names = [n for info in infos for n in (info.model, *info.adapters)]
        raise ModelNotFound(f"the model {model_id!r} does not exist; served here: "
                            f"{', '.join(names) or 'nothing yet'}")

    def workers(self) -> list[WorkerRef]:
        return self.router.snapshot()

    async def tokenizer_call(self, method: str, request: bytes, timeout: float | None = None) -> bytes:
        """One ``internlm.v1.Tokenizer`` call, its request and response serialized (as the door got
        it; passed on unchanged but for an adapter's name), on the router's loop. A request naming no
        model goes to the tokenizer service; one naming a served model, or one of its adapters, to a
        live worker of that model, which answers with its own tokenizer and chat format (another
        worker of it takes the call over from one that is gone). An unknown model: ``ModelNotFound``."""
        parsed = TOKENIZER_REQUESTS[method].FromString(request)
        check_names(parsed)
        path = f"/{TOKENIZER.full_name}/{method}"
        if not parsed.model:
            return await self._tokenizer_call(None, path, request, timeout)
        model, deadline = parsed.model, None if timeout is None else time.monotonic() + timeout
        if model not in self.router.served():  # an adapter's (its base model's tokenizer), or NOT_FOUND
            # resolve asks workers through Router.run, which must not wait on its own loop: a thread
            parsed.model = model = (await asyncio.to_thread(self.resolve, model))[0]
            request = parsed.SerializeToString()  # named as its model's workers answer to
        return await self._on_a_worker(model, lambda w, left: self._tokenizer_call(w, path, request, left), deadline)

    async def _on_a_worker(self, model: str, call, deadline: float | None):
        """``await call(w, seconds_left)`` on a live worker ``w`` of ``model``, on the router's loop;
        when ``w`` is gone (UNAVAILABLE) another takes the call over. Every try is within the one
        ``deadline`` (``time.monotonic()``; None: none), so retries do not stretch the caller's
        time: once it has passed, ``DeadlineExceeded``."""
        tried, error = set(), None
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                gone = f" ({len(tried)} gone, the last: {error.details()})" if error is not None else ""
                raise DeadlineExceeded(f"the deadline passed before a worker of {model or 'the default model'} "
                                       f"answered{gone}")
            w = self.router.next_worker(model, tried, error)
            try:
                return await call(w, left)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                self.router.lost(w)
                error = e
            finally:
                self.router.release(w)

    async def _tokenizer_call(self, w: WorkerRef | None, path: str, request: bytes, timeout: float | None) -> bytes:
        """The call on ``w``'s channel, or the tokenizer service's (None); on the router's loop."""
        if w is not None:
            channel = self.router.channel(w)
        else:
            if self._tokenizer is None:
                self._tokenizer = grpc.aio.insecure_channel(self.tokenizer_address)
            channel = self._tokenizer
        return await channel.unary_unary(path)(request, timeout=timeout, metadata=self.router.metadata)
