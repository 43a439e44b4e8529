"""The coordinator's run registry and metric history: one embedded SQLite file.

Every write is one transaction: an error (duplicate run, unknown run) leaves the database untouched.
Several threads (gRPC workers, the collector, the web server) share one ``RunStore``; each call opens
its own short-lived connection, which SQLite serialises.

Schema changes are additive only: a column added after the first release is listed in ``_ADDED_COLUMNS``
and added to an older database file when the store opens it (rows written before read it as NULL), so
a coordinator upgraded in place keeps its runs and history.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

RUN_STATUSES = ("active", "paused", "finished")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id     TEXT PRIMARY KEY,
    spec_json  TEXT NOT NULL,
    status     TEXT NOT NULL CHECK (status IN ('active', 'paused', 'finished')),
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS peer_reports (
    run_id      TEXT NOT NULL REFERENCES runs(run_id),
    peer_id     TEXT NOT NULL,
    reported_at REAL NOT NULL,
    global_step INTEGER NOT NULL,
    loss        REAL,
    samples_per_second REAL NOT NULL,
    samples_total INTEGER NOT NULL,
    bytes_sent  INTEGER,
    bytes_received INTEGER,
    compute_utilisation REAL,
    PRIMARY KEY (run_id, peer_id, reported_at)
);
CREATE TABLE IF NOT EXISTS known_peers (
    peer_id        TEXT PRIMARY KEY,
    addresses_json TEXT NOT NULL,
    seen_at        REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS run_history (
    run_id      TEXT NOT NULL REFERENCES runs(run_id),
    collected_at REAL NOT NULL,
    global_step INTEGER NOT NULL,
    loss        REAL,
    samples_per_second REAL NOT NULL,
    peers       INTEGER NOT NULL,
    bytes_sent  INTEGER,
    bytes_received INTEGER,
    compute_utilisation REAL,
    PRIMARY KEY (run_id, collected_at)
);
"""
_ACCOUNTING = (("bytes_sent", "INTEGER"), ("bytes_received", "INTEGER"), ("compute_utilisation", "REAL"))
_ADDED_COLUMNS = {"peer_reports": _ACCOUNTING, "run_history": _ACCOUNTING}
"""Columns newer than a database file may be: ``table -> ((column, type), ...)``, nullable."""
_REPORT_COLUMNS = ", ".join(
    ("run_id", "peer_id", "reported_at", "global_step", "loss", "samples_per_second", "samples_total")
    + tuple(name for name, _ in _ACCOUNTING)
)
_HISTORY_COLUMNS = ", ".join(
    ("collected_at", "global_step", "loss", "samples_per_second", "peers")
    + tuple(name for name, _ in _ACCOUNTING)
)
_LATEST_REPORT_COLUMNS = _REPORT_COLUMNS.replace("reported_at", "MAX(reported_at)")
_REPORT_VALUES = ", ".join("?" * len(_REPORT_COLUMNS.split(",")))
_HISTORY_VALUES = ", ".join("?" * len(_HISTORY_COLUMNS.split(",")))


class RunExists(Exception):
    """A run with this id is already registered."""


class RunNotFound(Exception):
    """No run with this id."""


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    spec: dict
    status: str
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class PeerReportRow:
    run_id: str
    peer_id: str
    reported_at: float
    global_step: int
    loss: float | None
    samples_per_second: float
    samples_total: int
    bytes_sent: int | None = None
    """Payload bytes the peer sent in averaging rounds so far (``None``: stored by an older coordinator)."""
    bytes_received: int | None = None
    compute_utilisation: float | None = None
    """Time computing / wall time since the peer's first step (``None``: not reported yet)."""


@dataclass(frozen=True)
class HistoryPoint:
    """The swarm of one run at one collection: max global step, mean loss, summed throughput, peers online,
    averaging bytes summed over the online peers and their mean compute utilisation."""

    collected_at: float
    global_step: int
    loss: float | None
    samples_per_second: float
    peers: int
    bytes_sent: int | None = None
    bytes_received: int | None = None
    compute_utilisation: float | None = None


