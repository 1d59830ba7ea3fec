"""Who may call what: the API keys on the endpoint's two doors, the internal token behind it, TLS.

- **API keys** (``--api-key`` / INTERNLM_API_KEY; several separated by commas, so a key can be
  replaced without a moment when neither works): every HTTP route and every gRPC service of the
  endpoint needs ``authorization: Bearer <key>``. Health stays open on both doors (orchestrators
  and load balancers probe it without secrets; it tells nothing but "serving"), as do the
  console's static files, which hold no data.
- **The internal token** (``--internal-token`` / INTERNLM_INTERNAL_TOKEN): the endpoint sends it on
  every call to the inference workers and the tokenizer service, and they refuse calls without it
  when it is set. They listen on loopback unless told otherwise; where they must listen further
  (containers), the token keeps everything but the endpoint out.
- **TLS** for both doors of the endpoint from a certificate and key (``--tls-cert`` / ``--tls-key``),
  and for clients the CA that signed it (``--tls-ca``).
- **Tenants**: the endpoint tells a worker whose request it is (``TENANT_HEADER``, a digest of the
  API key the call came with, never the key), and a worker reuses cached prompt rows only within
  one tenant, so a fast answer never tells one user what another one asked.

Both gRPC checks are one server interceptor (``KeyInterceptor``; ``AioKeyInterceptor`` on ``grpc.aio``),
the HTTP check is the ``Guard`` middleware calling ``authorized``; clients add the header with
``with_bearer``.
"""
from __future__ import annotations

import collections
import hashlib
import os
import secrets
from pathlib import Path

import grpc

API_KEY_ENV = "INTERNLM_API_KEY"
INTERNAL_TOKEN_ENV = "INTERNLM_INTERNAL_TOKEN"
TLS_CERT_ENV, TLS_KEY_ENV, TLS_CA_ENV = "INTERNLM_TLS_CERT", "INTERNLM_TLS_KEY", "INTERNLM_TLS_CA"
HEALTH_PREFIX = "/grpc.health.v1.Health/"
ENDPOINT_ENV, DEFAULT_ENDPOINT = "INTERNLM_ENDPOINT", "localhost:50051"  # where clients find the endpoint

TENANT_HEADER = "x-internlm-tenant"  # endpoint -> worker: whose request (see tenant_of)

NEED_KEY = "a valid API key is required: authorization: Bearer <key>"
NEED_TOKEN = "this service answers the endpoint only: the internal token is missing or wrong"


def parse_keys(value: str | None) -> tuple[str, ...]:
    """``"k1, k2"`` -> ``("k1", "k2")``; empty -> no keys (nothing required)."""
    return tuple(k.strip() for k in (value or "").split(",") if k.strip())


def metadata_value(metadata, name: str):
    """The value of ``name`` in a call's metadata (``(name, value)`` pairs), or None."""
    return next((v for k, v in metadata or () if k == name), None)


def tenant_of(metadata) -> str:
    """Whose call this is, from its metadata (``(name, value)`` pairs): a digest of its
    ``authorization`` value, "" where it has none (an endpoint without keys: one tenant)."""
    header = metadata_value(metadata, "authorization")
    if not header:
        return ""
    return hashlib.sha256(header.encode() if isinstance(header, str) else header).hexdigest()[:32]


def authorized(keys, header: str | bytes | None) -> bool:
    """Whether an ``authorization`` value is ``Bearer <one of keys>``. Every key is compared, each in
    constant time, so the time taken tells nothing about how much of which key matched."""
    given = header.encode("latin-1", "replace") if isinstance(header, str) else header or b""
    found = False
    for key in keys:
        found |= secrets.compare_digest(given, b"Bearer " + key.encode())
    return found


# ---- servers ---------------------------------------------------------------------------------------

