"""The coordinator's web server: JSON API, metrics, static files, and the dashboard in a real browser."""

from __future__ import annotations

import gzip
import html
import json
import math
import re
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import quote

import prometheus_client
import pytest

from potluck.coordinator.store import HistoryPoint, PeerReportRow, RunStore
from potluck.coordinator.web import start_web_server, stop_web_server
from tests.browser import capture_page, find_chromium

ARTIFACTS = Path(__file__).parent / "artifacts"
HISTORY_POINTS = 7
# Ids come from the network: the page must show them as text, never run them as markup.
HOSTILE_RUN = 'team/<img src=x onerror="document.body.dataset.pwned=1">'
HOSTILE_PEER = '<img src=x onerror="document.body.dataset.pwned=1">'
ALPHA = "12D3KooWAlphaAlphaAlphaAlphaAlpha111"
RUN_BYTES = (3 * 2**30 + 2**29, 5 * 2**20)  # the latest point's averaging bytes: sent, received
"""Shown as "3.5 GiB" and "5.0 MiB"; the latest point's utilisation 0.8125 as "81.3 %"."""


@dataclass
class Dashboard:
    store: RunStore
    url: str
    t0: float


def _populate(store: RunStore) -> float:
    """Three runs: ``r1`` with history and peers, ``r2`` empty, and one with a hostile id."""
    now = time.time()
    t0 = now - 10 * HISTORY_POINTS
    store.publish_run(
        "r1", {"run_id": "r1", "model": {"name_or_path": "tiny"}, "stage": "sft", "max_global_steps": 10}
    )
    store.publish_run("r2", {"run_id": "r2", "model": {"name_or_path": "other"}, "stage": "sft"})
    store.publish_run(HOSTILE_RUN, {"run_id": HOSTILE_RUN, "model": {"name_or_path": HOSTILE_RUN}})
    for i in range(HISTORY_POINTS):
        point = HistoryPoint(
            collected_at=t0 + 10 * i,
            global_step=i,
            loss=3.0 - 0.3 * i,
            samples_per_second=40.0 + i,
            peers=1 + i % 3,
            # the first points come from an older coordinator: no accounting stored
            bytes_sent=None if i < 2 else RUN_BYTES[0] * i // (HISTORY_POINTS - 1),
            bytes_received=None if i < 2 else RUN_BYTES[1] * i // (HISTORY_POINTS - 1),
            compute_utilisation=None if i < 2 else 0.8125,
        )
        store.add_history_point("r1", point)

    def report(peer_id: str, age: float, step: int, loss: float | None, **accounting) -> PeerReportRow:
        return PeerReportRow("r1", peer_id, now - age, step, loss, 20.5, 100 * step, **accounting)

    store.add_peer_reports(
        [
            report(ALPHA, 40, 5, 1.5, bytes_sent=2**20, bytes_received=2**20, compute_utilisation=0.5),
            # its newest: the one shown
            report(ALPHA, 5, 6, 1.2, bytes_sent=1536 * 2**20, bytes_received=1000, compute_utilisation=0.25),
            report(HOSTILE_PEER, 30, 6, None),  # nothing averaged yet
            report("12D3KooWGoneGoneGoneGoneGoneGone999", 600, 2, 2.5),  # silent for 10 min: offline
        ]
    )
    return t0


@pytest.fixture
def dashboard(tmp_path) -> Iterator[Dashboard]:
    store = RunStore(tmp_path / "runs.sqlite")
    registry = prometheus_client.CollectorRegistry()
    prometheus_client.Counter(
        "potluck_test_requests", "A metric only this test registers.", registry=registry
    ).inc(3)
    t0 = _populate(store)
    server, port = start_web_server(store, registry, "127.0.0.1", 0)
    try:
        yield Dashboard(store, f"http://127.0.0.1:{port}", t0)
    finally:
        stop_web_server(server)


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def _get_json(url: str) -> tuple[int, object]:
    status, headers, body = _get(url)
    assert headers["Content-Type"] == "application/json"
    return status, json.loads(body)


