"""The standard gRPC health service (``grpc.health.v1.Health/Check``) for grpcio, built at run
time like ``helloworld.py``, so the greeter needs no grpcio-health-checking package. meshd's
``health = { grpc = "helloworld.Greeter" }`` asks it.

    message HealthCheckRequest { string service = 1; }
    message HealthCheckResponse { enum ServingStatus { UNKNOWN = 0; SERVING = 1;
                                                       NOT_SERVING = 2; SERVICE_UNKNOWN = 3; }
                                  ServingStatus status = 1; }
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

SERVING, NOT_SERVING, SERVICE_UNKNOWN = 1, 2, 3


def _file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    field = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="grpc/health/v1/health.proto",
                                               package="grpc.health.v1", syntax="proto3")
    proto.message_type.add(name="HealthCheckRequest").field.add(
        name="service", json_name="service", number=1, type=field.TYPE_STRING,
        label=field.LABEL_OPTIONAL)
    response = proto.message_type.add(name="HealthCheckResponse")
    status = response.enum_type.add(name="ServingStatus")
    for number, name in enumerate(("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")):
        status.value.add(name=name, number=number)
    response.field.add(name="status", json_name="status", number=1, type=field.TYPE_ENUM,
                       type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus",
                       label=field.LABEL_OPTIONAL)
    proto.service.add(name="Health").method.add(
        name="Check", input_type=".grpc.health.v1.HealthCheckRequest",
        output_type=".grpc.health.v1.HealthCheckResponse")
    return proto


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_file_descriptor())
HealthCheckRequest: Any = message_factory.GetMessageClass(
    _POOL.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest"))
HealthCheckResponse: Any = message_factory.GetMessageClass(
    _POOL.FindMessageTypeByName("grpc.health.v1.HealthCheckResponse"))


def add_health(server: grpc.Server, status_of: Callable[[str], int]) -> None:
    """Serve ``grpc.health.v1.Health/Check`` on ``server``: ``status_of(service)`` gives the
    status of a service ("" is the server as a whole); ``SERVICE_UNKNOWN`` answers NOT_FOUND,
    as the health protocol says."""

    def check(request: Any, context: grpc.ServicerContext) -> Any:
        status = status_of(request.service)
        if status == SERVICE_UNKNOWN:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return HealthCheckResponse(status=status)

    handler = grpc.unary_unary_rpc_method_handler(
        check, request_deserializer=HealthCheckRequest.FromString,
        response_serializer=HealthCheckResponse.SerializeToString)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("grpc.health.v1.Health", {"Check": handler}),))
