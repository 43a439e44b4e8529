"""The checked-in gRPC stubs are exactly what ``python -m potluck.protocols.generate`` writes today."""

from __future__ import annotations

import importlib

import pytest

from potluck.protocols import generate

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def _stub_files(folder) -> dict[str, str]:
    return {path.name: path.read_text() for path in sorted(folder.iterdir()) if path.is_file()}


def test_checked_in_stubs_match_the_proto(tmp_path):
    generate.generate(tmp_path)
    fresh = _stub_files(tmp_path)
    checked_in = _stub_files(generate.GENERATED_DIR)
    assert set(fresh) == {
        "__init__.py",
        "coordinator_pb2.py",
        "coordinator_pb2.pyi",
        "coordinator_pb2_grpc.py",
    }
    assert sorted(checked_in) == sorted(fresh), (
        "stale or missing stubs: run python -m potluck.protocols.generate"
    )
    for name, text in fresh.items():
        assert checked_in[name] == text, f"{name} is stale: run python -m potluck.protocols.generate"


def test_stubs_import_from_the_potluck_namespace():
    pb = importlib.import_module("potluck.protocols.generated.coordinator_pb2")
    pb_grpc = importlib.import_module("potluck.protocols.generated.coordinator_pb2_grpc")
    assert pb.Run.__module__ == "potluck.protocols.generated.coordinator_pb2"
    # The rewritten import: the grpc module must use the same message classes, not a second copy.
    assert pb_grpc.potluck_dot_v1_dot_coordinator__pb2 is pb
    service = pb.DESCRIPTOR.services_by_name["Coordinator"]
    assert service.full_name == "potluck.v1.Coordinator"
    assert {m.name for m in service.methods} == {
        "PublishRun",
        "ListRuns",
        "GetRun",
        "Join",
        "UpdateRunStatus",
    }
