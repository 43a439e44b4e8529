"""The authenticated coordinator: TLS only, the operator token on every call that writes, reads open.

Real gRPC and HTTP servers on loopback sockets, real certificates (``--tls-self-signed``'s code), real
clients: the typed ``CoordinatorClient``, ``potluck run``, and a generic client that knows the API only
through server reflection, as ``grpcurl`` does.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from potluck.coordinator import cli as coordinator_cli
from potluck.coordinator import run_cli
from potluck.coordinator.auth import OperatorGate, create_operator_token
from potluck.coordinator.grpc_service import CoordinatorService, start_grpc_server
from potluck.coordinator.store import RunStore
from potluck.coordinator.tls import self_signed_certificate
from potluck.coordinator.web import start_web_server, stop_web_server
from potluck.peer.net.discovery import DiscoveryError, join_via_coordinator
from potluck.protocols.coordinator_access import CoordinatorAccess
from potluck.protocols.coordinator_client import CoordinatorClient
from tests.test_grpc_api import expect_error
from tests.test_grpc_fuzz import base_spec

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

REFUSED = "potluck_coordinator_refused_calls_total"
PUBLISH = "/potluck.v1.Coordinator/PublishRun"


@dataclass
class Secured:
    address: str
    db_path: Path
    store: RunStore
    registry: CollectorRegistry
    cert_path: Path
    token_path: Path
    token: str

    def client(self, token: str | None = None, tls: bool = True) -> CoordinatorClient:
        ca = self.cert_path.read_bytes() if tls else None
        return CoordinatorClient(self.address, timeout=10, access=CoordinatorAccess(ca, token))

    def refused(self, method: str, reason: str) -> float:
        return self.registry.get_sample_value(REFUSED, {"method": method, "reason": reason}) or 0.0

    def stored_run_ids(self) -> list[str]:
        db = sqlite3.connect(self.db_path)
        try:
            return [row[0] for row in db.execute("SELECT run_id FROM runs")]
        finally:
            db.close()


@pytest.fixture
def secured(tmp_path) -> Iterator[Secured]:
    """A coordinator's gRPC API as ``run-coordinator --tls-self-signed DIR`` serves it."""
    certificate = self_signed_certificate(tmp_path / "tls", "127.0.0.1")
    token_path = tmp_path / "tls" / "operator.token"
    token = create_operator_token(token_path)
    store, registry = RunStore(tmp_path / "coordinator.sqlite"), CollectorRegistry()
    service = CoordinatorService(store, lambda: ["/ip4/127.0.0.1/tcp/31337/p2p/QmBootstrap"], b"key")
    server, port = start_grpc_server(
        service, "127.0.0.1", 0,
        tls_key_pair=(certificate.cert_pem, certificate.key_pem),
        operator_gate=OperatorGate(token, registry),
    )  # fmt: skip
    try:
        yield Secured(
            f"127.0.0.1:{port}", tmp_path / "coordinator.sqlite", store, registry,
            certificate.cert_path, token_path, token,
        )  # fmt: skip
    finally:
        server.stop(grace=None)


def test_a_plaintext_client_is_refused_at_once(secured):
    with CoordinatorClient(secured.address, timeout=20) as client:  # no --tls-ca
        expect_error("UNAVAILABLE", client.list_runs)  # not DEADLINE_EXCEEDED: refused, not left hanging


def test_publish_needs_the_operator_token_and_nothing_is_stored_without_it(secured):
    spec = json.dumps(base_spec("guarded"))
    with secured.client() as anonymous:
        error = expect_error("UNAUTHENTICATED", anonymous.publish, spec)
        assert "operator token" in error.details and "\n" not in error.details
    with secured.client(token="not-" + secured.token) as wrong:
        expect_error("PERMISSION_DENIED", wrong.publish, spec)
    assert secured.stored_run_ids() == [] and secured.store.list_runs() == []
    assert secured.refused(PUBLISH, "missing_token") == 1
    assert secured.refused(PUBLISH, "wrong_token") == 1

    with secured.client(token=secured.token) as operator:
        assert operator.publish(spec).status == "active"
    assert secured.stored_run_ids() == ["guarded"]

    # status changes are guarded the same way; the status stays as it was
    with secured.client() as anonymous:
        expect_error("UNAUTHENTICATED", anonymous.set_status, "guarded", "finished")
    assert secured.store.get_run("guarded").status == "active"
    assert secured.refused("/potluck.v1.Coordinator/UpdateRunStatus", "missing_token") == 1
    with secured.client(token=secured.token) as operator:
        assert operator.set_status("guarded", "paused").status == "paused"
    assert secured.refused(PUBLISH, "missing_token") == 1  # accepted calls are not counted


