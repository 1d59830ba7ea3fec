"""Bad input across every RPC of every server, generated from the protos themselves: for each
request field (one level into nested messages) extreme numbers, NaN and infinities, empty, huge
and invalid-UTF-8 strings, long repeated fields, unknown enum values; plus bytes that are no
protobuf at all, truncated messages and messages over the size limit. Every answer must be OK or
a status that names the client's mistake (never INTERNAL or UNKNOWN), and every server must still
be up and serving afterwards. Then the HTTP door's bad input (``HTTP_CASES``: the hardening
issue's findings, each limit crossed, what a page elsewhere can send), each with its status.

Meanwhile victims stream from the same worker through the endpoint, back to back on two threads
so that one is always open, and the cases are sent one at a time, so that what a victim meets
is that case's doing: every case is timed against the victim streams open while it ran, each of
which must bring all its tokens (the ones it brings alone) with no wait for a token longer than
GAP_S while the case ran; and the victims' median speed must be at least half of what it is
without the barrage. Afterwards each server's memory is flat (RSS within RSS_GROWTH_MB of before)
and the model store holds exactly the files it held before. The figures are printed (pytest -s)
for the closing notes."""
from __future__ import annotations

import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

import grpc
import httpx
import pytest
from google.protobuf.descriptor import FieldDescriptor as F
from google.protobuf.message_factory import GetMessageClass

from services.pb import common_pb2, endpoint_pb2, inference_pb2, inference_pb2_grpc, jobs_pb2, tokenizer_pb2

INT_EXTREMES = {F.TYPE_INT32: (-2**31, 2**31 - 1), F.TYPE_INT64: (-2**63, 2**63 - 1),
                F.TYPE_UINT32: (2**32 - 1,), F.TYPE_UINT64: (2**64 - 1,)}
FLOATS = (math.nan, math.inf, -math.inf, 3.0e38, -3.0e38)
MARK, BAD_UTF8 = b"ZQXJ", b"\xff\xfe\xc3\x28"  # same length: swapped into the encoded bytes
HUGE = 2_000_000  # characters or repeated elements: big, still under gRPC's 4 MB message limit
# Answers that say the request was at fault (or, for a stream left waiting, that its deadline came).
CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE,
                 grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION,
                 grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.DEADLINE_EXCEEDED}


def field_cases(desc, path=()):
    """(label, {dotted field path: value}) for each field of ``desc`` and one level below."""
    for f in desc.fields:
        where = (*path, f.name)
        label = ".".join(where)
        repeated = f.is_repeated
        if f.type == F.TYPE_MESSAGE:
            if not repeated and len(path) < 1:
                yield from field_cases(f.message_type, where)
            continue
        if f.type == F.TYPE_STRING:
            values = [""] + ([] if repeated else ["x" * HUGE]) + [MARK.decode()]
        elif f.type in INT_EXTREMES:
            values = list(INT_EXTREMES[f.type])
        elif f.type in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
            values = list(FLOATS)
        elif f.type == F.TYPE_BOOL:
            values = [True]
        elif f.type == F.TYPE_ENUM:
            values = [999]
        else:
            continue
        for v in values:
            if repeated:
                n = 3 if f.type == F.TYPE_STRING else HUGE // 4
                yield f"{label}=[{_short(v)}]*{n}", {where: [v] * n}
            else:
                yield f"{label}={_short(v)}", {where: v}


def _short(v):
    return f"<{len(v)} chars>" if isinstance(v, str) and len(v) > 16 else repr(v)


def encode(cls, values: dict) -> bytes:
    msg = cls()
    for where, v in values.items():
        target = msg
        for name in where[:-1]:
            target = getattr(target, name)
        if isinstance(v, list):
            getattr(target, where[-1]).extend(v)
        else:
            setattr(target, where[-1], v)
    raw = msg.SerializeToString()
    return raw.replace(MARK, BAD_UTF8)  # invalid UTF-8 where the marker string was


def method_cases(method):
    cls = GetMessageClass(method.input_type)
    yield "empty message", b""
    yield "not protobuf", b"\xff\xff\xff\xff\x0f\x01\x02"
    yield "truncated", b"\x12\x40abc"
    yield "over the size limit", b"\x00" * (5 << 20)  # refused by size before any parsing
    for label, values in field_cases(method.input_type):
        yield label, encode(cls, values)