# -- the store --------------------------------------------------------------------------------------------
def test_store_upgrades_a_database_from_before_the_accounting_columns(tmp_path) -> None:
    """A coordinator upgraded in place opens its old SQLite file: old rows stay, new ones carry bytes."""
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:  # the tables as the first release created them
        db.executescript(
            """
            CREATE TABLE runs (run_id TEXT PRIMARY KEY, spec_json TEXT NOT NULL, status TEXT NOT NULL,
                               created_at REAL NOT NULL, updated_at REAL NOT NULL);
            CREATE TABLE peer_reports (run_id TEXT NOT NULL, peer_id TEXT NOT NULL, reported_at REAL NOT NULL,
                global_step INTEGER NOT NULL, loss REAL, samples_per_second REAL NOT NULL,
                samples_total INTEGER NOT NULL, PRIMARY KEY (run_id, peer_id, reported_at));
            CREATE TABLE run_history (run_id TEXT NOT NULL, collected_at REAL NOT NULL,
                global_step INTEGER NOT NULL, loss REAL, samples_per_second REAL NOT NULL,
                peers INTEGER NOT NULL, PRIMARY KEY (run_id, collected_at));
            INSERT INTO runs VALUES ('old', '{"run_id": "old"}', 'active', 1.0, 1.0);
            INSERT INTO peer_reports VALUES ('old', 'p1', 100.0, 3, 2.5, 10.0, 300);
            INSERT INTO run_history VALUES ('old', 100.0, 3, 2.5, 10.0, 1);
            """
        )
    db.close()
    store = RunStore(path)
    assert [run.run_id for run in store.list_runs()] == ["old"]
    assert store.history("old") == [HistoryPoint(100.0, 3, 2.5, 10.0, 1, None, None, None)]
    assert store.latest_peer_reports("old", since=0) == [PeerReportRow("old", "p1", 100.0, 3, 2.5, 10.0, 300)]

    store.add_history_point("old", HistoryPoint(200.0, 4, 2.0, 11.0, 2, 4096, 2048, 0.9))
    store.add_peer_reports([PeerReportRow("old", "p1", 200.0, 4, 2.0, 11.0, 400, 4096, 2048, 0.9)])
    assert store.history("old")[-1] == HistoryPoint(200.0, 4, 2.0, 11.0, 2, 4096, 2048, 0.9)
    assert store.latest_peer_reports("old", since=0)[0].compute_utilisation == pytest.approx(0.9)
    assert RunStore(path).history("old")[-1].bytes_sent == 4096  # opening it again changes nothing


# -- HTTP API -------------------------------------------------------------------------------------------
def test_runs_list_has_specs_and_latest_point(dashboard: Dashboard) -> None:
    status, runs = _get_json(f"{dashboard.url}/api/runs")
    assert status == 200
    assert [run["run_id"] for run in runs] == ["r1", "r2", HOSTILE_RUN]
    r1, r2, _ = runs
    assert r1["status"] == "active"
    assert (r1["model"], r1["stage"], r1["max_global_steps"]) == ("tiny", "sft", 10)
    assert r1["created_at"] == pytest.approx(time.time(), abs=60)
    last = HISTORY_POINTS - 1
    assert r1["latest"] == {
        "t": pytest.approx(dashboard.t0 + 10 * last),
        "global_step": last,
        "loss": pytest.approx(3.0 - 0.3 * last),
        "samples_per_second": pytest.approx(40.0 + last),
        "peers": 1 + last % 3,
        "bytes_sent": RUN_BYTES[0],
        "bytes_received": RUN_BYTES[1],
        "compute_utilisation": pytest.approx(0.8125),
    }
    assert r2["latest"] is None
    assert r2["max_global_steps"] is None  # missing from its spec: shown as unknown, not an error


