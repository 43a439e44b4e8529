"""The coordinator's gRPC API and ``potluck run ...``, against a real server on 127.0.0.1.

Every error case also checks that nothing was written: the SQLite file's bytes and rows are compared
before and after, and the ``on_run_changed`` hook must not have fired.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from potluck.coordinator import run_cli
from potluck.coordinator.grpc_service import CoordinatorService, start_grpc_server
from potluck.coordinator.store import RunRecord, RunStore
from potluck.protocols.coordinator_client import CoordinatorClient, CoordinatorError
from potluck.protocols.generated import coordinator_pb2 as pb
from potluck.protocols.generated import coordinator_pb2_grpc as pb_grpc
from potluck.protocols.runspec import parse_run_spec

pytestmark = pytest.mark.timeout(60)

PUBLIC_KEY = b"[owner:test-public-key]"


def valid_spec(run_id: str = "run-a", **overrides) -> dict:
    spec = {
        "run_id": run_id,
        "model": {"name_or_path": "org/tiny-model"},
        "data": {"path": "org/tiny-data"},
        "batch": {"per_peer_batch_size": 4, "target_batch_size": 16},
        "max_global_steps": 100,
    }
    spec.update(overrides)
    return spec


@dataclass
class Coordinator:
    store: RunStore
    db_path: Path
    address: str
    client: CoordinatorClient
    stub: pb_grpc.CoordinatorStub
    channel: grpc.Channel
    bootstrap: list[str]
    changed: list[RunRecord] = field(default_factory=list)

    def db_state(self) -> tuple[str, list[tuple]]:
        """The file's checksum and every row: an error must change neither."""
        db = sqlite3.connect(self.db_path)
        try:
            rows = [
                (table, *row)
                for table in ("runs", "peer_reports", "run_history")
                for row in db.execute(f"SELECT * FROM {table} ORDER BY 1, 2, 3")
            ]
        finally:
            db.close()
        return hashlib.sha256(self.db_path.read_bytes()).hexdigest(), rows


@pytest.fixture
def coordinator(tmp_path) -> Iterator[Coordinator]:
    db_path = tmp_path / "coordinator.sqlite"
    store = RunStore(db_path)
    bootstrap = ["/ip4/127.0.0.1/tcp/31337/p2p/QmBootstrap"]
    changed: list[RunRecord] = []
    service = CoordinatorService(store, lambda: list(bootstrap), PUBLIC_KEY, on_run_changed=changed.append)
    server, port = start_grpc_server(service, "127.0.0.1", 0)
    address = f"127.0.0.1:{port}"
    channel = grpc.insecure_channel(address)
    client = CoordinatorClient(address, timeout=10)
    try:
        yield Coordinator(
            store, db_path, address, client, pb_grpc.CoordinatorStub(channel), channel, bootstrap, changed
        )
    finally:
        client.close()
        channel.close()
        server.stop(grace=None)


def expect_error(code: str, call, *args) -> CoordinatorError:
    with pytest.raises(CoordinatorError) as caught:
        call(*args)
    assert caught.value.code == code, caught.value
    return caught.value


def expect_error_without_writes(coordinator: Coordinator, code: str, call, *args) -> CoordinatorError:
    before, hook_calls = coordinator.db_state(), len(coordinator.changed)
    error = expect_error(code, call, *args)
    assert coordinator.db_state() == before, f"{code} changed the database"
    assert len(coordinator.changed) == hook_calls, f"{code} fired on_run_changed"
    return error


# -- PublishRun, GetRun, ListRuns ------------------------------------------------------------------