def call(channel, service, method, payload: bytes):
    path = f"/{service.full_name}/{method.name}"
    try:
        if method.server_streaming:
            stream = channel.unary_stream(path)(payload, timeout=20)
            for _ in stream:
                pass
        else:
            channel.unary_unary(path)(payload, timeout=20)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details() or ""


# ---- what must not change: memory and the store ---------------------------------------------------
RSS_GROWTH_MB = 200  # per server; the unbounded metric labels once grew an endpoint by 130 MB


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def footprint(servers, store: Path) -> tuple[dict, dict]:
    """({server: RSS MB}, {store file: (size, mtime)})."""
    files = {str(f.relative_to(store)): (f.stat().st_size, f.stat().st_mtime_ns)
             for f in sorted(store.rglob("*")) if f.is_file()} if store.is_dir() else {}
    return {f"{s.module}:{s.port}": rss_mb(s.proc.pid) for s in servers}, files


def assert_unchanged(before, after) -> None:
    (rss0, files0), (rss1, files1) = before, after
    print("RSS (MB) before -> after: " + ", ".join(f"{m} {rss0[m]:.0f} -> {rss1[m]:.0f}" for m in rss0))
    grown = {m: rss1[m] - rss0[m] for m in rss0 if rss1[m] - rss0[m] > RSS_GROWTH_MB}
    assert not grown, f"memory grew (MB): {grown}"
    assert files1 == files0, f"the store changed: {sorted(set(files1.items()) ^ set(files0.items()))[:5]}"


# ---- victims -------------------------------------------------------------------------------------
VICTIM_TOKENS = 48
GAP_S = 2.0           # the longest pause between two of a victim's tokens while a case runs
MIN_SPEED = 0.5     # the victims' median speed under the barrage, of their median speed without it
VICTIM = inference_pb2.GenerateRequest(text="A victim of other people's requests", params=common_pb2.SamplingParams(
    max_new_tokens=VICTIM_TOKENS, ignore_eos=True))


@dataclass
class Stream:
    """One victim stream: when it began, when each token came, what came, how it ended."""
    start: float
    times: list = field(default_factory=list)
    ids: list = field(default_factory=list)
    end: float = math.inf
    error: str = ""

    def speed(self) -> float:
        """Tokens a second, from its first token to its last (its wait in the worker's queue apart)."""
        return (len(self.times) - 1) / max(self.times[-1] - self.times[0], 1e-9)

    def longest_pause(self, start: float, end: float) -> float:
        """The longest wait for a token (from the one before, or from the stream's start) that
        overlaps [start, end]."""
        waits, last = [], self.start
        for t in [*self.times, self.end]:
            if t >= start and last <= end:  # this wait overlaps the case
                waits.append(t - last)
            last = t
        return max(waits, default=0.0)


def victim_stream(stub) -> Stream:
    s = Stream(time.monotonic())
    try:
        for r in stub.Generate(VICTIM, timeout=120):
            s.times += [time.monotonic()] * len(r.token_ids)
            s.ids += r.token_ids
    except grpc.RpcError as e:
        s.error = f"{e.code().name}: {e.details()}"
    s.end = time.monotonic()
    return s


class Victims:
    """Victim streams back to back on ``threads`` threads until stopped (``streams``: every one)."""

    def __init__(self, address: str, threads: int = 2):
        self.channel = grpc.insecure_channel(address)
        self.stub, self.streams, self.done = inference_pb2_grpc.InferenceStub(self.channel), [], threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(i * 0.1,), daemon=True) for i in range(threads)]

    def run(self, delay: float) -> None:
        time.sleep(delay)  # staggered, so that one is open while the other starts again
        while not self.done.is_set():
            self.streams.append(victim_stream(self.stub))

    def __enter__(self):
        for t in self.threads:
            t.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        self.done.set()
        for t in self.threads:
            t.join(150)
        self.channel.close()


SERVICES = {"Inference": inference_pb2, "Tokenizer": tokenizer_pb2, "Endpoint": endpoint_pb2, "Jobs": jobs_pb2}