def _refusal(handler: grpc.RpcMethodHandler, message: str, aio: bool = False) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that answers UNAUTHENTICATED (no deserializer: the
    request of a caller we refuse is never parsed); ``aio``: for a ``grpc.aio`` server."""
    def refuse(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_aio(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    make = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    return make[handler.request_streaming, handler.response_streaming](refuse_aio if aio else refuse)


class KeyInterceptor(grpc.ServerInterceptor):
    """Every call but health needs ``authorization: Bearer <one of keys>``; otherwise UNAUTHENTICATED
    with ``message``. Reflection included: what a server serves is for its callers."""

    aio = False

    def __init__(self, keys, message: str = NEED_KEY):
        self.keys, self.message = tuple(keys), message
        if not self.keys:
            raise ValueError("KeyInterceptor needs at least one key")

    def intercept_service(self, continuation, details):
        return self._checked(continuation(details), details)

    def _checked(self, handler, details):
        if handler is None or details.method.startswith(HEALTH_PREFIX):
            return handler
        header = dict(details.invocation_metadata or ()).get("authorization")
        return handler if authorized(self.keys, header) else _refusal(handler, self.message, self.aio)


class AioKeyInterceptor(KeyInterceptor, grpc.aio.ServerInterceptor):
    """``KeyInterceptor`` on a ``grpc.aio`` server."""

    aio = True

    async def intercept_service(self, continuation, details):
        return self._checked(await continuation(details), details)


def server_credentials(cert: str, key: str) -> grpc.ServerCredentials:
    """TLS for a gRPC port from PEM files (the certificate file may hold its chain after it)."""
    return grpc.ssl_server_credentials([(Path(key).read_bytes(), Path(cert).read_bytes())])


def tls_pair(cert: str | None, key: str | None) -> tuple[str, str] | None:
    """(cert, key) when both are given, None when neither; one alone is a mistake said at start."""
    if bool(cert) != bool(key):
        raise SystemExit("TLS needs both --tls-cert and --tls-key (or INTERNLM_TLS_CERT and INTERNLM_TLS_KEY)")
    for path in (cert, key):
        if path and not Path(path).is_file():
            raise SystemExit(f"TLS: no such file: {path}")
    return (cert, key) if cert else None


# ---- clients ---------------------------------------------------------------------------------------

class _CallDetails(collections.namedtuple("_CallDetails", "method timeout metadata credentials wait_for_ready "
                                                            "compression"), grpc.ClientCallDetails):
    pass


def bearer(key: str) -> tuple[str, str]:
    """The metadata entry that presents ``key``."""
    return "authorization", f"Bearer {key}"


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
              grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer <key>`` to every call of a channel. An interceptor rather than
    call credentials: grpc sends call credentials over TLS only, and the internal token travels
    between containers in plain text."""

    def __init__(self, key: str):
        self.header = bearer(key)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(_CallDetails(details.method, details.timeout, [*(details.metadata or ()), self.header],
                                         details.credentials, details.wait_for_ready, details.compression), request)

    intercept_unary_stream = intercept_stream_unary = intercept_stream_stream = intercept_unary_unary


def with_bearer(channel: grpc.Channel, key: str | None) -> grpc.Channel:
    """``channel`` sending ``authorization: Bearer <key>`` on every call (unchanged without a key)."""
    return grpc.intercept_channel(channel, _Bearer(key)) if key else channel


def client_channel(address: str, key: str | None = None, ca: str | None = None) -> grpc.Channel:
    """A channel to ``address``: TLS checked against the CA in the PEM file ``ca`` when given (for a
    self-signed certificate, the certificate itself), plain otherwise; the key on every call."""
    if ca:
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(Path(ca).read_bytes()))
    else:
        channel = grpc.insecure_channel(address)
    return with_bearer(channel, key)


def endpoint_address(args=None) -> str:
    return getattr(args, "endpoint", None) or os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT


def endpoint_channel(args=None) -> grpc.Channel:
    """A client's channel to the endpoint: address, API key and CA from ``args`` (the CLI's
    ``cli.remote.add_endpoint_arguments``; any object with those attributes) or the environment."""
    keys = parse_keys(os.environ.get(API_KEY_ENV))  # the endpoint's own setting, when this shell has it
    key = getattr(args, "api_key", None) or (keys[0] if keys else None)
    ca = getattr(args, "tls_ca", None) or os.environ.get(TLS_CA_ENV) or None
    return client_channel(endpoint_address(args), key, ca)