def test_publish_stores_the_validated_spec_and_notifies(coordinator):
    run = coordinator.client.publish(json.dumps(valid_spec("run-a")))
    assert run.run_id == "run-a" and run.status == "active"
    # Defaults are filled in: peers get the whole validated spec, not the operator's shorthand.
    assert run.spec == parse_run_spec(valid_spec("run-a")).model_dump(mode="json")
    assert run.spec["optimizer"]["lr"] == 1e-4
    assert run.created_at == run.updated_at > 0
    assert [record.run_id for record in coordinator.changed] == ["run-a"]
    assert coordinator.store.get_run("run-a").spec == run.spec

    # YAML is accepted as well as JSON.
    second = coordinator.client.publish(yaml.safe_dump(valid_spec("run-b", adapter={"kind": "lora", "r": 4})))
    assert second.spec["adapter"]["r"] == 4

    assert coordinator.client.get_run("run-a") == run
    assert [r.run_id for r in coordinator.client.list_runs()] == ["run-a", "run-b"]  # oldest first
    assert [record.run_id for record in coordinator.changed] == ["run-a", "run-b"]


def test_list_runs_is_empty_on_a_fresh_coordinator(coordinator):
    assert coordinator.client.list_runs() == []


def test_invalid_spec_names_every_bad_field_and_writes_nothing(coordinator):
    coordinator.client.publish(json.dumps(valid_spec("existing")))
    bad = valid_spec("run-bad", batch={"per_peer_batch_size": 8, "target_batch_size": 2}, surprise=1)
    del bad["data"]
    error = expect_error_without_writes(
        coordinator, "INVALID_ARGUMENT", coordinator.client.publish, json.dumps(bad)
    )
    assert "batch.target_batch_size" in error.details
    assert "must be >= per_peer_batch_size" in error.details
    assert "data: required field is missing" in error.details
    assert "surprise: unknown field" in error.details


@pytest.mark.parametrize(
    "text",
    [
        "run_id: [unclosed",  # a YAML syntax error
        "created: 2001-13-45",  # PyYAML raises ValueError, not YAMLError, on impossible dates
        "[" * 100_000,  # PyYAML's composer recurses: RecursionError
        "- just\n- a list",  # valid YAML, but not a mapping
        "",  # an empty document is None
    ],
    ids=["syntax", "bad-date", "deep-nesting", "list", "empty"],
)
def test_unparseable_spec_is_invalid_argument(coordinator, text):
    error = expect_error_without_writes(coordinator, "INVALID_ARGUMENT", coordinator.client.publish, text)
    assert "invalid run spec" in error.details


def test_non_finite_numbers_are_rejected(coordinator):
    # pydantic accepts inf for `gt=0`, but JSON cannot carry it: peers would read back null.
    text = yaml.safe_dump(valid_spec(optimizer={"lr": float("inf")}))
    error = expect_error_without_writes(coordinator, "INVALID_ARGUMENT", coordinator.client.publish, text)
    assert "optimizer.lr:" in error.details and "finite number" in error.details


def test_thousands_of_bad_fields_still_give_a_readable_error(coordinator):
    # Unbounded details would overflow gRPC's header limit and reach the client as an opaque error.
    bad = valid_spec(**{f"unknown_{i}": i for i in range(5000)})
    error = expect_error_without_writes(
        coordinator, "INVALID_ARGUMENT", coordinator.client.publish, json.dumps(bad)
    )
    assert "unknown_0: unknown field" in error.details
    assert "more problems" in error.details
    assert len(error.details) <= 4000


def test_duplicate_run_id_is_already_exists_and_keeps_the_first_spec(coordinator):
    first = coordinator.client.publish(json.dumps(valid_spec("run-a")))
    again = json.dumps(valid_spec("run-a", max_global_steps=7))
    error = expect_error_without_writes(coordinator, "ALREADY_EXISTS", coordinator.client.publish, again)
    assert "run-a" in error.details
    assert coordinator.client.get_run("run-a") == first