def test_a_method_not_in_the_open_list_is_closed_and_counted_without_its_name(secured):
    credentials = grpc.ssl_channel_credentials(secured.cert_path.read_bytes())
    with grpc.secure_channel(secured.address, credentials) as channel:
        made_up = channel.unary_unary("/potluck.v1.Coordinator/DeleteEverything" + "x" * 500)
        with pytest.raises(grpc.RpcError) as refused:
            made_up(b"", timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert secured.refused("other", "missing_token") == 1  # a made-up path never becomes a label


def test_reads_stay_open_over_tls(secured):
    with secured.client(token=secured.token) as operator:
        operator.publish(json.dumps(base_spec("readable")))
    with secured.client() as anonymous:
        assert [run.run_id for run in anonymous.list_runs()] == ["readable"]
        assert anonymous.get_run("readable").status == "active"
        assert anonymous.join("readable").initial_peers == ["/ip4/127.0.0.1/tcp/31337/p2p/QmBootstrap"]
    # the certificate names localhost too: a client may dial either
    port = secured.address.rsplit(":", 1)[1]
    credentials = grpc.ssl_channel_credentials(secured.cert_path.read_bytes())
    with grpc.secure_channel(f"localhost:{port}", credentials) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_a_peer_joins_through_a_tls_coordinator_with_only_its_certificate(secured):
    with secured.client(token=secured.token) as operator:
        operator.publish(json.dumps(base_spec("joinable")))
    access = CoordinatorAccess(secured.cert_path.read_bytes())  # what run-peer --coordinator-tls-ca reads
    joined = join_via_coordinator(secured.address, "joinable", timeout=10, access=access)
    assert joined.spec.run_id == "joinable" and joined.coordinator_key == b"key"
    with pytest.raises(DiscoveryError, match="UNAVAILABLE"):  # without it: refused, and said so
        join_via_coordinator(secured.address, "joinable", timeout=10)


def test_a_generic_client_lists_and_calls_the_read_api_through_reflection(secured):
    with secured.client(token=secured.token) as operator:
        operator.publish(json.dumps(base_spec("reflected")))
    credentials = grpc.ssl_channel_credentials(secured.cert_path.read_bytes())
    with grpc.secure_channel(secured.address, credentials) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert "potluck.v1.Coordinator" in database.get_services()
        pool = descriptor_pool.DescriptorPool(database)
        method = pool.FindServiceByName("potluck.v1.Coordinator").methods_by_name["ListRuns"]
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        call = channel.unary_unary(
            "/potluck.v1.Coordinator/ListRuns",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        response = call(request_class(), timeout=10)
    assert [run.run_id for run in response.runs] == ["reflected"]


def test_the_dashboard_and_metrics_behind_the_token(tmp_path):
    store, registry = RunStore(tmp_path / "coordinator.sqlite"), CollectorRegistry()
    gate = OperatorGate("s3cret-token", registry)
    server, port = start_web_server(store, registry, "127.0.0.1", 0, operator_gate=gate)
    try:

        def get(path: str, authorization: str | None = None) -> tuple[int, dict[str, str]]:
            request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
            if authorization:
                request.add_header("Authorization", authorization)
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return response.status, dict(response.headers)
            except urllib.error.HTTPError as e:
                return e.code, dict(e.headers)

        status, headers = get("/metrics")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
        assert get("/api/runs", "Bearer wrong")[0] == 401
        assert get("/metrics", "Bearer s3cret-token")[0] == 200
        browser = "Basic " + base64.b64encode(b"anyone:s3cret-token").decode()
        assert get("/", browser)[0] == 200
        assert get("/healthz")[0] == 200  # container health checks carry no token
        assert registry.get_sample_value(REFUSED, {"method": "http", "reason": "missing_token"}) == 1
        assert registry.get_sample_value(REFUSED, {"method": "http", "reason": "wrong_token"}) == 1
    finally:
        stop_web_server(server)


def test_potluck_run_with_the_certificate_and_the_token(secured, tmp_path, capsys, monkeypatch):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(json.dumps(base_spec("from-the-cli")))
    tls = ["--coordinator", secured.address, "--tls-ca", str(secured.cert_path)]
    monkeypatch.delenv("POTLUCK_OPERATOR_TOKEN", raising=False)
    assert run_cli.main(["publish", str(spec_path), *tls]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    token = ["--operator-token-file", str(secured.token_path)]
    assert run_cli.main(["publish", str(spec_path), *tls, *token]) == 0
    monkeypatch.setenv("POTLUCK_OPERATOR_TOKEN", secured.token)
    assert run_cli.main(["status", "from-the-cli", "finished", *tls]) == 0
    assert secured.store.get_run("from-the-cli").status == "finished"


@pytest.mark.parametrize(
    "make_file, flag, message",
    [
        (None, "--tls-ca", "no such file"),
        (lambda p: p.write_text("hello"), "--tls-ca", "not a PEM certificate"),
        (lambda p: p.write_text("  \n"), "--operator-token-file", "the operator token is empty"),
    ],
)
def test_bad_client_files_are_one_line_naming_the_flag(tmp_path, capsys, make_file, flag, message):
    path = tmp_path / "given"
    if make_file is not None:
        make_file(path)
    assert run_cli.main(["list", flag, str(path), "--coordinator", "127.0.0.1:1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"potluck run: {flag} {path}: {message}") and err.count("\n") == 1, err


def test_bad_server_files_are_one_line_before_anything_loads(tmp_path, capsys):
    mine = self_signed_certificate(tmp_path / "mine", "127.0.0.1")
    other = self_signed_certificate(tmp_path / "other", "127.0.0.1")
    (tmp_path / "empty.token").write_text("")
    cases = [
        (["--tls-cert", str(tmp_path / "nope.crt"), "--tls-key", str(other.cert_path)], "--tls-cert"),
        (["--tls-cert", str(mine.cert_path), "--tls-key", str(mine.cert_path)], "not an unencrypted PEM"),
        (["--tls-cert", str(mine.cert_path), "--tls-key", str(tmp_path / "other" / "coordinator.key")],
         "not the private key of --tls-cert"),
        (["--tls-cert", str(mine.cert_path)], "--tls-cert and --tls-key go together"),
        (["--operator-token-file", str(tmp_path / "empty.token")], "the operator token is empty"),
        (["--http-auth"], "--http-auth needs an operator token"),
        (["--tls-self-signed", str(tmp_path / "empty.token" / "sub")], "cannot write there"),
    ]  # fmt: skip
    for argv, message in cases:
        assert coordinator_cli.main(["--db", str(tmp_path / "never.db"), *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and err.startswith("run-coordinator: "), err
    assert not (tmp_path / "never.db").exists()


def test_a_self_signed_certificate_is_kept_across_restarts(tmp_path):
    first = self_signed_certificate(tmp_path, "0.0.0.0")
    again = self_signed_certificate(tmp_path, "0.0.0.0")
    assert again.cert_pem == first.cert_pem  # clients keep trusting the file they were given
    assert {"localhost", "127.0.0.1"} <= set(first.names)
    assert (tmp_path / "coordinator.key").stat().st_mode & 0o077 == 0
    token = create_operator_token(tmp_path / "operator.token")
    assert create_operator_token(tmp_path / "operator.token") == token and len(token) >= 32


def test_an_open_coordinator_beyond_loopback_warns(capsys):
    args = coordinator_cli.build_parser().parse_args(["--host", "0.0.0.0"])
    coordinator_cli.print_security(args, coordinator_cli.security_from_args(args))
    assert "WARNING: anyone who reaches 0.0.0.0:50051 can publish runs" in capsys.readouterr().err
    args = coordinator_cli.build_parser().parse_args([])
    coordinator_cli.print_security(args, coordinator_cli.security_from_args(args))
    assert capsys.readouterr().err == ""


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_run_coordinator_with_tls_self_signed_and_http_auth(coordinator, tmp_path):
    folder = tmp_path / "tls"
    coord = coordinator(extra_args=("--tls-self-signed", str(folder), "--http-auth"))
    cert_path, token = folder / "coordinator.crt", (folder / "operator.token").read_text().strip()
    assert f"clients trust {cert_path}" in coord.log() and str(folder / "operator.token") in coord.log()
    access = CoordinatorAccess(cert_path.read_bytes())
    with CoordinatorClient(coord.address, timeout=20) as plaintext:
        expect_error("UNAVAILABLE", plaintext.list_runs)
    with CoordinatorClient(coord.address, access=access) as anonymous:
        expect_error("UNAUTHENTICATED", anonymous.publish, json.dumps(base_spec("e2e")))
        assert anonymous.list_runs() == []
    with CoordinatorClient(coord.address, access=CoordinatorAccess(access.tls_ca, token)) as operator:
        assert operator.publish(json.dumps(base_spec("e2e"))).run_id == "e2e"
    with pytest.raises(urllib.error.HTTPError) as refused:
        coord.get("/metrics")
    assert refused.value.code == 401
    text = coord.get("/metrics", token=token)
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    refusals = {(s.labels["method"], s.labels["reason"]): s.value for s in samples if s.name == REFUSED}
    assert refusals == {(PUBLISH, "missing_token"): 1.0, ("http", "missing_token"): 1.0}
    assert coord.get("/healthz") == "ok"