def test_run_detail_has_history_and_recent_peers(dashboard: Dashboard) -> None:
    status, detail = _get_json(f"{dashboard.url}/api/runs/r1")
    assert status == 200
    assert detail["run"]["run_id"] == "r1"
    assert [p["global_step"] for p in detail["history"]] == list(range(HISTORY_POINTS))
    assert set(detail["history"][0]) == {
        "t", "global_step", "loss", "samples_per_second", "peers",
        "bytes_sent", "bytes_received", "compute_utilisation",
    }  # fmt: skip
    assert detail["history"][0]["loss"] == pytest.approx(3.0)
    # points stored before the accounting existed say "unknown", not zero
    assert [p["bytes_sent"] for p in detail["history"][:3]] == [None, None, RUN_BYTES[0] * 2 // 6]
    assert [p["compute_utilisation"] for p in detail["history"][:3]] == [None, None, pytest.approx(0.8125)]
    assert detail["server_time"] == pytest.approx(time.time(), abs=60)
    # Each recently seen peer once, with its newest report; the peer silent for 10 minutes is left out.
    peers = {p["peer_id"]: p for p in detail["peers"]}
    assert set(peers) == {"12D3KooWAlphaAlphaAlphaAlphaAlpha111", HOSTILE_PEER}
    alpha = peers[ALPHA]
    assert (alpha["global_step"], alpha["loss"], alpha["samples_total"]) == (6, pytest.approx(1.2), 600)
    assert (alpha["bytes_sent"], alpha["bytes_received"]) == (1536 * 2**20, 1000)
    assert alpha["compute_utilisation"] == pytest.approx(0.25)
    hostile = peers[HOSTILE_PEER]
    assert hostile["loss"] is None
    assert (hostile["bytes_sent"], hostile["bytes_received"], hostile["compute_utilisation"]) == (None,) * 3


def test_run_id_is_url_decoded(dashboard: Dashboard) -> None:
    status, detail = _get_json(f"{dashboard.url}/api/runs/{quote(HOSTILE_RUN, safe='')}")
    assert status == 200
    assert detail["run"]["run_id"] == HOSTILE_RUN
    assert detail["history"] == [] and detail["peers"] == []


def test_non_finite_loss_is_json_null(dashboard: Dashboard) -> None:
    # A diverged run reports inf; bare JSON has no Infinity and the page's JSON.parse would reject it.
    dashboard.store.add_history_point("r2", HistoryPoint(time.time(), 1, math.inf, 1.0, 1, 0, 0, math.nan))
    status, headers, body = _get(f"{dashboard.url}/api/runs/r2")
    assert status == 200
    assert b"Infinity" not in body
    point = json.loads(body)["history"][0]
    assert point["loss"] is None and point["compute_utilisation"] is None


@pytest.mark.parametrize(
    "path",
    [
        "/api/runs/nope",
        "/api/runs/",
        "/nope",
        "/static/",
        "/static/missing.js",
        "/static/../store.py",
        "/static/%2e%2e/web.py",
    ],
)
def test_unknown_paths_are_404(dashboard: Dashboard, path: str) -> None:
    status, headers, body = _get(dashboard.url + path)
    assert status == 404
    assert "error" in json.loads(body)


def test_metrics_exposes_the_registry(dashboard: Dashboard) -> None:
    status, headers, body = _get(f"{dashboard.url}/metrics")
    assert status == 200
    assert headers["Content-Type"] == prometheus_client.CONTENT_TYPE_LATEST
    assert "potluck_test_requests_total 3.0" in body.decode()


def test_healthz(dashboard: Dashboard) -> None:
    assert _get(f"{dashboard.url}/healthz")[::2] == (200, b"ok")


def test_page_and_chart_library_are_served_locally(dashboard: Dashboard) -> None:
    status, headers, page = _get(f"{dashboard.url}/?run=r1")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    # Every script and stylesheet the page loads is one of ours: no CDN at run time.
    assets = re.findall(rb'(?:src|href)="([^"]+\.(?:js|css))"', page)
    assert set(assets) == {b"/static/plotly.min.js", b"/static/dashboard.js", b"/static/dashboard.css"}
    for asset in assets:
        assert _get(dashboard.url + asset.decode())[0] == 200

    library = (resources.files("plotly") / "package_data" / "plotly.min.js").read_bytes()
    status, headers, body = _get(f"{dashboard.url}/static/plotly.min.js")
    assert (status, headers["Content-Type"], body) == (200, "text/javascript; charset=utf-8", library)
    status, headers, body = _get(f"{dashboard.url}/static/plotly.min.js", {"Accept-Encoding": "gzip"})
    assert headers["Content-Encoding"] == "gzip"
    assert len(body) < len(library) / 2 and gzip.decompress(body) == library


# -- the page in a browser ------------------------------------------------------------------------------
needs_chromium = pytest.mark.skipif(
    find_chromium() is None, reason="chromium is not installed (apt-get install chromium; CI installs it)"
)


def body_attributes(dom: str) -> dict[str, str]:
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:2000]
    return {key: html.unescape(value) for key, value in re.findall(r'([\w-]+)="([^"]*)"', body.group(1))}


