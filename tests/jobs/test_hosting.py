"""The Jobs API as the public endpoint hosts it: on the services' common Server (error interceptor,
health, reflection), registered by ``add_to_server(server, settings)`` with the endpoint's settings."""
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.jobs.api import SERVICE_NAME, add_to_server
from services.pb import jobs_pb2, jobs_pb2_grpc


def test_hosted_on_the_common_server(jobs_settings):
    from services.server_common import Server

    server = Server("endpoint-test", 0)
    # the endpoint passes its own settings object: redis_url, and store_root (None = from the environment)
    add_to_server(server.grpc, SimpleNamespace(redis_url=jobs_settings.redis_url, store_root=jobs_settings.store_root))
    server.start([SERVICE_NAME])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = jobs_pb2_grpc.JobsStub(ch)
            with pytest.raises(grpc.RpcError) as e:  # the servicer's own status passes the interceptor
                stub.SubmitJob(jobs_pb2.SubmitJobRequest(convert=jobs_pb2.ConvertJob(source="/etc", output="x")))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "outside" in e.value.details()
            with pytest.raises(grpc.RpcError) as e:
                list(stub.WatchJob(jobs_pb2.WatchJobRequest(id="nope"), timeout=5))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            refl = reflection_pb2_grpc.ServerReflectionStub(ch)
            answer = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
            assert SERVICE_NAME in [s.name for s in answer.list_services_response.service]
    finally:
        server.grpc.stop(0)
