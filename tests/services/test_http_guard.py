"""The endpoint's HTTP door against a real worker, tokenizer service and Redis on loopback: metric
labels that stay bounded whatever paths clients send, JSON-only bodies and same-origin writes
(what a page elsewhere could make a browser send), the security headers, the size limits (body,
prompt, n, logprobs, the jobs list) and a plain request whose client leaves, which frees its slots."""
from __future__ import annotations

import json
import re
import secrets
import socket
import time

import httpx
import pytest

from services.jobs.settings import LIMITS
from services.openai_schema import (MAX_BODY_BYTES, MAX_LOGPROBS, MAX_N, MAX_PROMPT_CHARS,
                                    MAX_PROMPT_IDS)
from tests.helpers import free_port
from tests.services.conftest import WORKER_SLOTS, start_endpoint, wait_http, wait_workers

SERIES = re.compile(r'^internlm_http_requests_total\{route="([^"]*)",status="(\d+)"\}', re.M)
JSON_POSTS = ["/v1/completions", "/v1/chat/completions", "/api/jobs"]


def http_series(base: str) -> set[tuple[str, str]]:
    return set(SERIES.findall(httpx.get(f"{base}/metrics").text))


def routed(service) -> int:
    return sum(w.requests_routed for w in wait_workers(service, 1))


def raw(base: str, head: bytes, body_parts=(), timeout: float = 30) -> bytes:
    """Send a request as given (head: request line and headers) on a socket of its own; the
    response's status line and headers."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(head + b"\r\n\r\n")
        for part in body_parts:
            s.sendall(part)
        got = b""
        while b"\r\n\r\n" not in got:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    return got


def test_metrics_label_routes_by_template_not_path(http):
    """A few hundred random long paths (404s, and ids under the jobs routes) add no series: every
    unmatched path is one label, a job id is the route's template."""
    base, c = http.base, httpx.Client(timeout=30)
    c.get(f"{base}/no-such-page")
    c.get(f"{base}/api/jobs/some-id")
    c.post(f"{base}/api/jobs/some-id/cancel")
    c.get(f"{base}/metrics")  # (itself counted from its next read on)
    before = http_series(base)
    size = len(httpx.get(f"{base}/metrics").text)
    for _ in range(150):  # job ids of the valid form (at most 64 characters): each a 404 of its route
        c.get(f"{base}/{secrets.token_hex(100)}/{secrets.token_hex(20)}")
        c.get(f"{base}/api/jobs/{secrets.token_hex(32)}")
    for _ in range(20):
        c.post(f"{base}/api/jobs/{secrets.token_hex(32)}/cancel")
    after = http_series(base)
    assert after == before
    assert len(httpx.get(f"{base}/metrics").text) < size + 500  # only counts and sums grew
    routes = {route for route, _ in after}
    assert {"unmatched", "/api/jobs/{job_id}", "/api/jobs/{job_id}/cancel", "/metrics"} <= routes
    assert ("unmatched", "404") in after
    assert all(r == "unmatched" or r.startswith("/") and not re.search(r"[0-9a-f]{20}", r) for r in routes)


@pytest.mark.parametrize("path", JSON_POSTS)
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
def test_json_routes_refuse_other_bodies(http, path, content_type):
    """What a page elsewhere can send without a CORS preflight (a form, text/plain, an untyped Blob)
    is refused before it is read, with OpenAI's error object."""
    headers = {"content-type": content_type} if content_type else {}
    r = httpx.post(f"{http.base}{path}", content=b'{"prompt": "hi"}', headers=headers)
    assert r.status_code == 415, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and "application/json" in err["message"]
    ok = httpx.post(f"{http.base}{path}", content=b'{"prompt": "hi", "max_tokens": 1}',
                    headers={"content-type": "application/json; charset=utf-8"}, timeout=60)
    assert ok.status_code != 415


def test_cross_origin_writes_are_refused(http):
    base = http.base
    for origin in ("http://evil.example", "null", "http://127.0.0.1:1"):
        for path in JSON_POSTS:
            r = httpx.post(f"{base}{path}", json={"prompt": "hi"}, headers={"Origin": origin})
            assert r.status_code == 403, (origin, path, r.text)
            assert r.json()["error"]["type"] == "permission_error" and origin in r.json()["error"]["message"]
        assert httpx.post(f"{base}/api/jobs/x/cancel", headers={"Origin": origin}).status_code == 403
    # reads are not refused (a browser keeps the answer from the other page: no CORS headers)
    assert httpx.get(f"{base}/v1/models", headers={"Origin": "http://evil.example"}).status_code == 200
    # the server's own pages (the console), and clients that send no Origin, are served
    body = {"prompt": "hi", "max_tokens": 1}
    assert httpx.post(f"{base}/v1/completions", json=body, headers={"Origin": base}, timeout=60).status_code == 200
    assert httpx.post(f"{base}/v1/completions", json=body, timeout=60).status_code == 200