def targets(endpoint, worker, tokenizer_service):
    """(server, address, service descriptor): each server with every service it hosts."""
    for name, module in SERVICES.items():
        yield "endpoint", endpoint.address, module.DESCRIPTOR.services_by_name[name]
    yield "worker", worker.address, inference_pb2.DESCRIPTOR.services_by_name["Inference"]
    yield "worker", worker.address, tokenizer_pb2.DESCRIPTOR.services_by_name["Tokenizer"]
    yield "tokenizer", tokenizer_service.address, tokenizer_pb2.DESCRIPTOR.services_by_name["Tokenizer"]


def against_victims(endpoint, cases, fire) -> list:
    """``fire(case)`` for each case of ``{label: case}``, one at a time, while victims stream through
    ``endpoint`` to its worker; every victim stream must bring all its solo tokens, none may wait
    more than GAP_S for a token while a case runs, and their median speed must stay within
    MIN_SPEED of theirs without the cases. The answers, in order; the figures printed."""
    with grpc.insecure_channel(endpoint.address) as ch:
        solo = victim_stream(inference_pb2_grpc.InferenceStub(ch))
    assert not solo.error and len(solo.ids) == VICTIM_TOKENS, solo.error
    with Victims(endpoint.address) as calm:  # the victims' pace without the barrage
        time.sleep(3)
    calm_speed = median(v.speed() for v in calm.streams)
    answers, spans = [], []
    with Victims(endpoint.address) as victims:
        for case in cases.values():
            start = time.monotonic()
            answers.append(fire(case))
            spans.append((start, time.monotonic()))

    # Every victim stream brought all its tokens, the ones it brings alone, at a fair pace.
    streams = victims.streams
    failed = [v.error or f"{len(v.ids)} tokens, not the solo ones" for v in streams if v.ids != solo.ids]
    assert not failed, failed[:5]
    speed = median(v.speed() for v in streams)
    # Each case ran while a victim streamed, and no victim then waited more than GAP_S for a token.
    pauses = []
    for label, (start, end) in zip(cases, spans):
        open_ = [v for v in streams if v.start < end and v.end > start]
        assert open_, f"no victim stream was open during {label}"
        pauses.append((max(v.longest_pause(start, end) for v in open_), label))
    pauses.sort(reverse=True)
    print(f"victims: {len(streams)} streams of {VICTIM_TOKENS} tokens, {speed:.0f} tokens/s (median) under the "
          f"barrage, {calm_speed:.0f} without; the longest waits for a token: "
          + "; ".join(f"{p:.2f} s ({label})" for p, label in pauses[:3]))
    assert not [p for p in pauses if p[0] > GAP_S], [p for p in pauses if p[0] > GAP_S][:10]
    assert speed >= MIN_SPEED * calm_speed, (speed, calm_speed)
    return answers


@pytest.mark.timeout(900)
def test_bad_input_on_every_rpc_gets_a_client_error_and_nothing_falls_over(endpoint, worker, tokenizer_service,
                                                                          stack_dir):
    from tests.services.test_endpoint import serving

    cases = {}
    for server, address, service in targets(endpoint, worker, tokenizer_service):
        for method in service.methods:
            for label, payload in method_cases(method):
                cases[f"{server} {service.name}.{method.name} {label}"] = (address, service, method, payload)
    channels = {a: grpc.insecure_channel(a, options=[("grpc.max_send_message_length", 8 << 20)])
                for _, a, _ in targets(endpoint, worker, tokenizer_service)}
    servers = (endpoint, worker, tokenizer_service)
    before = footprint(servers, stack_dir / "store")
    answers = against_victims(endpoint, cases, lambda c: call(channels[c[0]], *c[1:]))
    assert_unchanged(before, footprint(servers, stack_dir / "store"))

    codes = Counter(code for code, _ in answers)
    bad = [(label, code.name, details[:200])
           for label, (code, details) in zip(cases, answers) if code != grpc.StatusCode.OK and code not in CLIENT_ERRORS]
    print(f"fault suite: {len(cases)} cases over {sum(1 for _ in targets(endpoint, worker, tokenizer_service))} "
          f"(server, service) pairs; answers: " + ", ".join(f"{c.name} {n}" for c, n in codes.most_common()))
    assert not bad, "\n".join(map(str, bad[:20]))
    # Every client error says what was wrong.
    assert all(details for code, details in answers if code in CLIENT_ERRORS - {grpc.StatusCode.DEADLINE_EXCEEDED})
    # Nothing fell over: each server process lives and answers health checks.
    for s in (endpoint, worker, tokenizer_service):
        assert s.proc.poll() is None and serving(s), s.module


