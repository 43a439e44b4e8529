"""A small typed client for the coordinator's gRPC API (``protocols/proto/potluck/v1/coordinator.proto``).

Peers call :meth:`CoordinatorClient.join`; operators reach the rest through ``potluck run ...``. Every
method returns plain dataclasses and raises :class:`CoordinatorError` (the gRPC status code's name and
the server's details) on failure, so callers never handle ``grpc.RpcError`` or protobuf messages.
A coordinator with TLS and an operator token needs a :class:`CoordinatorAccess` (``coordinator_access.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import grpc

from potluck.protocols.coordinator_access import CoordinatorAccess
from potluck.protocols.generated import coordinator_pb2 as pb
from potluck.protocols.generated import coordinator_pb2_grpc as pb_grpc

RUN_STATUSES = ("active", "paused", "finished")
_STATUS_TO_PROTO = {
    "active": pb.RUN_STATUS_ACTIVE,
    "paused": pb.RUN_STATUS_PAUSED,
    "finished": pb.RUN_STATUS_FINISHED,
}
_STATUS_FROM_PROTO = {value: name for name, value in _STATUS_TO_PROTO.items()}


def status_to_proto(status: str) -> int:
    """``'active'`` → ``RUN_STATUS_ACTIVE`` and so on; ``ValueError`` for anything else."""
    try:
        return _STATUS_TO_PROTO[status]
    except KeyError:
        raise ValueError(f"status must be one of {', '.join(RUN_STATUSES)}; got {status!r}") from None


def status_from_proto(status: int) -> str | None:
    """``RUN_STATUS_ACTIVE`` → ``'active'``; ``None`` for UNSPECIFIED or a value this version doesn't know."""
    return _STATUS_FROM_PROTO.get(status)


class CoordinatorError(Exception):
    """A failed call: ``code`` is the gRPC status code's name (``NOT_FOUND``), ``details`` the server's text."""

    def __init__(self, code: str, details: str):
        self.code = code
        self.details = details
        super().__init__(f"{code}: {details}")


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    spec: dict[str, Any]
    """The validated run spec as JSON data; ``potluck.protocols.runspec.parse_run_spec`` turns it into a ``RunSpec``."""
    status: str
    """``'active'``, ``'paused'`` or ``'finished'``."""
    created_at: float
    updated_at: float

    @classmethod
    def from_proto(cls, run: pb.Run) -> RunInfo:
        status = status_from_proto(run.status)
        if status is None:
            raise CoordinatorError(
                "INTERNAL", f"the coordinator sent an unknown status {run.status} for {run.run_id!r}"
            )
        return cls(run.run_id, json.loads(run.spec_json), status, run.created_at, run.updated_at)


@dataclass(frozen=True)
class JoinInfo:
    run: RunInfo
    initial_peers: list[str]
    """DHT multiaddrs to bootstrap from (hivemind's ``initial_peers``)."""
    coordinator_public_key: bytes
    """The key that signs the coordinator's run announcements in the DHT (opaque bytes)."""


class CoordinatorClient:
    """One channel to a coordinator at ``address`` (``HOST:PORT``).

    ``timeout`` (seconds) bounds each call; raise it if calls over a slow link fail with
    ``DEADLINE_EXCEEDED``. A coordinator that is down fails fast with ``UNAVAILABLE`` (no waiting for it
    to come up): retry in the caller if a peer may start before its coordinator.

    ``access`` says which certificate to trust (TLS) and the operator token; :meth:`publish` and
    :meth:`set_status` send the token, the read calls never do. Without a token, a coordinator that
    asks for one answers those two with ``UNAUTHENTICATED``.
    """

    # ListRuns carries every spec; gRPC's default 4 MiB receive limit would cap a registry at a few
    # thousand runs. TODO: paginate ListRuns instead once registries grow that large.
    _MAX_RECEIVE_BYTES = 64 << 20

    def __init__(self, address: str, timeout: float = 10, access: CoordinatorAccess | None = None):
        self.address = address
        self.timeout = timeout
        access = access or CoordinatorAccess()
        options = [("grpc.max_receive_message_length", self._MAX_RECEIVE_BYTES)]
        if access.tls_ca is None:
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            credentials = grpc.ssl_channel_credentials(root_certificates=access.tls_ca)
            self._channel = grpc.secure_channel(address, credentials, options=options)
        self._operator_metadata = (
            (("authorization", f"Bearer {access.operator_token}"),) if access.operator_token else ()
        )
        self._stub = pb_grpc.CoordinatorStub(self._channel)

    def _call(self, method: Any, request: Any, operator: bool = False) -> Any:
        try:
            return method(request, timeout=self.timeout, metadata=self._operator_metadata if operator else ())
        except grpc.RpcError as e:
            raise CoordinatorError(e.code().name, e.details() or "") from None

    def publish(self, spec_text: str) -> RunInfo:
        """Register a run from its spec (YAML or JSON text); it starts ``active``."""
        return RunInfo.from_proto(
            self._call(self._stub.PublishRun, pb.PublishRunRequest(spec=spec_text), operator=True)
        )

    def list_runs(self) -> list[RunInfo]:
        """Every run, oldest first."""
        response = self._call(self._stub.ListRuns, pb.ListRunsRequest())
        return [RunInfo.from_proto(run) for run in response.runs]

    def get_run(self, run_id: str) -> RunInfo:
        return RunInfo.from_proto(self._call(self._stub.GetRun, pb.GetRunRequest(run_id=run_id)))

    def join(self, run_id: str | None = None) -> JoinInfo:
        """What a peer needs to join ``run_id`` (``None``: the newest active run).

        The run comes back whatever its status; check ``info.run.status == 'active'`` before training.
        """
        response = self._call(self._stub.Join, pb.JoinRequest(run_id=run_id or ""))
        return JoinInfo(
            run=RunInfo.from_proto(response.run),
            initial_peers=list(response.initial_peers),
            coordinator_public_key=bytes(response.coordinator_public_key),
        )

    def set_status(self, run_id: str, status: str) -> RunInfo:
        """Set a run's status to ``'active'``, ``'paused'`` or ``'finished'`` (``ValueError`` otherwise)."""
        request = pb.UpdateRunStatusRequest(run_id=run_id, status=status_to_proto(status))
        return RunInfo.from_proto(self._call(self._stub.UpdateRunStatus, request, operator=True))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CoordinatorClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