def test_oversized_request_is_rejected_by_the_receive_limit(coordinator):
    coordinator.client.publish(json.dumps(valid_spec("existing")))
    huge = json.dumps(valid_spec("run-huge", model={"name_or_path": "x" * (2 << 20)}))
    error = expect_error_without_writes(coordinator, "RESOURCE_EXHAUSTED", coordinator.client.publish, huge)
    assert "larger than max" in error.details
    # Just under the 1 MiB limit is served: the limit, not some other failure, rejected the 2 MiB one.
    large = json.dumps(valid_spec("run-large", model={"name_or_path": "x" * 900_000}))
    assert coordinator.client.publish(large).spec["model"]["name_or_path"] == "x" * 900_000


def test_unknown_run_is_not_found(coordinator):
    coordinator.client.publish(json.dumps(valid_spec("run-a")))
    for call, args in [
        (coordinator.client.get_run, ("nope",)),
        (coordinator.client.join, ("nope",)),
        (coordinator.client.set_status, ("nope", "paused")),
        (coordinator.client.get_run, ("",)),
        # Echoed back in full, this id would overflow gRPC's header limit and hide the NOT_FOUND.
        (coordinator.client.get_run, ("x" * 500_000,)),
    ]:
        error = expect_error_without_writes(coordinator, "NOT_FOUND", call, *args)
        assert error.details.startswith("no run") and len(error.details) <= 4000


# -- Join ------------------------------------------------------------------------------------------


def test_join_hands_out_the_run_bootstrap_peers_and_key(coordinator):
    coordinator.client.publish(json.dumps(valid_spec("run-a")))
    info = coordinator.client.join("run-a")
    assert info.run == coordinator.client.get_run("run-a")
    assert info.initial_peers == coordinator.bootstrap
    assert info.coordinator_public_key == PUBLIC_KEY
    # Addresses are read on every Join, so peers get the DHT node's current ones.
    coordinator.bootstrap[:] = ["/ip4/10.0.0.2/tcp/4000/p2p/QmOther", "/ip4/10.0.0.3/tcp/4000/p2p/QmThird"]
    assert coordinator.client.join("run-a").initial_peers == coordinator.bootstrap


def test_join_without_run_id_picks_the_newest_active_run(coordinator):
    expect_error_without_writes(coordinator, "NOT_FOUND", coordinator.client.join, None)
    for run_id in ("old", "middle", "newest"):
        coordinator.client.publish(json.dumps(valid_spec(run_id)))
    assert coordinator.client.join(None).run.run_id == "newest"
    assert coordinator.client.join("").run.run_id == "newest"
    coordinator.client.set_status("newest", "paused")
    assert coordinator.client.join(None).run.run_id == "middle"
    coordinator.client.set_status("middle", "finished")
    coordinator.client.set_status("old", "paused")
    error = expect_error_without_writes(coordinator, "NOT_FOUND", coordinator.client.join, None)
    assert "no active run" in error.details
    # A named run is returned whatever its status; the peer decides.
    assert coordinator.client.join("middle").run.status == "finished"


def test_join_is_unavailable_while_the_dht_has_no_address(coordinator):
    coordinator.client.publish(json.dumps(valid_spec("run-a")))
    coordinator.bootstrap.clear()
    expect_error_without_writes(coordinator, "UNAVAILABLE", coordinator.client.join, "run-a")


# -- UpdateRunStatus -------------------------------------------------------------------------------


def test_status_changes_are_stored_and_notified(coordinator):
    published = coordinator.client.publish(json.dumps(valid_spec("run-a")))
    for status in ("paused", "active", "finished"):
        run = coordinator.client.set_status("run-a", status)
        assert run.status == status
        assert coordinator.store.get_run("run-a").status == status
        assert coordinator.changed[-1].status == status
    assert run.updated_at >= published.updated_at and run.created_at == published.created_at
    assert run.spec == published.spec
    assert len(coordinator.changed) == 4


