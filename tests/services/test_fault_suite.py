"""Bad input across every RPC of every server, generated from the protos themselves: for each
request field (one level into nested messages) extreme numbers, NaN and infinities, empty, huge
and invalid-UTF-8 strings, long repeated fields, unknown enum values; plus bytes that are no
protobuf at all, truncated messages and messages over the size limit. Every answer must be OK or
a status that names the client's mistake (never INTERNAL or UNKNOWN), and every server must still
be up and serving afterwards. The figures are printed (pytest -s) for the closing notes."""
from __future__ import annotations

import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor as F
from google.protobuf.message_factory import GetMessageClass

from services.pb import endpoint_pb2, inference_pb2, jobs_pb2, tokenizer_pb2

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


SERVICES = {"Inference": inference_pb2, "Tokenizer": tokenizer_pb2, "Endpoint": endpoint_pb2, "Jobs": jobs_pb2}


def targets(endpoint, worker, tokenizer_service):
    """(server, address, service descriptor): each server with every service it hosts."""
    for name, module in SERVICES.items():
        yield "endpoint", endpoint.address, module.DESCRIPTOR.services_by_name[name]
    yield "worker", worker.address, inference_pb2.DESCRIPTOR.services_by_name["Inference"]
    yield "tokenizer", tokenizer_service.address, tokenizer_pb2.DESCRIPTOR.services_by_name["Tokenizer"]


@pytest.mark.timeout(900)
def test_bad_input_on_every_rpc_gets_a_client_error_and_nothing_falls_over(endpoint, worker, tokenizer_service):
    from tests.services.test_endpoint import serving

    jobs = []
    for server, address, service in targets(endpoint, worker, tokenizer_service):
        for method in service.methods:
            for label, payload in method_cases(method):
                jobs.append((server, address, service, method, label, payload))
    channels = {a: grpc.insecure_channel(a, options=[("grpc.max_send_message_length", 8 << 20)])
                for _, a, _ in targets(endpoint, worker, tokenizer_service)}
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda j: call(channels[j[1]], j[2], j[3], j[5]), jobs))

    codes = Counter(code for code, _ in answers)
    bad = [(j[0], f"{j[2].name}.{j[3].name}", j[4], code.name, details[:200])
           for j, (code, details) in zip(jobs, answers) if code != grpc.StatusCode.OK and code not in CLIENT_ERRORS]
    print(f"\nfault suite: {len(jobs)} cases over {sum(1 for _ in targets(endpoint, worker, tokenizer_service))} "
          f"(server, service) pairs; answers: " + ", ".join(f"{c.name} {n}" for c, n in codes.most_common()))
    assert not bad, "\n".join(map(str, bad[:20]))
    # Every client error says what was wrong.
    assert all(details for code, details in answers if code in CLIENT_ERRORS - {grpc.StatusCode.DEADLINE_EXCEEDED})
    # Nothing fell over: each server process lives and answers health checks.
    for s in (endpoint, worker, tokenizer_service):
        assert s.proc.poll() is None and serving(s), s.module