def completion(**fields):
    return "POST", "/v1/completions", {"json": {"prompt": "Hello", "max_tokens": 8, **fields}}


def chat(**fields):
    return "POST", "/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": "Hello"}],
                                                     "max_tokens": 8, **fields}}


# The HTTP door's bad input (the hardening issue's findings among them): (method, path, httpx
# arguments) -> the status it must get. Each with a message, in OpenAI's error object.
HTTP_CASES = {
    "repetition_penalty 1e-300": (completion(prompt=[13], seed=1, temperature=1, repetition_penalty=1e-300), 400),
    "frequency_penalty -1e308": (chat(frequency_penalty=-1e308), 400),
    "presence_penalty 1e308": (chat(presence_penalty=1e308), 400),
    "temperature 1e-40 (greedy)": (completion(temperature=1e-40), 200),
    "temperature 3": (completion(temperature=3), 400),
    "100,000 stop strings": (completion(stop=["ab"] * 100_000), 400),
    "a 600-character stop string": (completion(stop=["x" * 600]), 400),
    "300 stop_token_ids": (completion(stop_token_ids=list(range(300))), 400),
    "a 3.5 MB prompt, n 8": (completion(prompt="a" * 3_500_000, n=8), 400),
    "a 6 MB prompt": (completion(prompt="a" * 6_000_000), 400),
    "300,000 prompt ids": (completion(prompt=[13] * 300_000), 400),
    "a 9 MB body": (("POST", "/v1/completions", {"content": b"{" + b" " * (9 << 20) + b"}",
                                                  "headers": {"content-type": "application/json"}}), 413),
    "n 17": (completion(n=17), 400),
    "logprobs 6": (completion(logprobs=6), 400),
    "top_logprobs 21": (chat(logprobs=True, top_logprobs=21), 400),
    "max_tokens 2^31": (completion(max_tokens=2 ** 31), 400),
    "a 2 MB model name": (completion(model="m" * 2_000_000), 400),
    "a grammar over its size": (completion(guided_regex="a" * 40_000), 400),
    "a tool call": (chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400),
    "not JSON": (("POST", "/v1/completions", {"content": b"{nope", "headers": {"content-type": "application/json"}}),
                 400),
    "text/plain job": (("POST", "/api/jobs", {"content": b"{}", "headers": {"content-type": "text/plain"}}), 415),
    "a job from another origin": (("POST", "/api/jobs", {"json": {}, "headers": {"origin": "https://evil.example"}}),
                                  403),
    "a 2 MB idempotency key": (("POST", "/api/jobs", {"json": {"idempotency_key": "k" * 2_000_000, "convert": {
        "source": "nothing", "output": "nothing"}}}), 400),
    "jobs limit 3000000000": (("GET", "/api/jobs?limit=3000000000", {}), 400),
    "a job id naming its lock": (("GET", "/api/jobs/abc:lock", {}), 400),
    "a 2000-character path": (("GET", "/" + "p" * 2000, {}), 404),
}


@pytest.mark.timeout(600)
def test_bad_input_on_the_http_door_gets_its_status_and_harms_no_one(http, endpoint, worker, stack_dir):
    """Through the HTTP side of an endpoint in front of the same worker as the victims."""
    def fire(case):
        (method, path, kw), _ = case
        return httpx.request(method, f"{http.base}{path}", timeout=60, **kw)

    metrics_before = len(httpx.get(f"{http.base}/metrics").text)
    before = footprint((http, endpoint, worker), stack_dir / "store")
    answers = against_victims(endpoint, HTTP_CASES, fire)
    assert_unchanged(before, footprint((http, endpoint, worker), stack_dir / "store"))
    wrong = [(label, r.status_code, r.text[:200]) for (label, (_, want)), r in zip(HTTP_CASES.items(), answers)
             if r.status_code != want]
    assert not wrong, wrong
    for (label, (_, want)), r in zip(HTTP_CASES.items(), answers):
        if want != 200 and want != 404:
            assert r.json()["error"]["message"], label
    # The door still serves, and the metrics did not grow with the paths sent.
    assert httpx.get(f"{http.base}/health", timeout=5).status_code == 200
    assert len(httpx.get(f"{http.base}/metrics").text) < metrics_before + 20_000