@pytest.mark.parametrize("status", [pb.RUN_STATUS_UNSPECIFIED, 99], ids=["unspecified", "unknown-value"])
def test_unspecified_status_is_invalid_argument(coordinator, status):
    coordinator.client.publish(json.dumps(valid_spec("run-a")))
    before, hook_calls = coordinator.db_state(), len(coordinator.changed)
    with pytest.raises(grpc.RpcError) as caught:
        coordinator.stub.UpdateRunStatus(pb.UpdateRunStatusRequest(run_id="run-a", status=status), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "RUN_STATUS_PAUSED" in caught.value.details()
    assert coordinator.db_state() == before and len(coordinator.changed) == hook_calls


def test_client_rejects_an_unknown_status_before_calling(coordinator):
    with pytest.raises(ValueError, match="active, paused, finished"):
        coordinator.client.set_status("run-a", "cancelled")


def test_a_failing_hook_does_not_fail_the_committed_change(tmp_path):
    store = RunStore(tmp_path / "coordinator.sqlite")

    def broken_hook(record: RunRecord) -> None:
        raise RuntimeError("announcer is down")

    service = CoordinatorService(
        store, lambda: ["/ip4/127.0.0.1/tcp/1"], PUBLIC_KEY, on_run_changed=broken_hook
    )
    server, port = start_grpc_server(service, "127.0.0.1", 0)
    try:
        with CoordinatorClient(f"127.0.0.1:{port}") as client:
            assert client.publish(json.dumps(valid_spec("run-a"))).run_id == "run-a"
            assert client.set_status("run-a", "paused").status == "paused"
        assert store.get_run("run-a").status == "paused"
    finally:
        server.stop(grace=None)


# -- health and reflection -------------------------------------------------------------------------


def test_health_check_is_serving(coordinator):
    health = health_pb2_grpc.HealthStub(coordinator.channel)
    for service in ("", "potluck.v1.Coordinator"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as caught:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_the_service(coordinator):
    reflection = reflection_pb2_grpc.ServerReflectionStub(coordinator.channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="potluck.v1.Coordinator"),
    ]
    listed, described = list(reflection.ServerReflectionInfo(iter(requests), timeout=10))
    names = {service.name for service in listed.list_services_response.service}
    assert {"potluck.v1.Coordinator", "grpc.health.v1.Health"} <= names
    from google.protobuf import descriptor_pb2

    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in described.file_descriptor_response.file_descriptor_proto
    ]
    coordinator_file = next(f for f in files if f.name == "potluck/v1/coordinator.proto")
    methods = {m.name for s in coordinator_file.service for m in s.method}
    assert methods == {"PublishRun", "ListRuns", "GetRun", "Join", "UpdateRunStatus"}


# -- potluck run ... -------------------------------------------------------------------------------


def write_spec(folder: Path, **overrides) -> Path:
    spec = valid_spec(**overrides)
    path = folder / f"{spec['run_id']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run_cli_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = run_cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_publish_list_show_status(coordinator, tmp_path, capsys):
    spec_path = write_spec(tmp_path, run_id="cli-run", data={"path": "./train.jsonl"})
    at = ("--coordinator", coordinator.address)

    code, out, err = run_cli_main(capsys, "publish", str(spec_path), *at)
    assert code == 0, err
    header, row = out.splitlines()
    assert header.split()[:3] == ["RUN", "ID", "STATUS"] and "MAX STEPS" in header
    assert row.split()[:4] == ["cli-run", "active", "org/tiny-model", "sft"] and row.split()[4] == "100"
    # The relative data path was resolved against the spec's folder before publishing.
    assert coordinator.store.get_run("cli-run").spec["data"]["path"] == str(tmp_path / "train.jsonl")

    code, out, _ = run_cli_main(
        capsys, "publish", str(write_spec(tmp_path, run_id="cli-json")), *at, "--json"
    )
    assert code == 0 and json.loads(out)["run_id"] == "cli-json" and json.loads(out)["status"] == "active"

    code, out, _ = run_cli_main(capsys, "list", *at)
    assert code == 0 and [line.split()[0] for line in out.splitlines()[1:]] == ["cli-run", "cli-json"]
    code, out, _ = run_cli_main(capsys, "list", *at, "--json")
    assert code == 0 and [run["run_id"] for run in json.loads(out)] == ["cli-run", "cli-json"]

    code, out, _ = run_cli_main(capsys, "show", "cli-run", *at)
    assert code == 0 and "cli-run" in out.splitlines()[1]
    assert yaml.safe_load(out.split("\n\n", 1)[1]) == coordinator.store.get_run("cli-run").spec
    code, out, _ = run_cli_main(capsys, "show", "cli-run", *at, "--json")
    assert code == 0 and json.loads(out)["spec"] == coordinator.store.get_run("cli-run").spec

    code, out, _ = run_cli_main(capsys, "status", "cli-run", "paused", *at)
    assert code == 0 and out.splitlines()[1].split()[1] == "paused"
    assert coordinator.store.get_run("cli-run").status == "paused"
    code, out, _ = run_cli_main(capsys, "status", "cli-run", "finished", *at, "--json")
    assert code == 0 and json.loads(out)["status"] == "finished"


