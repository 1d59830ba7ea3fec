"""The JSON the web console reads: the workers behind the router, and the Jobs API (list, get,
submit, cancel, the store) as JSON over HTTP. Each route is one call of the endpoint's gateway, in
this process (its ``jobs``: the same API the gRPC door serves), so the console sees exactly what
``internlm jobs`` sees; job bodies are the protobuf messages in their JSON form
(``SubmitJobRequest`` in, ``Job`` out), so no field name is written out again here.
"""
from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import FastAPI, Query, Request
from google.protobuf import json_format
from google.protobuf.json_format import ParseError

from services.jobs.kinds import KINDS, enum_name
from services.jobs.records import STATES, state_enum_name
from services.jobs.settings import LIMITS
from services.openai_schema import error_response, rpc_error_response
from services.pb import jobs_pb2



def as_json(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def add_routes(app: FastAPI, gateway) -> None:
    jobs = gateway.jobs

    async def call(method, request):
        try:
            return as_json(await asyncio.to_thread(method, request))
        except Exception as e:  # noqa: BLE001 - one status for any failure, as on the gRPC door
            return rpc_error_response(e, method.__name__)

    @app.get("/api/workers")
    def workers():
        return {"workers": [{"id": w.id, "address": w.address, "model": w.model, "load": w.load,
                             "inflight": w.inflight, "max_batch": w.max_batch, "requests_routed": w.routed,
                             "precision": w.precision}
                            for w in gateway.workers()]}

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
        return await call(jobs.SubmitJob, message)

    @app.post("/api/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str):
        return await call(jobs.CancelJob, jobs_pb2.CancelJobRequest(id=job_id))

    @app.get("/api/store")
    async def store(area: str = ""):
        return await call(jobs.ListStore, jobs_pb2.ListStoreRequest(area=area))
