"""raee-serve's log as an operator reads it: JSON lines at a chosen level, the configuration once at start, one
line per request with its request id (returned in trailing metadata), refused reloads at warning, and no lines
from gRPC's C core or third-party progress bars."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time

import grpc
import pytest

from service.api import pb, pb_grpc
from service.launch import ServerProcess

pytestmark = pytest.mark.slow  # real raee-serve processes: tens of seconds


def lines_of(server: ServerProcess) -> list[dict]:
    out = server.output()
    parsed = []
    for line in out.splitlines():
        assert line.startswith("{"), f"not a JSON line: {line!r}"
        parsed.append(json.loads(line))
    return parsed


def wait_for(server: ServerProcess, message: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if message in server.output():
            return
        assert server.process.poll() is None, server.output()
        time.sleep(0.2)
    raise AssertionError(f"{message!r} not logged: {server.output()[-2000:]}")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    base = tmp_path_factory.mktemp("tls")
    key, cert = base / "key.pem", base / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return str(key), str(cert)


def test_json_log_of_a_tls_server(stores, certificate, tmp_path):
    key, cert = certificate
    server = ServerProcess([stores["current"]], "--log-format", "json", "--tls-cert", cert, "--tls-key", key,
                           admin=True, roots=(stores["root"],))
    try:
        wait_for(server, "SERVING tasks")
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as plain:  # a failed TLS handshake
            with pytest.raises(grpc.RpcError):
                pb_grpc.RaeeStub(plain).GetInfo(pb.GetInfoRequest(), timeout=3)
        credentials = grpc.ssl_channel_credentials(open(cert, "rb").read())
        with grpc.secure_channel(f"localhost:{server.port}", credentials) as channel:
            stub = pb_grpc.RaeeStub(channel)
            _, call = stub.Classify.with_call(pb.ClassifyRequest(task="sst2", texts=["good film", "dull plot"]),
                                              metadata=(("x-request-id", "req-42"),), timeout=10)
            assert ("x-request-id", "req-42") in tuple(call.trailing_metadata())
            with pytest.raises(grpc.RpcError) as info:
                stub.Classify(pb.ClassifyRequest(task="imdb", texts=["good"]), timeout=10)
            made_up = dict(info.value.trailing_metadata())["x-request-id"]
            assert len(made_up) == 16  # made up, and returned with the error too
        with grpc.secure_channel(f"localhost:{server.admin_port}", credentials) as admin:
            with pytest.raises(grpc.RpcError):
                pb_grpc.RaeeStub(admin).ReloadStore(pb.ReloadStoreRequest(task="sst2", store_path=stores["other"]),
                                                    timeout=60)
        time.sleep(0.5)
    finally:
        assert server.stop() == 0
    lines = lines_of(server)  # every line is JSON: no C-core line, no progress bar
    configuration = [x for x in lines if x["message"].startswith("configuration:")]
    assert len(configuration) == 1 and configuration[0]["configuration"]["log_format"] == "json"
    assert configuration[0]["configuration"]["tls_key"] == key  # paths, never secrets: there are none in it
    requests = {x["request_id"]: x for x in lines if x["logger"] == "raee-serve.requests"}
    ok, refused = requests["req-42"], requests[made_up]
    assert (ok["task"], ok["texts"], ok["policy"], ok["code"]) == ("sst2", 2, "calibrated", "OK")
    assert ok["exit_layers"].endswith("of 3") and ok["ms"] > 0
    assert (refused["task"], refused["code"]) == ("imdb", "NOT_FOUND")
    warnings = [x for x in lines if x["level"] == "warning" and "reload of task sst2" in x["message"]]
    assert len(warnings) == 1 and "FAILED_PRECONDITION" in warnings[0]["message"]


def test_log_level_warning_drops_request_lines(serve, caplog):
    from service.client import Client
    server = serve()
    with caplog.at_level(logging.WARNING, logger="raee-serve.requests"):
        with Client(f"127.0.0.1:{server.port}") as client:
            client.classify(["good"], task="sst2")
    assert not [r for r in caplog.records if r.name == "raee-serve.requests"]
    with caplog.at_level(logging.INFO, logger="raee-serve.requests"):
        with Client(f"127.0.0.1:{server.port}") as client:
            client.classify(["good"], task="sst2")
    assert [r for r in caplog.records if r.name == "raee-serve.requests"]


def test_log_settings_are_checked(tmp_path):
    from raee.errors import InputError
    from service.config import load_config
    with pytest.raises(InputError, match="log_format 'xml' is not one of text, json"):
        load_config(["--store", "s", "--log-format", "xml"], environ={})
    with pytest.raises(InputError, match="log_level 'loud'"):
        load_config(["--store", "s", "--log-level", "loud"], environ={})


def test_no_client_string_can_start_a_log_line_of_its_own(serve, caplog):
    """A task name (any client) or a reload's store path (an admin) holding a line break is logged quoted."""
    server = serve()
    forged = "sst2\n2026-12-03 00:00:00,000 ERROR raee-serve: FORGED LINE"
    stub = pb_grpc.RaeeStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
    admin = pb_grpc.RaeeStub(grpc.insecure_channel(f"127.0.0.1:{server.admin_port}"))
    with caplog.at_level(logging.INFO):
        for call in (lambda: stub.Classify(pb.ClassifyRequest(task=forged, texts=["good"]), timeout=10),
                     lambda: admin.ReloadStore(pb.ReloadStoreRequest(task="sst2", store_path="/x\n" + forged),
                                               timeout=10)):
            with pytest.raises(grpc.RpcError):
                call()
    lines = [r.getMessage() for r in caplog.records if "FORGED" in r.getMessage()]
    assert len(lines) == 2 and all("\n" not in line and "\\n" in line for line in lines), lines
