"""The coordinator's gRPC API: publish and list runs, hand peers what they need to join.

:class:`CoordinatorService` implements ``potluck.v1.Coordinator`` over a :class:`RunStore`;
:func:`start_grpc_server` serves it with gRPC health checking and server reflection (so ``grpcurl``
and ``grpc_health_probe`` work against it without the ``.proto``).

Every error is a gRPC status code with a details string meant for the operator, and is raised before
anything is written: a failed call leaves the database as it was.

With a key pair it serves TLS only (a plaintext client is refused), and with an :class:`OperatorGate`
(``coordinator/auth.py``) every call that changes the registry needs the operator token; reads stay
open. Without them the server is plaintext and open: anyone who reaches the port can publish runs and
change their status (``run-coordinator`` warns when that port is not on loopback).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from concurrent import futures
from typing import Any, NoReturn

import grpc
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from potluck.coordinator.auth import OperatorGate, OperatorInterceptor
from potluck.coordinator.store import RunExists, RunNotFound, RunRecord, RunStore
from potluck.protocols.coordinator_client import status_from_proto, status_to_proto
from potluck.protocols.generated import coordinator_pb2 as pb
from potluck.protocols.generated import coordinator_pb2_grpc as pb_grpc
from potluck.protocols.runspec import RunSpecError, parse_run_spec

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name  # "potluck.v1.Coordinator"

# gRPC sends details in a response header, and clients refuse large headers (they would see an
# opaque RESOURCE_EXHAUSTED instead of our message). A spec with thousands of bad fields, or a
# megabyte-long run id echoed back, must still produce a readable answer, so details are cut short.
_MAX_DETAILS_CHARS = 4000
_MAX_PROBLEMS = 50


def _spec_problems_text(error: RunSpecError) -> str:
    problems = error.problems
    if len(problems) > _MAX_PROBLEMS:
        problems = [*problems[:_MAX_PROBLEMS], f"... and {len(error.problems) - _MAX_PROBLEMS} more problems"]
    return str(RunSpecError(error.source, problems))  # _abort cuts it if the problems are long


def _non_finite_fields(value: Any, path: str = "") -> list[str]:
    """Dotted paths of inf/nan floats: pydantic accepts ``inf`` where a bound is only ``gt=0``, but JSON
    cannot carry it (pydantic writes ``null``), so such a spec would be stored unreadable for peers."""
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{path or '<root>'}: must be a finite number (got {value})"]
    if isinstance(value, dict):
        return [
            p
            for key, item in value.items()
            for p in _non_finite_fields(item, f"{path}.{key}" if path else str(key))
        ]
    if isinstance(value, list | tuple):
        return [p for i, item in enumerate(value) for p in _non_finite_fields(item, f"{path}.{i}")]
    return []


class CoordinatorService(pb_grpc.CoordinatorServicer):
    """``potluck.v1.Coordinator`` over a :class:`RunStore`.

    ``bootstrap_peers`` returns the coordinator DHT node's multiaddrs; it is called on every ``Join`` so
    peers always get current addresses. ``public_key`` is handed to joining peers as-is.
    ``on_run_changed`` is called with the stored record after every successful publish or status
    change (the DHT announcer re-announces the run); it runs on a gRPC worker thread, so it must be
    thread-safe and quick — a slow hook holds a worker and delays other calls.
    """

    def __init__(
        self,
        store: RunStore,
        bootstrap_peers: Callable[[], list[str]],
        public_key: bytes,
        on_run_changed: Callable[[RunRecord], None] | None = None,
    ):
        self.store = store
        self.bootstrap_peers = bootstrap_peers
        self.public_key = public_key
        self.on_run_changed = on_run_changed

    # -- operations ------------------------------------------------------------------------------
    def PublishRun(self, request: pb.PublishRunRequest, context: grpc.ServicerContext) -> pb.Run:
        source = "PublishRun.spec"
        try:
            raw = yaml.safe_load(request.spec)
        except Exception as e:
            # Not only YAMLError: PyYAML raises ValueError on impossible dates ("2001-13-45") and
            # RecursionError on deeply nested input. Any failure to parse is the caller's bad input.
            _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"invalid run spec {source}: not valid YAML or JSON: {e}",
            )
        try:
            spec = parse_run_spec(raw, source)
        except RunSpecError as e:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, _spec_problems_text(e))
        non_finite = _non_finite_fields(spec.model_dump())
        if non_finite:
            _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                _spec_problems_text(RunSpecError(source, non_finite)),
            )
        try:
            record = self.store.publish_run(spec.run_id, spec.model_dump(mode="json"))
        except RunExists:
            _abort(
                context,
                grpc.StatusCode.ALREADY_EXISTS,
                f"run {spec.run_id!r} already exists; pick another run_id",
            )
        logger.info("published run %s", record.run_id)
        self._notify(record)
        return _run_to_proto(record)

    def ListRuns(self, request: pb.ListRunsRequest, context: grpc.ServicerContext) -> pb.ListRunsResponse:
        return pb.ListRunsResponse(runs=[_run_to_proto(record) for record in self.store.list_runs()])

    def GetRun(self, request: pb.GetRunRequest, context: grpc.ServicerContext) -> pb.Run:
        return _run_to_proto(self._get(request.run_id, context))

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinResponse:
        if request.run_id:
            record = self._get(request.run_id, context)
        else:
            active = [record for record in self.store.list_runs() if record.status == "active"]
            if not active:
                _abort(context, grpc.StatusCode.NOT_FOUND, "no active run to join; name one with its run id")
            record = active[-1]  # list_runs is oldest first
        initial_peers = list(self.bootstrap_peers())
        if not initial_peers:
            # A peer given no bootstrap address would start a swarm of its own and train alone.
            _abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                "the coordinator's DHT node has no address yet; retry shortly",
            )
        return pb.JoinResponse(
            run=_run_to_proto(record), initial_peers=initial_peers, coordinator_public_key=self.public_key
        )

    def UpdateRunStatus(self, request: pb.UpdateRunStatusRequest, context: grpc.ServicerContext) -> pb.Run:
        status = status_from_proto(request.status)
        if status is None:
            _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"status must be RUN_STATUS_ACTIVE, RUN_STATUS_PAUSED or RUN_STATUS_FINISHED; got {request.status}",
            )
        try:
            record = self.store.set_status(request.run_id, status)
        except RunNotFound:
            _abort(context, grpc.StatusCode.NOT_FOUND, f"no run {request.run_id!r}")
        logger.info("run %s is now %s", record.run_id, record.status)
        self._notify(record)
        return _run_to_proto(record)

    # -- helpers ---------------------------------------------------------------------------------
    def _get(self, run_id: str, context: grpc.ServicerContext) -> RunRecord:
        try:
            return self.store.get_run(run_id)
        except RunNotFound:
            _abort(context, grpc.StatusCode.NOT_FOUND, f"no run {run_id!r}")

    def _notify(self, record: RunRecord) -> None:
        if self.on_run_changed is None:
            return
        try:
            self.on_run_changed(record)
        except Exception:
            # The change is committed; failing the call would tell the operator it did not happen.
            # The announcer re-announces periodically, so a missed notification is only a delay.
            logger.exception("on_run_changed failed for run %s", record.run_id)


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> NoReturn:
    if len(details) > _MAX_DETAILS_CHARS:  # e.g. a megabyte-long run id echoed back
        details = details[: _MAX_DETAILS_CHARS - 16] + " ... (truncated)"
    context.abort(code, details)
    raise AssertionError("unreachable: context.abort raises")  # for type checkers


def _run_to_proto(record: RunRecord) -> pb.Run:
    return pb.Run(
        run_id=record.run_id,
        spec_json=json.dumps(record.spec, sort_keys=True),
        status=status_to_proto(record.status),
        created_at=record.created_at,
        updated_at=record.updated_at,
    )


def start_grpc_server(
    service: CoordinatorService,
    host: str,
    port: int,
    max_message_bytes: int = 1 << 20,
    max_workers: int = 8,
    tls_key_pair: tuple[bytes, bytes] | None = None,
    operator_gate: OperatorGate | None = None,
) -> tuple[grpc.Server, int]:
    """Serve ``service`` (plus health checking and reflection) on ``host:port``; return the started server
    and its bound port (pass ``port=0`` to pick a free one). Stop it with ``server.stop(grace)``.

    ``max_message_bytes`` caps each request: larger ones fail with ``RESOURCE_EXHAUSTED`` before any
    handler runs. Raise it only if real specs hit it — it bounds the memory one call can make the
    server spend parsing YAML. ``max_workers`` is how many calls run at once; more wait in gRPC's queue.
    Raise it if ``Join`` latency grows while many peers start together.

    ``tls_key_pair`` (certificate PEM, private key PEM): serve TLS only. ``operator_gate``: calls outside
    ``auth.OPEN_METHODS`` need its token.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="coordinator-grpc"),
        interceptors=[OperatorInterceptor(operator_gate)] if operator_gate is not None else [],
        options=[("grpc.max_receive_message_length", max_message_bytes)],
    )
    pb_grpc.add_CoordinatorServicer_to_server(service, server)

    health_servicer = health.HealthServicer()
    for name in ("", SERVICE_NAME):  # "" is the server's overall health
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)

    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )

    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 literal
    if tls_key_pair is None:
        bound_port = server.add_insecure_port(f"{host}:{port}")
    else:  # grpc wants (private key, certificate chain)
        bound_port = server.add_secure_port(
            f"{host}:{port}", grpc.ssl_server_credentials([tls_key_pair[::-1]])
        )
    if bound_port == 0:  # older grpcio reports a failed bind this way instead of raising
        raise RuntimeError(f"cannot listen on {host}:{port}")
    server.start()
    logger.info(
        "coordinator gRPC API listening on %s:%d (%s)",
        host,
        bound_port,
        "TLS" if tls_key_pair else "plaintext",
    )
    return server, bound_port