def test_allowed_origins(stack_redis, tokenizer_service, worker, stack_dir):
    port = free_port()
    s = start_endpoint(stack_redis.url, tokenizer_service.address, stack_dir, "endpoint-origins", "--http-port",
                       str(port), "--allowed-origins", "https://app.example.com, http://localhost:3000/").wait_healthy()
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(base)
        wait_workers(s, 1)
        body = {"prompt": "hi", "max_tokens": 1}
        for origin in ("https://app.example.com", "http://localhost:3000", base):
            r = httpx.post(f"{base}/v1/completions", json=body, headers={"Origin": origin}, timeout=60)
            assert r.status_code == 200, (origin, r.text)
        for origin in ("http://app.example.com", "https://app.example.com.evil.example", "http://localhost:3001"):
            assert httpx.post(f"{base}/v1/completions", json=body, headers={"Origin": origin}).status_code == 403
    finally:
        s.stop()


def test_security_headers_on_every_response(http):
    responses = [httpx.get(f"{http.base}{path}") for path in ("/", "/console/app.js", "/v1/models", "/nothing")]
    responses.append(httpx.post(f"{http.base}/v1/completions", content=b"x"))  # a refusal (415)
    for r in responses:
        h, path = r.headers, r.request.url.path
        assert "frame-ancestors 'none'" in h["content-security-policy"] and "default-src 'self'" in h[
            "content-security-policy"], path
        assert (h["x-content-type-options"], h["x-frame-options"], h["referrer-policy"]) == (
            "nosniff", "DENY", "no-referrer"), path
    assert "unsafe-inline" not in httpx.get(f"{http.base}/").headers["content-security-policy"]


def test_body_size_limit(http, worker):
    """Over MAX_BODY_BYTES: refused by its Content-Length before a byte is read, and a chunked body
    (no length) as soon as the bytes read pass the limit; a 413 either way, never a worker call."""
    before = routed(http)
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d" % (MAX_BODY_BYTES + 1))
    assert raw(http.base, head).startswith(b"HTTP/1.1 413")
    mib = b"%x\r\n%s\r\n" % (2 ** 20, b" " * 2 ** 20)
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked"
    parts = [mib] * (MAX_BODY_BYTES // 2 ** 20) + [b"10\r\n" + b" " * 16 + b"\r\n"]
    assert raw(http.base, head, parts).startswith(b"HTTP/1.1 413")
    # a body within the limit is served, chunked too
    body = json.dumps({"prompt": "hi", "max_tokens": 1}).encode()
    ok = raw(http.base, head, [b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)])
    assert ok.startswith(b"HTTP/1.1 200"), ok
    assert routed(http) <= before + 2  # that one request (and perhaps its ModelInfo)