class RunStore:
    def __init__(self, path: Path | str):
        self.path = str(path)
        with self._connect() as db:
            db.executescript(_SCHEMA)
            for table, columns in _ADDED_COLUMNS.items():
                present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
                for name, sql_type in columns:
                    if name not in present:  # a file written by an older coordinator
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {sql_type}")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30)
        db.execute("PRAGMA foreign_keys = ON")
        try:
            with db:  # commits on success, rolls back on any exception
                yield db
        finally:
            db.close()

    # -- runs --------------------------------------------------------------------------------------
    def publish_run(self, run_id: str, spec: dict) -> RunRecord:
        now = time.time()
        try:
            with self._connect() as db:
                db.execute(
                    "INSERT INTO runs (run_id, spec_json, status, created_at, updated_at) VALUES (?, ?, 'active', ?, ?)",
                    (run_id, json.dumps(spec, sort_keys=True), now, now),
                )
        except sqlite3.IntegrityError:
            raise RunExists(run_id) from None
        return RunRecord(run_id, spec, "active", now, now)

    def get_run(self, run_id: str) -> RunRecord:
        with self._connect() as db:
            row = db.execute(
                "SELECT run_id, spec_json, status, created_at, updated_at FROM runs WHERE run_id = ?",
                (run_id,),
            ).fetchone()
        if row is None:
            raise RunNotFound(run_id)
        return RunRecord(row[0], json.loads(row[1]), row[2], row[3], row[4])

    def list_runs(self) -> list[RunRecord]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT run_id, spec_json, status, created_at, updated_at FROM runs ORDER BY created_at"
            ).fetchall()
        return [RunRecord(r[0], json.loads(r[1]), r[2], r[3], r[4]) for r in rows]

    def set_status(self, run_id: str, status: str) -> RunRecord:
        if status not in RUN_STATUSES:
            raise ValueError(f"status must be one of {RUN_STATUSES}, got {status!r}")
        with self._connect() as db:
            updated = db.execute(
                "UPDATE runs SET status = ?, updated_at = ? WHERE run_id = ?", (status, time.time(), run_id)
            ).rowcount
        if not updated:
            raise RunNotFound(run_id)
        return self.get_run(run_id)

    # -- metrics -----------------------------------------------------------------------------------
    def add_peer_reports(self, reports: list[PeerReportRow]) -> None:
        """Store reports; a report already stored (same run, peer and time) is skipped."""
        with self._connect() as db:
            db.executemany(
                f"INSERT OR IGNORE INTO peer_reports ({_REPORT_COLUMNS}) VALUES ({_REPORT_VALUES})",
                [dataclasses.astuple(r) for r in reports],
            )

    def add_history_point(self, run_id: str, point: HistoryPoint) -> None:
        with self._connect() as db:
            db.execute(
                f"INSERT OR REPLACE INTO run_history (run_id, {_HISTORY_COLUMNS}) "
                f"VALUES (?, {_HISTORY_VALUES})",
                (run_id, *dataclasses.astuple(point)),
            )

    def history(self, run_id: str, limit: int = 2000) -> list[HistoryPoint]:
        """The newest ``limit`` points of a run, oldest first."""
        with self._connect() as db:
            rows = db.execute(
                f"SELECT {_HISTORY_COLUMNS} FROM run_history "
                "WHERE run_id = ? ORDER BY collected_at DESC LIMIT ?",
                (run_id, limit),
            ).fetchall()
        return [HistoryPoint(*row) for row in reversed(rows)]

    def latest_peer_reports(self, run_id: str, since: float) -> list[PeerReportRow]:
        """Each peer's newest report after ``since`` (a timestamp)."""
        with self._connect() as db:
            # SQLite takes the other columns of a GROUP BY from the row that holds the MAX().
            rows = db.execute(
                f"SELECT {_LATEST_REPORT_COLUMNS} FROM peer_reports "
                "WHERE run_id = ? AND reported_at >= ? GROUP BY peer_id ORDER BY peer_id",
                (run_id, since),
            ).fetchall()
        return [PeerReportRow(*row) for row in rows]

    # -- where peers were (so a restarted coordinator can find the swarm again) ---------------------
    def remember_peer_addresses(self, peers: dict[str, list[str]], seen_at: float) -> None:
        with self._connect() as db:
            db.executemany(
                "INSERT OR REPLACE INTO known_peers VALUES (?, ?, ?)",
                [
                    (peer_id, json.dumps(addresses), seen_at)
                    for peer_id, addresses in peers.items()
                    if addresses
                ],
            )

    def recent_peer_addresses(self, max_age: float = 3600.0, limit: int = 16) -> list[str]:
        """Addresses of the peers seen most recently (within ``max_age`` seconds), newest first."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT addresses_json FROM known_peers WHERE seen_at >= ? ORDER BY seen_at DESC LIMIT ?",
                (time.time() - max_age, limit),
            ).fetchall()
        return [address for (addresses,) in rows for address in json.loads(addresses)]
