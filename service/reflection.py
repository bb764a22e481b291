"""Server reflection under both names clients use: grpc.reflection.v1alpha (grpcio-reflection's own) and
grpc.reflection.v1 (grpcurl and Postman ask for it first; grpcio-reflection ships no v1 module).

The v1 protocol is the v1alpha one under a new package name, field for field, so its descriptor is v1alpha's
renamed, and its calls are answered by the same servicer.
"""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer

V1ALPHA = "grpc.reflection.v1alpha"
V1 = "grpc.reflection.v1"
SERVICE_NAME_V1 = f"{V1}.ServerReflection"


def _register_v1() -> None:
    """Add grpc/reflection/v1/reflection.proto to the default pool, so that reflection can describe itself."""
    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName(SERVICE_NAME_V1)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name, proto.package = "grpc/reflection/v1/reflection.proto", V1
    for message in proto.message_type:
        for f in message.field:
            if f.HasField("type_name"):  # message and enum fields only
                f.type_name = f.type_name.replace(f".{V1ALPHA}.", f".{V1}.")
    for method in proto.service[0].method:
        method.input_type = method.input_type.replace(f".{V1ALPHA}.", f".{V1}.")
        method.output_type = method.output_type.replace(f".{V1ALPHA}.", f".{V1}.")
    pool.Add(proto)


def enable(service_names: tuple[str, ...], server: grpc.aio.Server) -> None:
    """Serve reflection v1alpha and v1 on `server`, listing `service_names` and both reflection services."""
    _register_v1()
    names = (*service_names, reflection.SERVICE_NAME, SERVICE_NAME_V1)
    servicer = ReflectionServicer(names)
    _serve(servicer, server, reflection.SERVICE_NAME)
    _serve(servicer, server, SERVICE_NAME_V1)


def _serve(servicer: ReflectionServicer, server: grpc.aio.Server, service: str) -> None:
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,  # same fields under v1
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {"ServerReflectionInfo": handler}),))