@pytest.mark.parametrize("path, body, param, said", [
    ("/v1/completions", {"prompt": "a" * (MAX_PROMPT_CHARS + 1)}, "prompt", "characters"),
    ("/v1/completions", {"prompt": ["a" * (MAX_PROMPT_CHARS + 1)]}, "prompt", "characters"),
    ("/v1/completions", {"prompt": [1] * (MAX_PROMPT_IDS + 1)}, "prompt", "token ids"),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "a" * (MAX_PROMPT_CHARS // 2)},
                                           {"role": "user", "content": "b" * (MAX_PROMPT_CHARS // 2 + 1)}]},
     "messages", "characters"),
], ids=["text", "text-in-a-list", "token-ids", "chat-messages"])
def test_prompt_size_is_checked_before_any_worker(http, path, body, param, said):
    before = routed(http)
    r = httpx.post(f"{http.base}{path}", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and said in err["message"] and str(MAX_PROMPT_CHARS if said == "characters"
                                                                    else MAX_PROMPT_IDS) in err["message"]
    assert routed(http) == before  # no worker asked (not even for ModelInfo)


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "hi", "n": MAX_N + 1}, "n"),
    ("/v1/completions", {"prompt": "hi", "logprobs": MAX_LOGPROBS + 1}, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 0}, "n"),
])
def test_count_bounds(http, path, body, param):
    r = httpx.post(f"{http.base}{path}", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_jobs_list_limit_is_bounded(http):
    for limit in ("0", "-1", str(LIMITS["list_jobs"] + 1), str(10 ** 12), "many"):
        r = httpx.get(f"{http.base}/api/jobs", params={"limit": limit})
        assert r.status_code == 400, (limit, r.text)
        assert r.json()["error"]["param"] == "limit"
    assert httpx.get(f"{http.base}/api/jobs", params={"limit": LIMITS["list_jobs"]}).status_code == 200


def finished(worker, reason: str) -> float:
    m = re.search(rf'^internlm_requests_finished_total\{{finish_reason="{reason}"\}} (\S+)', worker.metrics(), re.M)
    return float(m.group(1)) if m else 0.0


def test_a_plain_request_whose_client_leaves_frees_its_slots(http, worker):
    """A non-streamed request (n choices: the worker's slots full and the rest queued) whose client
    disconnects is cancelled at once: the running choices stop, the queued ones never run."""
    n, tokens = 2 * WORKER_SLOTS, 240
    aborted, generated = finished(worker, "aborted"), worker.metric("internlm_generated_tokens_total")
    body = json.dumps({"prompt": "Tell me a long story", "max_tokens": tokens, "ignore_eos": True, "n": n,
                       "temperature": 0}).encode()
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d" % len(body))
    host, port = http.base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 30
        while worker.metric("internlm_active_requests") < WORKER_SLOTS:
            assert time.monotonic() < deadline, "the choices never reached the worker"
            time.sleep(0.01)
    deadline = time.monotonic() + 10
    while (worker.metric("internlm_active_requests") or worker.metric("internlm_queue_size")
           or httpx.get(f"{http.base}/api/workers").json()["workers"][0]["inflight"]):
        assert time.monotonic() < deadline, "the worker still holds the request's choices"
        time.sleep(0.05)
    # the queued choices (at least) ended aborted, and far from all the tokens asked were generated
    assert finished(worker, "aborted") - aborted >= n - WORKER_SLOTS
    assert worker.metric("internlm_generated_tokens_total") - generated < n * tokens
    text = httpx.get(f"{http.base}/metrics").text
    assert 'internlm_http_requests_total{route="/v1/completions",status="499"}' in text


@pytest.fixture
def small_door():
    """The HTTP plumbing (uvicorn, TimedHead, Guard) in this process around two routes, with a head
    deadline of one second: ``.base``, ``.head_timeout``."""
    from fastapi import FastAPI

    from services.http_server import Guard, HttpServer

    app = FastAPI()
    app.add_middleware(Guard, routes=app.router.routes)

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.post("/echo")
    def echo(body: dict):
        return body

    server = HttpServer(app, "127.0.0.1", 0, head_timeout=1.0).start()
    yield type("Door", (), {"base": f"http://127.0.0.1:{server.port}", "head_timeout": 1.0})
    server.stop()


def trickle(base: str, data: bytes, every_s: float = 0.1, first: bytes = b"", read_first: bool = False):
    """Send ``first`` at once (reading its answer when ``read_first``), then ``data`` a byte every
    ``every_s``, on a socket of its own, while the caller waits: (seconds until the server closed
    the connection or answered, from the start of the trickle; what it answered)."""
    import threading

    host, port = base.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=30)
    if first:
        s.sendall(first)
        if read_first:  # the whole answer, which may come in more than one segment
            reply = b""
            while b"\r\n\r\n" not in reply:
                reply += s.recv(65536)
            head, _, body = reply.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))
            while len(body) < length:
                body += s.recv(65536)
    start, stop = time.monotonic(), threading.Event()

    def send():
        for b in data:
            if stop.wait(every_s):
                return
            try:
                s.sendall(bytes([b]))
            except OSError:  # closed by the server
                return
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    answer, took = b"", None
    try:
        answer = s.recv(65536)
        took = time.monotonic() - start
        while chunk := s.recv(65536):  # the rest of an answer, until the server closes
            answer += chunk
    except ConnectionResetError:
        took = took or time.monotonic() - start
    stop.set()
    sender.join()
    s.close()
    return took, answer


SLOW_HEAD = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Slow: " + b"a" * 200 + b"\r\n\r\n"


@pytest.mark.parametrize("when", ["new connection", "after an answer"])
def test_a_client_trickling_its_headers_is_cut_off(small_door, when):
    """A head sent a byte every 0.1 s (it would take 25 s) is cut off at the deadline, whether it
    opens the connection or follows an answer on it (uvicorn's keep-alive timer restarts on every
    byte), while another client is served at once."""
    import threading

    first = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" if when == "after an answer" else b""
    result = {}
    t = threading.Thread(target=lambda: result.update(r=trickle(small_door.base, SLOW_HEAD, first=first,
                                                                read_first=bool(first))))
    t.start()
    time.sleep(0.3)
    start = time.monotonic()
    assert httpx.get(f"{small_door.base}/health", timeout=5).json() == {"status": "ok"}
    assert time.monotonic() - start < 1
    t.join(30)
    took, answer = result["r"]
    assert answer == b"" and small_door.head_timeout - 0.2 < took < small_door.head_timeout + 2, (took, answer)


def test_a_body_trickled_past_its_deadline_is_refused(small_door, monkeypatch):
    monkeypatch.setattr("services.http_server.BODY_TIMEOUT_S", 1.0)
    body = json.dumps({"x": "a" * 100}).encode()
    head = (b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    took, answer = trickle(small_door.base, body, first=head)
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in answer, answer
    assert took < 3
    # The same body sent at once is taken.
    assert httpx.post(f"{small_door.base}/echo", content=body, headers={"content-type": "application/json"},
                      timeout=5).json() == {"x": "a" * 100}
