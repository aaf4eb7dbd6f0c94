"""helloworld.proto's messages and its Greeter service for grpcio, built at run time.

Generated ``helloworld_pb2.py`` files pin the protobuf version that generated them; this module
describes the same file (``helloworld.proto`` beside it) as a ``FileDescriptorProto`` and has
protobuf build the message classes from it, so it works with any protobuf the installed grpcio
accepts. The wire format is the proto's: stubs generated from ``helloworld.proto`` interoperate.

    HelloRequest(name=...)             HelloReply(message=...)
    add_greeter(server, say_hello)     say_hello_stub(channel)(HelloRequest(name="x"))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

SERVICE = "helloworld.Greeter"
SAY_HELLO = f"/{SERVICE}/SayHello"


def _file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """helloworld.proto, as protoc would describe it."""
    proto = descriptor_pb2.FileDescriptorProto(name="helloworld.proto", package="helloworld",
                                               syntax="proto3")
    for message, field in (("HelloRequest", "name"), ("HelloReply", "message")):
        proto.message_type.add(name=message).field.add(
            name=field, json_name=field, number=1,
            type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
            label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    proto.service.add(name="Greeter").method.add(
        name="SayHello", input_type=".helloworld.HelloRequest",
        output_type=".helloworld.HelloReply")
    return proto


# A pool of its own: a process that also imports generated helloworld stubs (into protobuf's
# default pool) has no clash.
_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_file_descriptor())
HelloRequest: Any = message_factory.GetMessageClass(
    _POOL.FindMessageTypeByName("helloworld.HelloRequest"))
HelloReply: Any = message_factory.GetMessageClass(
    _POOL.FindMessageTypeByName("helloworld.HelloReply"))


def add_greeter(server: grpc.Server,
                say_hello: Callable[[Any, grpc.ServicerContext], Any]) -> None:
    """Serve ``helloworld.Greeter/SayHello`` on ``server`` with ``say_hello(request, context)``
    (a ``HelloRequest`` in, a ``HelloReply`` out)."""
    handler = grpc.unary_unary_rpc_method_handler(
        say_hello, request_deserializer=HelloRequest.FromString,
        response_serializer=HelloReply.SerializeToString)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"SayHello": handler}),))


def say_hello_stub(channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable:
    """``SayHello`` on ``channel``: call it with a ``HelloRequest``, get a ``HelloReply``."""
    return channel.unary_unary(SAY_HELLO, request_serializer=HelloRequest.SerializeToString,
                               response_deserializer=HelloReply.FromString)
