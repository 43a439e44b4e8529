"""Fuzz the coordinator's gRPC API: it answers garbage with a status code, never crashes, never stores junk.

Raw bytes and truncated requests go through an untyped channel (no client-side serialisation); random
field values go through the typed stubs. An unexpected exception in a handler would reach the client as
``UNKNOWN``, which every test here rejects. Each test ends by checking the server still works.

Every test runs twice: against the open, plaintext server and against one with TLS and the operator token
(``run-coordinator --tls-self-signed``), whose channel carries the token; a caller without it, or with a
random ``authorization`` value, is refused before anything is parsed or stored.
"""

from __future__ import annotations

import base64
import itertools
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from potluck.coordinator.auth import OperatorGate, create_operator_token
from potluck.coordinator.grpc_service import CoordinatorService, start_grpc_server
from potluck.coordinator.store import RunStore
from potluck.coordinator.tls import self_signed_certificate
from potluck.protocols.coordinator_access import CoordinatorAccess
from potluck.protocols.coordinator_client import CoordinatorClient
from potluck.protocols.generated import coordinator_pb2 as pb
from potluck.protocols.generated import coordinator_pb2_grpc as pb_grpc
from potluck.protocols.runspec import parse_run_spec

pytestmark = pytest.mark.timeout(120)

FUZZ = settings(
    max_examples=60,
    deadline=None,  # the first calls pay for channel set-up
    database=None,  # no .hypothesis/ folder in the repository; failures print their example anyway
    suppress_health_check=[HealthCheck.too_slow],
)

SERVICE = "/potluck.v1.Coordinator/"
REQUEST_TYPES = {
    "PublishRun": pb.PublishRunRequest,
    "ListRuns": pb.ListRunsRequest,
    "GetRun": pb.GetRunRequest,
    "Join": pb.JoinRequest,
    "UpdateRunStatus": pb.UpdateRunStatusRequest,
}
RESPONSE_TYPES = {
    "PublishRun": pb.Run,
    "ListRuns": pb.ListRunsResponse,
    "GetRun": pb.Run,
    "Join": pb.JoinResponse,
    "UpdateRunStatus": pb.Run,
}
# What the handlers answer on bad input. INTERNAL is gRPC's own answer to bytes that do not parse.
EXPECTED_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
}
SEED_RUN = "fuzz-seed"
_run_ids = itertools.count()


def base_spec(run_id: str) -> dict:
    return {
        "run_id": run_id,
        "model": {"name_or_path": "org/tiny-model", "dtype": "float32"},
        "adapter": {"kind": "lora", "r": 4, "target_modules": ["q_proj"]},
        "data": {"path": "org/tiny-data", "max_length": 64},
        "optimizer": {"lr": 0.001, "betas": [0.9, 0.99]},
        "batch": {"per_peer_batch_size": 4, "target_batch_size": 16},
        "averaging": {"matchmaking_time": 1.0, "compression": "none"},
        "max_global_steps": 100,
        "seed": 3,
    }


@dataclass
class Server:
    store: RunStore
    db_path: str
    channel: grpc.Channel
    stub: pb_grpc.CoordinatorStub
    client: CoordinatorClient
    anonymous: grpc.Channel | None = None
    """With the operator token on: a TLS channel without it."""


