"""The coordinator's web face: Prometheus metrics, a JSON API over the ``RunStore`` and a dashboard page.

A stdlib ``ThreadingHTTPServer`` in a daemon thread is enough: the audience is a few people and one
Prometheus scraper, every request is a short SQLite read, and no web framework has to be installed.

Routes (all ``GET``)::

    /                     the dashboard page (``static/index.html``)
    /static/<file>        the page's own files, and ``plotly.min.js`` from the installed ``plotly`` package
    /metrics              Prometheus exposition of the registry passed in
    /api/runs             every run with its latest history point
    /api/runs/<run_id>    one run, its history and the peers that reported in the last ``PEER_WINDOW_S``

A history point and a peer row carry the averaging accounting the peers report: ``bytes_sent`` /
``bytes_received`` (payload bytes in averaging rounds so far; a history point sums the online peers)
and ``compute_utilisation`` (time computing / wall time; a history point averages the peers that
report it). Each is ``null`` where unknown (points stored by an older coordinator, a peer that has not
stepped yet).
    /healthz              ``ok`` (always open: container health checks call it)

With an ``OperatorGate`` (``run-coordinator --http-auth``) every route but ``/healthz`` needs the
operator token: ``Authorization: Bearer <token>`` (Prometheus' ``authorization.credentials_file``) or
HTTP Basic with any user name and the token as password (a browser asks for it after the 401).

The chart library is served from the Python package rather than a CDN so that the dashboard works on a
coordinator with no internet access (and so that its version is pinned with the other dependencies).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import logging
import math
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import unquote, urlsplit

import prometheus_client

from potluck.coordinator.auth import OperatorGate
from potluck.coordinator.store import HistoryPoint, RunNotFound, RunRecord, RunStore

log = logging.getLogger(__name__)

PEER_WINDOW_S = 120.0
"""A peer counts as online on the dashboard if it reported within this many seconds. Raise it if peers
that report rarely (large ``report_interval``) flicker in and out of the peers table."""

_STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
_CHART_LIBRARY = "plotly.min.js"
# Only text compresses well enough to be worth it; plotly.min.js shrinks from ~4.8 MB to ~1.4 MB.
_COMPRESSIBLE = ("text/", "image/svg")


class DashboardServer(ThreadingHTTPServer):
    """The HTTP server; handlers reach the store and registry through ``self.server``."""

    # Request threads must not keep the coordinator alive at exit, nor block shutdown on a slow client.
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        store: RunStore,
        registry: prometheus_client.CollectorRegistry,
        operator_gate: OperatorGate | None = None,
    ):
        self.store = store
        self.registry = registry
        self.operator_gate = operator_gate
        super().__init__(address, _DashboardHandler)


def start_web_server(
    store: RunStore,
    registry: prometheus_client.CollectorRegistry,
    host: str,
    port: int,
    operator_gate: OperatorGate | None = None,
) -> tuple[DashboardServer, int]:
    """Serve the dashboard, API and metrics on ``host:port`` from a daemon thread.

    ``port=0`` binds a free port; the port actually bound is returned. Stop with ``stop_web_server``.
    ``operator_gate``: every route but ``/healthz`` needs its token.
    """
    server = DashboardServer((host, port), store, registry, operator_gate)
    thread = threading.Thread(target=server.serve_forever, name=f"web:{server.server_port}", daemon=True)
    thread.start()
    log.info("dashboard on http://%s:%d/", host, server.server_port)
    return server, server.server_port


def stop_web_server(server: DashboardServer) -> None:
    """Stop serving and release the socket; requests in flight finish on their own daemon threads."""
    server.shutdown()
    server.server_close()


# -- JSON views of the store ----------------------------------------------------------------------------
def _finite(value: float | None) -> float | None:
    # JSON has no NaN/Infinity (browsers' JSON.parse rejects them); a diverged loss is shown as a gap.
    if value is None or not math.isfinite(value):
        return None
    return value


def _run_summary(store: RunStore, run: RunRecord) -> dict:
    model = run.spec.get("model")
    latest = store.history(run.run_id, limit=1)
    return {
        "run_id": run.run_id,
        "status": run.status,
        "model": model.get("name_or_path") if isinstance(model, dict) else None,
        "stage": run.spec.get("stage"),
        "max_global_steps": run.spec.get("max_global_steps"),
        "created_at": run.created_at,
        "updated_at": run.updated_at,
        "latest": _history_point(latest[-1]) if latest else None,
    }


def _history_point(point: HistoryPoint) -> dict:
    return {
        "t": point.collected_at,
        "global_step": point.global_step,
        "loss": _finite(point.loss),
        "samples_per_second": _finite(point.samples_per_second),
        "peers": point.peers,
        "bytes_sent": point.bytes_sent,
        "bytes_received": point.bytes_received,
        "compute_utilisation": _finite(point.compute_utilisation),
    }


def runs_view(store: RunStore) -> list[dict]:
    """``GET /api/runs``: every run, oldest first, with its latest history point (or ``None``)."""
    return [_run_summary(store, run) for run in store.list_runs()]


def run_view(store: RunStore, run_id: str, now: float | None = None) -> dict:
    """``GET /api/runs/<run_id>``; raises ``RunNotFound``.

    ``server_time`` lets the page compute report ages without trusting the viewer's clock.
    """
    now = time.time() if now is None else now
    run = store.get_run(run_id)
    peers = []
    for report in store.latest_peer_reports(run_id, since=now - PEER_WINDOW_S):
        row = dataclasses.asdict(report)
        row["loss"] = _finite(report.loss)
        row["samples_per_second"] = _finite(report.samples_per_second)
        row["compute_utilisation"] = _finite(report.compute_utilisation)
        peers.append(row)
    return {
        "run": _run_summary(store, run),
        "history": [_history_point(point) for point in store.history(run_id)],
        "peers": peers,
        "server_time": now,
    }


# -- static files ---------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def _static_file(name: str) -> tuple[bytes, str] | None:
    """The bytes and content type of a servable file, or ``None``. Cached: the files never change at run time."""
    if name == _CHART_LIBRARY:
        resource = resources.files("plotly") / "package_data" / _CHART_LIBRARY
    else:
        # Only plain names in our own static folder: no sub-folders, so ``..`` cannot escape it.
        if "/" in name or "\\" in name or name.startswith("."):
            return None
        resource = resources.files(__package__) / "static" / name
    suffix = "." + name.rsplit(".", 1)[-1] if "." in name else ""
    if suffix not in _STATIC_TYPES or not resource.is_file():
        return None
    return resource.read_bytes(), _STATIC_TYPES[suffix]


@functools.lru_cache(maxsize=32)
def _gzipped_static_file(name: str) -> bytes:
    found = _static_file(name)
    assert found is not None
    return gzip.compress(found[0], compresslevel=6)


class _DashboardHandler(BaseHTTPRequestHandler):
    server: DashboardServer
    protocol_version = "HTTP/1.1"  # keep-alive: the page polls the API every few seconds

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        try:
            if path != "/healthz" and not self._authorized():
                return
            if path in ("/", "/index.html"):
                self._send_static("index.html", cache=False)
            elif path.startswith("/static/"):
                self._send_static(path.removeprefix("/static/"), cache=True)
            elif path == "/metrics":
                body = prometheus_client.generate_latest(self.server.registry)
                self._send(HTTPStatus.OK, body, prometheus_client.CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._send(HTTPStatus.OK, b"ok", "text/plain; charset=utf-8")
            elif path == "/api/runs":
                self._send_json(HTTPStatus.OK, runs_view(self.server.store))
            elif path.startswith("/api/runs/"):
                run_id = unquote(path.removeprefix("/api/runs/"))
                try:
                    self._send_json(HTTPStatus.OK, run_view(self.server.store, run_id))
                except RunNotFound:
                    self._send_json(HTTPStatus.NOT_FOUND, {"error": "unknown run", "run_id": run_id})
            else:
                self._send_json(HTTPStatus.NOT_FOUND, {"error": "not found", "path": path})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the viewer closed the tab mid-response; nothing to tell anyone
        except Exception:
            # One bad request must not take the page down for everyone: log it and answer 500.
            log.exception("dashboard request %s failed", self.path)
            self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"})

    def _authorized(self) -> bool:
        """True if no token is asked for or the request carries it; else answer 401 and return False."""
        gate = self.server.operator_gate
        if gate is None:
            return True
        reason = gate.judge(self.headers.get("Authorization"))
        if reason is None:
            return True
        message = gate.refuse("http", reason, "{}:{}".format(*self.client_address[:2]))
        body = json.dumps({"error": message}).encode()
        challenge = {"WWW-Authenticate": 'Basic realm="potluck coordinator", charset="UTF-8"'}
        self._send(HTTPStatus.UNAUTHORIZED, body, "application/json", challenge)
        return False

    def _send_static(self, name: str, cache: bool) -> None:
        found = _static_file(name)
        if found is None:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": "not found", "path": self.path})
            return
        body, content_type = found
        headers = {"Cache-Control": "max-age=3600" if cache else "no-cache"}
        if content_type.startswith(_COMPRESSIBLE) and "gzip" in self.headers.get("Accept-Encoding", ""):
            body = _gzipped_static_file(name)
            headers["Content-Encoding"] = "gzip"
        self._send(HTTPStatus.OK, body, content_type, headers)

    def _send_json(self, status: HTTPStatus, payload: object) -> None:
        body = json.dumps(payload, allow_nan=False).encode()
        self._send(status, body, "application/json", {"Cache-Control": "no-store"})

    def _send(
        self, status: HTTPStatus, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the stdlib's signature
        # The stdlib writes every request to stderr; a page polling every few seconds would flood it.
        log.debug("%s " + format, self.address_string(), *args)
