"""The JSON the web console reads: the workers behind the router, and the Jobs API (list, get,
submit, cancel, the store) as JSON over HTTP. Each route is one call to the endpoint's own gRPC
Jobs servicer, in this process (``InProcess``), so the console sees exactly what ``internlm jobs``
sees; job bodies are the
protobuf messages in their JSON form (``SubmitJobRequest`` in, ``Job`` out), so no field name is
written out again here.
"""
from __future__ import annotations

import asyncio
from typing import Annotated

import grpc
from fastapi import FastAPI, Query, Request
from google.protobuf import json_format
from google.protobuf.json_format import ParseError

from services.jobs.kinds import KINDS, enum_name
from services.jobs.records import STATES, state_enum_name
from services.jobs.settings import LIMITS
from services.openai_schema import error_response, rpc_error_response
from services.pb import jobs_pb2
from services.server_common import reported_status



class _Aborted(grpc.RpcError):
    """A call ended with a status, as a channel would raise it."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class _Context:
    """What the Jobs servicer's unary methods use of a gRPC context."""

    def abort(self, code, details):
        raise _Aborted(code, details)

    def is_active(self) -> bool:
        return True

    def time_remaining(self):
        return None


class InProcess:
    """A servicer called as a stub is (``jobs.ListJobs(request, timeout=...)``, statuses raised as
    ``grpc.RpcError``), without a channel: no key or TLS client to hold, and nothing on the network.
    Errors are mapped and logged as the server's interceptor would."""

    def __init__(self, servicer):
        self.servicer = servicer

    def __getattr__(self, name: str):
        method = getattr(self.servicer, name)

        def call(request, timeout=None):  # noqa: ARG001 - a stub's signature; in-process calls have no deadline
            try:
                return method(request, _Context())
            except grpc.RpcError:
                raise
            except Exception as e:  # noqa: BLE001 - one status for any failure, as on the gRPC door
                raise _Aborted(*reported_status(name, e)) from e
        return call


def as_json(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def add_routes(app: FastAPI, router, jobs) -> None:
    async def call(method, request, timeout: float = 10):
        try:
            return as_json(await asyncio.to_thread(method, request, timeout=timeout))
        except grpc.RpcError as e:
            return rpc_error_response(e)

    @app.get("/api/workers")
    def workers():
        return {"workers": [{"id": w.id, "address": w.address, "model": w.model, "load": w.load,
                             "inflight": w.inflight, "max_batch": w.max_batch, "requests_routed": w.routed,
                             "precision": w.precision}
                            for w in router.snapshot()]}

    @app.get("/api/jobs")
    async def list_jobs(state: str = "", kind: str = "", limit: Annotated[int, Query(ge=1, le=LIMITS["list_jobs"])] = 50):
        if state and state.upper() not in STATES or kind and kind not in KINDS:
            return error_response(400, f"state is one of {sorted(s.lower() for s in STATES)}, kind one of {sorted(KINDS)}")
        request = jobs_pb2.ListJobsRequest(limit=limit)
        if state:
            request.state = jobs_pb2.JobState.Value(state_enum_name(state))
        if kind:
            request.kind = jobs_pb2.JobKind.Value(enum_name(kind))
        return await call(jobs.ListJobs, request)

    @app.get("/api/jobs/{job_id}")
    async def get_job(job_id: str):
        return await call(jobs.GetJob, jobs_pb2.GetJobRequest(id=job_id))

    @app.post("/api/jobs")
    async def submit_job(request: Request):
        try:
            message = json_format.ParseDict(await request.json(), jobs_pb2.SubmitJobRequest())
        except (ParseError, ValueError) as e:
            return error_response(400, f"not a SubmitJobRequest: {e}")
        return await call(jobs.SubmitJob, message, timeout=30)

    @app.post("/api/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str):
        return await call(jobs.CancelJob, jobs_pb2.CancelJobRequest(id=job_id))

    @app.get("/api/store")
    async def store(area: str = ""):
        return await call(jobs.ListStore, jobs_pb2.ListStoreRequest(area=area))