def _text_of(dom: str, element_id: str) -> str:
    found = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', dom)
    assert found, f"no element #{element_id} on the page"
    return html.unescape(found.group(1))


def peer_cells(dom: str, column: str) -> list[str]:
    """The texts of one column of the peers table, top to bottom."""
    return [html.unescape(text) for text in re.findall(rf'<td class="num {column}">([^<]*)</td>', dom)]


def _recorded_errors(dom: str) -> str:
    errors = re.search(r'<pre id="errors"[^>]*>(.*?)</pre>', dom, re.S)
    assert errors, "the page lost its <pre id=errors>"
    return html.unescape(errors.group(1))


@needs_chromium
@pytest.mark.timeout(240)
def test_dashboard_renders_in_browser(dashboard: Dashboard, tmp_path) -> None:
    screenshot = ARTIFACTS / "dashboard.png"
    screenshot.unlink(missing_ok=True)
    page = capture_page(f"{dashboard.url}/", tmp_path / "profile", screenshot=screenshot)
    print(f"dashboard screenshot: {screenshot}")  # the artifact a person looks at

    body = body_attributes(page.dom)
    assert _recorded_errors(page.dom) == ""
    assert "errors" not in body and "fetch-errors" not in body, body
    # Chromium logs every console level alike; the page logs nothing on purpose, so any line is a problem.
    assert page.console == []
    assert body.get("data-ready") == "1", page.dom[:3000]
    assert body["data-loss-points"] == str(HISTORY_POINTS)
    assert body["data-step-points"] == str(HISTORY_POINTS)
    assert body["data-peer-rows"] == "2"
    # the selected run's averaging accounting (latest point) and each peer's, in human units
    assert (body["data-bytes-sent"], body["data-bytes-received"]) == tuple(map(str, RUN_BYTES))
    assert float(body["data-utilisation"]) == pytest.approx(0.8125)
    assert _text_of(page.dom, "run-bytes-sent") == "3.5 GiB"
    assert _text_of(page.dom, "run-bytes-received") == "5.0 MiB"
    assert (_text_of(page.dom, "run-utilisation"), _text_of(page.dom, "run-waiting")) == ("81.3 %", "18.8 %")
    assert "3.5 GiB / 5.0 MiB" in page.dom and "81.3 %" in page.dom  # the runs table
    assert peer_cells(page.dom, "bytes-sent") == ["1.5 GiB", "–"]  # rows in peer-id order
    assert peer_cells(page.dom, "bytes-received") == ["1000 B", "–"]
    assert peer_cells(page.dom, "utilisation") == ["25.0 %", "–"]
    # Hostile ids are shown as text (escaped in the serialised DOM), and their markup never ran.
    assert "data-pwned" not in body
    assert html.escape(HOSTILE_PEER, quote=False) in page.dom
    assert html.escape(HOSTILE_RUN, quote=False) in page.dom
    assert screenshot.read_bytes().startswith(b"\x89PNG")


@needs_chromium
@pytest.mark.timeout(240)
def test_dashboard_selects_run_from_query(dashboard: Dashboard, tmp_path) -> None:
    url = f"{dashboard.url}/?run={quote(HOSTILE_RUN, safe='')}"
    page = capture_page(url, tmp_path / "profile", virtual_time_ms=6_000)
    body = body_attributes(page.dom)
    assert _recorded_errors(page.dom) == "" and page.console == []
    assert body.get("data-ready") == "1"
    assert body["data-loss-points"] == "0" and body["data-peer-rows"] == "0"
    title = re.search(r'<span id="run-title">(.*?)</span>', page.dom)
    assert title and html.unescape(title.group(1)) == HOSTILE_RUN
    assert "data-pwned" not in body
