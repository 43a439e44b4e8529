"""The operator credential: calls that change the registry need ``authorization: Bearer <token>``.

:class:`OperatorGate` holds the token and judges an ``authorization`` value, for gRPC metadata and for
the dashboard's HTTP header alike; :class:`OperatorInterceptor` applies it to every gRPC method that is
not in :data:`OPEN_METHODS`, so a method added to the API later is closed until someone opens it here.

A refusal is ``UNAUTHENTICATED`` (no token) or ``PERMISSION_DENIED`` (a wrong one), raised before the
handler runs (nothing is parsed or stored), counted in ``potluck_coordinator_refused_calls_total`` and
logged once per caller address. Tokens are compared with :func:`hmac.compare_digest`.
:func:`create_operator_token` writes a fresh one (``run-coordinator --tls-self-signed`` uses it).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import os
import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter

from potluck.protocols.generated import coordinator_pb2 as pb

logger = logging.getLogger(__name__)

OPEN_METHODS = frozenset(
    {
        "/potluck.v1.Coordinator/ListRuns",
        "/potluck.v1.Coordinator/GetRun",
        "/potluck.v1.Coordinator/Join",
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    }
)
"""Read-only methods anyone who reaches the port may call: peers join with them, probes and generic
clients (``grpcurl``) use them. Everything else needs the operator token."""

_KNOWN_METHODS = frozenset(
    f"/{s.full_name}/{m.name}" for s in pb.DESCRIPTOR.services_by_name.values() for m in s.methods
)
MISSING, WRONG = "missing_token", "wrong_token"
_MAX_LOGGED_ADDRESSES = 1024  # a scan from many addresses must not grow the set without bound


class OperatorGate:
    """Judges credentials against ``token``, counts refusals in ``registry`` and logs each caller once."""

    def __init__(self, token: str, registry: CollectorRegistry):
        self._token = token.encode()
        self.refused = Counter(
            "potluck_coordinator_refused_calls",
            "Calls refused for a missing or wrong operator token, by method (gRPC path, or 'http')",
            ["method", "reason"],
            registry=registry,
        )
        self._logged: set[str] = set()
        self._lock = threading.Lock()

    def judge(self, authorization: str | None) -> str | None:
        """``None`` if ``authorization`` carries the token (``Bearer <token>``, or HTTP ``Basic`` with the
        token as password so a browser can log in); else the reason: :data:`MISSING` or :data:`WRONG`."""
        offered = _offered_token(authorization)
        if offered is None:
            return MISSING
        return None if hmac.compare_digest(offered, self._token) else WRONG

    def refuse(self, method: str, reason: str, caller: str) -> str:
        """Count and log a refusal; return the one-line message to send back."""
        method = method[:200]  # the caller chose it, and it goes back in a response header
        # a label per made-up method path would let anyone grow the metrics without bound
        label = method if method in _KNOWN_METHODS or method == "http" else "other"
        self.refused.labels(method=label, reason=reason).inc()
        host = caller.rsplit(":", 1)[0]  # gRPC's "ipv4:10.0.0.7:53124": a new port per connection
        with self._lock:
            first = host not in self._logged and len(self._logged) < _MAX_LOGGED_ADDRESSES
            if first:
                self._logged.add(host)
        if first:
            logger.warning("refused %s from %s: %s (further refusals from it are only counted)",
                           method, host, reason.replace("_", " "))  # fmt: skip
        if reason == MISSING:
            return f"{method} needs the operator token (authorization: Bearer <token>; --operator-token-file)"
        return f"{method}: the operator token is wrong"


def _offered_token(authorization: str | None) -> bytes | None:
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip().encode()
    if scheme.lower() == "basic" and value.strip():
        try:
            _, colon, password = base64.b64decode(value.strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return None
        return password if colon and password else None
    return None


class OperatorInterceptor(grpc.ServerInterceptor):
    """Refuses every method outside :data:`OPEN_METHODS` unless its metadata carries the token."""

    def __init__(self, gate: OperatorGate):
        self.gate = gate

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        method = details.method
        if method in OPEN_METHODS:
            return continuation(details)
        authorization = next((v for k, v in details.invocation_metadata or () if k == "authorization"), None)
        reason = self.gate.judge(authorization if isinstance(authorization, str) else None)
        if reason is None:
            return continuation(details)
        code = grpc.StatusCode.UNAUTHENTICATED if reason == MISSING else grpc.StatusCode.PERMISSION_DENIED

        def refuse(request: Any, context: grpc.ServicerContext) -> None:
            # the caller's address is known only here, inside a call; the request bytes are never parsed
            context.abort(code, self.gate.refuse(method, reason, context.peer()))

        # every method of this API is unary-unary; a refused one needs no deserializer
        return grpc.unary_unary_rpc_method_handler(refuse)


def create_operator_token(path: Path) -> str:
    """Write a random token to ``path``, readable by its owner only, unless the file exists; return it."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip()