@pytest.fixture(scope="module", params=["open", "tls+token"])
def server(request, tmp_path_factory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("fuzz")
    db_path = folder / "coordinator.sqlite"
    store = RunStore(db_path)
    service = CoordinatorService(store, lambda: ["/ip4/127.0.0.1/tcp/31337/p2p/QmBootstrap"], b"key")
    if request.param == "open":
        grpc_server, port = start_grpc_server(service, "127.0.0.1", 0)
        channel, anonymous = grpc.insecure_channel(f"127.0.0.1:{port}"), None
        access = CoordinatorAccess()
    else:
        certificate = self_signed_certificate(folder, "127.0.0.1")
        access = CoordinatorAccess(certificate.cert_pem, create_operator_token(folder / "operator.token"))
        grpc_server, port = start_grpc_server(
            service, "127.0.0.1", 0, tls_key_pair=(certificate.cert_pem, certificate.key_pem),
            operator_gate=OperatorGate(access.operator_token, CollectorRegistry()),
        )  # fmt: skip
        tls = grpc.ssl_channel_credentials(certificate.cert_pem)
        token = grpc.access_token_call_credentials(access.operator_token)  # "authorization: Bearer ..."
        channel = grpc.secure_channel(f"127.0.0.1:{port}", grpc.composite_channel_credentials(tls, token))
        anonymous = grpc.secure_channel(f"127.0.0.1:{port}", tls)
    client = CoordinatorClient(f"127.0.0.1:{port}", access=access)
    client.publish(json.dumps(base_spec(SEED_RUN)))
    try:
        yield Server(store, str(db_path), channel, pb_grpc.CoordinatorStub(channel), client, anonymous)
    finally:
        client.close()
        channel.close()
        if anonymous is not None:
            anonymous.close()
        grpc_server.stop(grace=None)


def call_raw(server: Server, method: str, payload: bytes) -> None:
    """Send bytes as they are; a response must parse, an error must be one the API documents."""
    call = server.channel.unary_unary(SERVICE + method, request_serializer=None, response_deserializer=None)
    try:
        response = call(payload, timeout=10)
    except grpc.RpcError as e:
        check_error(e)
        return
    RESPONSE_TYPES[method].FromString(response)


def check_error(error: grpc.RpcError) -> None:
    if error.code() == grpc.StatusCode.INTERNAL:
        # gRPC's answer when the request does not parse; anything else INTERNAL is a handler bug.
        assert error.details() == "Exception deserializing request!", error.details()
    else:
        assert error.code() in EXPECTED_ERRORS, (error.code(), error.details())


def strict_json(text: str) -> dict:
    """Parse JSON as every other language does: Python alone would accept NaN and Infinity."""

    def reject(constant: str) -> None:
        raise AssertionError(f"spec_json holds {constant}, which is not JSON")

    return json.loads(text, parse_constant=reject)


def assert_still_serving(server: Server) -> None:
    """Valid requests get correct answers, and everything stored is a spec that peers can load."""
    run_id = f"after-fuzz-{next(_run_ids)}"
    published = server.client.publish(json.dumps(base_spec(run_id)))
    assert published.status == "active"
    assert server.client.get_run(run_id) == published
    assert server.client.join(run_id).run == published
    assert server.client.set_status(run_id, "paused").status == "paused"
    assert server.client.get_run(SEED_RUN).spec == parse_run_spec(base_spec(SEED_RUN)).model_dump(mode="json")
    runs = server.client.list_runs()
    assert {SEED_RUN, run_id} <= {run.run_id for run in runs}
    for run in server.stub.ListRuns(pb.ListRunsRequest(), timeout=10).runs:
        spec = strict_json(run.spec_json)
        assert parse_run_spec(spec).model_dump(mode="json") == spec, run.run_id
    health = health_pb2_grpc.HealthStub(server.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    db = sqlite3.connect(server.db_path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        db.close()


# -- untyped: bytes on the wire --------------------------------------------------------------------


@FUZZ
@given(method=st.sampled_from(sorted(REQUEST_TYPES)), payload=st.binary(max_size=512))
def test_random_bytes(server, method, payload):
    call_raw(server, method, payload)


def valid_request(method: str) -> bytes:
    requests = {
        "PublishRun": pb.PublishRunRequest(spec=yaml.safe_dump(base_spec("never-complete"))),
        "ListRuns": pb.ListRunsRequest(),
        "GetRun": pb.GetRunRequest(run_id=SEED_RUN),
        "Join": pb.JoinRequest(run_id=SEED_RUN),
        "UpdateRunStatus": pb.UpdateRunStatusRequest(run_id=SEED_RUN, status=pb.RUN_STATUS_ACTIVE),
    }
    return requests[method].SerializeToString()


@FUZZ
@given(data=st.data())
def test_truncated_valid_requests(server, data):
    method = data.draw(st.sampled_from(["PublishRun", "GetRun", "Join", "UpdateRunStatus"]))
    payload = valid_request(method)
    cut = data.draw(st.integers(0, len(payload) - 1))
    call_raw(server, method, payload[:cut])
    # A cut request is never the complete one, so it cannot have published a run.
    assert "never-complete" not in {run.run_id for run in server.store.list_runs()}


# -- typed: random field values --------------------------------------------------------------------


run_ids = st.one_of(st.text(max_size=80), st.sampled_from([SEED_RUN, "", "../etc", "x" * 64]))


@FUZZ
@given(spec_text=st.text(max_size=2000))
def test_random_spec_text(server, spec_text):
    try:
        server.stub.PublishRun(pb.PublishRunRequest(spec=spec_text), timeout=10)
    except grpc.RpcError as e:
        check_error(e)


@FUZZ
@given(
    method=st.sampled_from(["GetRun", "Join", "UpdateRunStatus"]),
    run_id=run_ids,
    status=st.integers(-(2**31), 2**31 - 1),
)
def test_random_run_ids_and_statuses(server, method, run_id, status):
    request = (
        pb.UpdateRunStatusRequest(run_id=run_id, status=status)
        if method == "UpdateRunStatus"
        else REQUEST_TYPES[method](run_id=run_id)
    )
    try:
        getattr(server.stub, method)(request, timeout=10)
    except grpc.RpcError as e:
        check_error(e)
        if method == "UpdateRunStatus" and status not in (1, 2, 3):
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT


# Values at the edges of the spec's bounds come up often; random JSON-like data covers the rest.
edge_values = st.sampled_from(
    [float("inf"), float("-inf"), float("nan"), 0, -1, 0.0, 1e308, 2**63, "", "none", True]
)
json_values = edge_values | st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=10,
)
SPEC_FIELDS = [
    ("run_id",),
    ("model",),
    ("model", "name_or_path"),
    ("model", "dtype"),
    ("adapter",),
    ("adapter", "kind"),
    ("adapter", "r"),
    ("adapter", "target_modules"),
    ("data", "path"),
    ("data", "max_length"),
    ("optimizer", "lr"),
    ("optimizer", "betas"),
    ("optimizer", "max_grad_norm"),
    ("batch", "per_peer_batch_size"),
    ("batch", "target_batch_size"),
    ("averaging", "matchmaking_time"),
    ("averaging", "compression"),
    ("max_global_steps",),
    ("seed",),
    ("stage",),
    ("unknown_field",),
]


@settings(FUZZ, max_examples=150)
@given(path=st.sampled_from(SPEC_FIELDS), value=json_values)
def test_one_random_field_value(server, path, value):
    """Whatever the server accepts, peers can load back; whatever it rejects, it says which field."""
    spec = base_spec(f"mutated-{next(_run_ids)}")
    parent = spec
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    try:
        run = server.stub.PublishRun(pb.PublishRunRequest(spec=yaml.safe_dump(spec)), timeout=10)
    except grpc.RpcError as e:
        check_error(e)
        if e.code() == grpc.StatusCode.ALREADY_EXISTS:
            assert path == ("run_id",)
        else:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert path[0] in e.details(), e.details()
        return
    stored = strict_json(run.spec_json)
    assert parse_run_spec(stored).model_dump(mode="json") == stored
    assert server.store.get_run(run.run_id).spec == stored


authorizations = st.one_of(
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=120),
    st.builds("Bearer {}".format, st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=80)),
    st.builds("Basic {}".format, st.binary(max_size=60).map(lambda b: base64.b64encode(b).decode())),
)


@FUZZ
@given(authorization=authorizations, method=st.sampled_from(["PublishRun", "UpdateRunStatus"]))
def test_random_authorization_is_refused_and_stores_nothing(server, authorization, method):
    if server.anonymous is None:
        pytest.skip("the open server asks for no token")
    run_id = f"unauthorized-{next(_run_ids)}"
    request = {
        "PublishRun": pb.PublishRunRequest(spec=yaml.safe_dump(base_spec(run_id))),
        "UpdateRunStatus": pb.UpdateRunStatusRequest(run_id=SEED_RUN, status=pb.RUN_STATUS_FINISHED),
    }[method]
    seed_before = server.store.get_run(SEED_RUN)
    call = getattr(pb_grpc.CoordinatorStub(server.anonymous), method)
    with pytest.raises(grpc.RpcError) as refused:
        call(request, timeout=10, metadata=[("authorization", authorization)])
    assert refused.value.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
    assert run_id not in {run.run_id for run in server.store.list_runs()}
    assert server.store.get_run(SEED_RUN) == seed_before


def test_server_still_serves_after_fuzzing(server):
    # Runs last in this module (pytest keeps file order), after every fuzz test above.
    assert_still_serving(server)