def test_cli_uses_the_coordinator_from_the_environment(coordinator, monkeypatch, capsys):
    coordinator.client.publish(json.dumps(valid_spec("env-run")))
    monkeypatch.setenv("POTLUCK_COORDINATOR", coordinator.address)
    code, out, _ = run_cli_main(capsys, "list", "--json")
    assert code == 0 and [run["run_id"] for run in json.loads(out)] == ["env-run"]


def test_cli_invalid_spec_names_the_field_before_contacting_the_server(tmp_path, capsys):
    spec_path = write_spec(tmp_path, batch={"per_peer_batch_size": 8, "target_batch_size": 2})
    # Nothing listens on port 1: a network error would show, had the CLI tried to connect.
    code, out, err = run_cli_main(capsys, "publish", str(spec_path), "--coordinator", "127.0.0.1:1")
    assert code == 1 and out == ""
    assert err.startswith("potluck run: invalid run spec") and "batch.target_batch_size" in err
    assert "Traceback" not in err


def test_cli_server_errors_are_one_line_and_exit_non_zero(coordinator, tmp_path, capsys):
    at = ("--coordinator", coordinator.address)
    spec_path = write_spec(tmp_path, run_id="dup")
    assert run_cli_main(capsys, "publish", str(spec_path), *at)[0] == 0

    code, out, err = run_cli_main(capsys, "publish", str(spec_path), *at)
    assert code == 1 and out == ""
    assert err.startswith("potluck run: ALREADY_EXISTS: run 'dup' already exists")
    assert "Traceback" not in err

    code, _, err = run_cli_main(capsys, "show", "missing", *at)
    assert code == 1 and err == "potluck run: NOT_FOUND: no run 'missing'\n"


def test_cli_without_a_coordinator_says_where_it_looked(capsys):
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code, _, err = run_cli_main(capsys, "list", "--coordinator", f"127.0.0.1:{port}", "--timeout", "5")
    assert code == 1
    assert err.startswith("potluck run: UNAVAILABLE:") and f"127.0.0.1:{port}" in err


def test_cli_usage_errors_exit_2(capsys):
    assert run_cli.main(["status", "run-a", "cancelled"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert run_cli.main([]) == 2


@pytest.mark.parametrize(
    "module", ["potluck.protocols.coordinator_client", "potluck.coordinator.grpc_service"]
)
def test_grpc_fork_handlers_are_off_wherever_potluck_imports_grpc(module):
    """Potluck processes fork (hivemind's DHT, averagers) after using gRPC; gRPC's fork handlers once
    hung a test process inside fork() for 17 minutes (runtime/grpc_fork.py)."""
    code = f"import os, {module}, grpc; print(os.environ.get('GRPC_ENABLE_FORK_SUPPORT'))"
    env = {k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "false", out.stderr[-2000:]
