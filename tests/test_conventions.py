"""What an integrator expects of a gRPC inference service: NOT_FOUND for an unknown task, health per task name,
reflection v1 and v1alpha, STATIC only with its layer, the token limit in GetInfo, connection ageing."""

from __future__ import annotations

import shutil
import subprocess
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api import pb, pb_grpc
from service.client import Client, RaeeClientError


@pytest.fixture(scope="module")
def server(stores):
    from service.config import ServerConfig
    from service.server import RaeeServer
    config = ServerConfig(stores=(stores["current"],), host="127.0.0.1", port=0, metrics_port=-1, drain_s=0.0,
                          admin=True, admin_port=0, store_roots=(stores["root"],))
    server = RaeeServer(config, backbone=stores["backbone"]).start()
    server.loaded.wait(60)
    assert server.load_error is None
    yield server
    server.stop(1)


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.RaeeStub(channel)


def test_an_unknown_task_is_not_found_for_classify_and_reload(server, stores):
    with Client(f"127.0.0.1:{server.port}") as client, pytest.raises(RaeeClientError) as info:
        client.classify(["good"], task="imdb")
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert "unknown task 'imdb'; this server answers sst2" in info.value.message
    with Client(f"127.0.0.1:{server.admin_port}") as admin, pytest.raises(RaeeClientError) as info:
        admin.reload("imdb", stores["next"])
    assert info.value.code == grpc.StatusCode.NOT_FOUND


def test_health_answers_per_task_name_besides_the_server(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "raee.v1.Raee", "sst2"):
            status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING, name
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="imdb"), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_answers_under_v1_and_v1alpha(server, version):
    from grpc_reflection.v1alpha import reflection_pb2
    method = f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = channel.stream_stream(
            method, request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol="raee.v1.Raee"),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol=f"grpc.reflection.{version}."
                                                                                  "ServerReflection")]
        listed, raee_file, own_file = list(call(iter(requests), timeout=10))
    names = {s.name for s in listed.list_services_response.service}
    assert {"raee.v1.Raee", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
    assert raee_file.file_descriptor_response.file_descriptor_proto  # grpcurl can describe the service
    assert own_file.file_descriptor_response.file_descriptor_proto, own_file.error_response


def test_static_needs_its_layer_and_other_policies_refuse_one(stub):
    for fields, message in ((dict(policy=pb.POLICY_KIND_STATIC), "STATIC needs static_layer"),
                            (dict(policy=pb.POLICY_KIND_FULL, static_layer=1), "static_layer 1 is set")):
        with pytest.raises(grpc.RpcError) as info:
            stub.Classify(pb.ClassifyRequest(task="sst2", texts=["good"], **fields), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in info.value.details()
    zero = stub.Classify(pb.ClassifyRequest(task="sst2", texts=["good"], policy=pb.POLICY_KIND_STATIC,
                                            static_layer=0), timeout=10)
    assert zero.results[0].exit_layer == 0  # layer 0 is a layer when it is set


def test_get_info_reports_the_token_limit(server, stores):
    with Client(f"127.0.0.1:{server.port}") as client:
        assert client.info().limits["max_tokens"] == stores["backbone"].max_tokens > 0


@pytest.mark.slow
def test_max_connection_age_closes_connections_without_failing_calls(stores):
    from service.config import ServerConfig
    from service.server import RaeeServer
    config = ServerConfig(stores=(stores["current"],), host="127.0.0.1", port=0, metrics_port=-1, drain_s=0.0,
                          max_connection_age_s=0.3, max_connection_age_grace_s=5)
    server = RaeeServer(config, backbone=stores["backbone"]).start()
    try:
        server.loaded.wait(60)
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.RaeeStub(channel)
            states = []
            channel.subscribe(states.append)
            for _ in range(12):
                stub.Classify(pb.ClassifyRequest(task="sst2", texts=["good"]), timeout=10)  # none fails
                time.sleep(0.1)
        # the server sent GOAWAY after 0.3 s: the channel went back to IDLE/CONNECTING and reconnected
        assert states.count(grpc.ChannelConnectivity.READY) >= 2, states
    finally:
        server.stop(1)


def make_certificate(directory, name: str) -> tuple[str, str]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return str(key), str(cert)


@pytest.mark.slow
def test_raee_admin_speaks_tls_and_mutual_tls(stores, tmp_path, capsys):
    from service.admin import main as raee_admin
    from service.config import ServerConfig
    from service.server import RaeeServer
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    server_key, server_cert = make_certificate(tmp_path, "server")
    client_key, client_cert = make_certificate(tmp_path, "client")
    config = ServerConfig(stores=(stores["current"],), host="127.0.0.1", port=0, metrics_port=-1, drain_s=0.0,
                          tls_cert=server_cert, tls_key=server_key, tls_client_ca=client_cert)
    server = RaeeServer(config, backbone=stores["backbone"]).start()
    try:
        server.loaded.wait(60)
        address = ["--address", f"localhost:{server.port}", "--timeout", "3"]
        mutual = ["--tls-ca", server_cert, "--tls-cert", client_cert, "--tls-key", client_key]
        assert raee_admin([*address, *mutual, "info"]) == 0
        assert '"name": "sst2"' in capsys.readouterr().out
        assert raee_admin([*address, *mutual, "wait", "--for", "10"]) == 0  # an exec probe for a TLS server
        assert raee_admin([*address, "--tls-ca", server_cert, "info"]) == 1  # no client certificate: refused
        assert raee_admin([*address, "info"]) == 1  # plaintext against TLS
        assert raee_admin([*address, "--tls-ca", server_cert, "--tls-cert", client_cert, "info"]) == 2
        assert "--tls-cert and --tls-key go together" in capsys.readouterr().err
    finally:
        server.stop(1)
