"""A real Prometheus scrapes a real swarm that ``potluck swarm up`` started (coordinator + 2 peers).

One swarm and one Prometheus serve the whole module: the project's scrape config rendered for the local
processes (1 s scrapes and rule evaluations), every target up, every query of the Grafana dashboard
answered with data, every alert rule evaluated without error and quiet while the swarm is healthy,
promtool's lint on the live /metrics, the image's healthcheck against the live endpoints, and finally
Ctrl-C stopping everything that ``swarm up`` started.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import yaml

from potluck.tools.coordinator_process import free_port
from potluck.tools.demo import DEMO_SPEC
from potluck.tools.swarm import COORDINATOR_JOB, PEERS_JOB, render_prometheus_config
from tests.conftest import _STARTED_GROUPS
from tests.helpers import wait_until
from tests.test_operations import (
    DEPLOY,
    alert_rules,
    cli,
    dashboard_queries,
    dashboards,
    healthcheck_command,
    promtool,
)

pytestmark = pytest.mark.slow
RUN_ID = DEMO_SPEC["run_id"]
GRAFANA_VARIABLES = {"$run_id": RUN_ID, "$__rate_interval": "20s", "$__interval": "5s", "$__range": "5m"}
"""Concrete values for the dashboard's variables: 20 s windows hold ~20 samples at 1 s scrapes."""


@dataclass
class Swarm:
    process: subprocess.Popen
    log_path: Path
    workdir: Path
    coordinator: str = ""
    """``127.0.0.1:PORT`` of the coordinator's dashboard and /metrics."""
    peers: list[str] = field(default_factory=list)
    """``127.0.0.1:PORT`` of each peer's /metrics."""
    started: list[psutil.Process] = field(default_factory=list)
    """The coordinator and peer processes that ``swarm up`` started."""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def swarm(tmp_path_factory) -> Iterator[Swarm]:
    workdir = tmp_path_factory.mktemp("ops") / "swarm"
    log_path = workdir.parent / "swarm-up.log"
    # peers train until the last test stops them (Ctrl-C), not until a last global step
    args = ["swarm", "up", "--peers", "2", "--max-steps", "100000", "--workdir", str(workdir)]
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [*cli("potluck"), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
    _STARTED_GROUPS.add(process.pid)
    swarm = Swarm(process, log_path, workdir)
    try:

        def both_peers_up():
            assert process.poll() is None, f"swarm up exited with {process.returncode}:\n{swarm.log()}"
            # NOTE: `potluck swarm up`'s own console is what this tests; it hands out these addresses (the
            # dashboard's, each peer's /metrics) and its peers' --results files do not hold them
            return len(re.findall(r"== peer\d+ is up", swarm.log())) == 2

        wait_until(both_peers_up, 180, "potluck swarm up to start a coordinator and 2 peers")
        swarm.coordinator = re.search(r"dashboard http://(127\.0\.0\.1:\d+)/", swarm.log()).group(1)
        swarm.peers = re.findall(r"its metrics: http://(127\.0\.0\.1:\d+)/metrics", swarm.log())
        # coordinator and peers lead process groups of their own: kill them too if the test dies
        swarm.started = psutil.Process(process.pid).children()
        _STARTED_GROUPS.update(child.pid for child in swarm.started)
        yield swarm
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=60)
        for group in [process.pid, *(c.pid for c in swarm.started)]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="module")
def prometheus(swarm, tmp_path_factory) -> Iterator[str]:
    """A Prometheus server with deploy/prometheus.yml rendered for the swarm; yields its base URL."""
    config = render_prometheus_config(DEPLOY / "prometheus.yml", swarm.coordinator, swarm.peers, "1s")
    with running_prometheus(config, tmp_path_factory.mktemp("prometheus")) as url:
        yield url


@contextlib.contextmanager
def running_prometheus(config: dict, root: Path) -> Iterator[str]:
    """A real Prometheus server with ``config`` (its files under ``root``), ready; yields its base URL, stopped
    on exit. Skips the test where the binary is missing."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip(
            "the prometheus binary is missing: apt-get install prometheus (make test installs it as root)"
        )
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    address = f"127.0.0.1:{free_port()}"
    with (root / "prometheus.log").open("w") as log:
        flags = [f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}"]
        process = subprocess.Popen(
            [binary, *flags, f"--web.listen-address={address}"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _STARTED_GROUPS.add(process.pid)
    url = f"http://{address}"
    try:

        def ready():
            assert process.poll() is None, (root / "prometheus.log").read_text()
            with contextlib.suppress(OSError):
                return urllib.request.urlopen(f"{url}/-/ready", timeout=2).status == 200

        wait_until(ready, 60, "Prometheus to be ready")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def api(url: str, path: str, **params) -> dict:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    try:
        with urllib.request.urlopen(f"{url}/api/v1/{path}{query}", timeout=10) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as e:  # a bad query answers 400 with the error in the body
        body = json.loads(e.read())
    return body


def query(url: str, expr: str) -> dict:
    return api(url, "query", query=expr)


def concrete(expr: str, variables: dict[str, str]) -> str:
    """A dashboard query as Prometheus takes it: Grafana's ``variables`` filled in, ``label_values`` made PromQL."""
    for name, value in sorted(variables.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    assert "$" not in expr, f"a Grafana variable this test cannot fill in: {expr}"
    label_values = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", expr)
    return f"count by ({label_values[2]}) ({label_values[1]})" if label_values else expr


SWARM_DASHBOARD = "potluck-swarm.json"
"""The dashboard of a training swarm (the others need other roles: ``potluck-experts.json`` expert servers)."""


def every_dashboard_query_returns_data(
    url: str, variables: dict[str, str], timeout: float, dashboard: str = SWARM_DASHBOARD
) -> dict[str, str]:
    """Run every query of the provisioned ``dashboard`` against the Prometheus at ``url`` until each has
    returned at least one series; each must parse. Returns ``{"dashboard: panel": PromQL}``; fails the
    test naming the queries still without data after ``timeout`` seconds."""
    queries = {
        f"{dashboard}: {title}": concrete(expr, variables)
        for title, expr in dashboard_queries(dashboards()[dashboard])
    }
    pending = dict(queries)

    def all_answered():
        for what, expr in list(pending.items()):
            answer = query(url, expr)
            assert answer["status"] == "success", f"{what}: {expr}: {answer.get('error')}"
            if answer["data"]["result"]:
                del pending[what]
        return not pending

    try:
        wait_until(all_answered, timeout, "every dashboard query to return data")
    except TimeoutError:
        pytest.fail(f"queries with no data after {timeout} s: {json.dumps(pending, indent=1)}")
    return queries


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


@pytest.mark.timeout(300)
def test_every_target_is_up(swarm, prometheus):
    assert len(swarm.peers) == 2
    written = yaml.safe_load((swarm.workdir / "prometheus.yml").read_text())  # what swarm up prints for users
    static = {j["job_name"]: j["static_configs"][0]["targets"] for j in written["scrape_configs"]}
    assert static == {COORDINATOR_JOB: [swarm.coordinator], PEERS_JOB: swarm.peers}
    expected = {(COORDINATOR_JOB, swarm.coordinator), *((PEERS_JOB, p) for p in swarm.peers)}

    def all_up():
        targets = api(prometheus, "targets")["data"]["activeTargets"]
        health = {(t["labels"]["job"], t["labels"]["instance"]): t["health"] for t in targets}
        return health if set(health) == expected and all(h == "up" for h in health.values()) else None

    try:
        wait_until(all_up, 60, "Prometheus to scrape the coordinator and both peers")
    except TimeoutError:
        targets = api(prometheus, "targets")["data"]["activeTargets"]
        pytest.fail(f"expected {expected} up; Prometheus has {json.dumps(targets, indent=1)}")


@pytest.mark.timeout(300)
def test_every_dashboard_query_returns_data(swarm, prometheus):
    queries = every_dashboard_query_returns_data(prometheus, GRAFANA_VARIABLES, 120)
    # the run selector offers the demo run
    (variable,) = [e for w, e in queries.items() if "variable run_id" in w]
    assert {r["metric"]["run_id"] for r in query(prometheus, variable)["data"]["result"]} == {RUN_ID}


@pytest.mark.timeout(300)
def test_alert_rules_evaluate_and_stay_quiet_while_the_swarm_is_healthy(swarm, prometheus):
    for rule in alert_rules():
        answer = query(prometheus, rule["expr"])
        assert answer["status"] == "success", f"{rule['alert']}: {answer.get('error')}"

    def rules_evaluated():
        groups = api(prometheus, "rules")["data"]["groups"]
        rules = {r["name"]: r for g in groups for r in g["rules"]}
        assert set(rules) == {r["alert"] for r in alert_rules()}, "Prometheus loaded other rules"
        assert all(r["health"] != "err" for r in rules.values()), [r.get("lastError") for r in rules.values()]
        return all(r["health"] == "ok" for r in rules.values())

    wait_until(rules_evaluated, 30, "Prometheus to evaluate every alert rule")

    def quiet():  # a healthy swarm: both peers report, rounds succeed, the coordinator collects
        return {
            r["alert"]: res for r in alert_rules() if (res := query(prometheus, r["expr"])["data"]["result"])
        }

    wait_until(
        lambda: query(prometheus, f'potluck_run_peers{{run_id="{RUN_ID}"}} == 2')["data"]["result"],
        60,
        "the coordinator to count both peers",
    )
    try:
        wait_until(lambda: not quiet(), 30, "every alert expression to be empty")
    except TimeoutError:
        pytest.fail(f"alert expressions match a healthy swarm: {quiet()}")


@pytest.mark.timeout(120)
def test_promtool_check_metrics_on_live_endpoints(swarm):
    for address in (swarm.coordinator, *swarm.peers):
        text = get(f"http://{address}/metrics")
        assert "potluck_" in text
        done = promtool("check", "metrics", stdin=text)
        assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), (
            f"{address}: {done.stdout}{done.stderr}"
        )


@pytest.mark.timeout(120)
def test_image_healthcheck_passes_on_live_endpoints_and_fails_on_a_dead_one(swarm):
    def healthcheck(url: str) -> int:
        command = [sys.executable if w == "python" else w for w in healthcheck_command()]
        return subprocess.run(
            command, env=dict(os.environ, POTLUCK_HEALTH_URL=url), capture_output=True, timeout=30
        ).returncode

    assert healthcheck(f"http://{swarm.coordinator}/healthz") == 0
    assert healthcheck(f"http://{swarm.peers[0]}/metrics") == 0
    assert healthcheck(f"http://127.0.0.1:{free_port()}/healthz") != 0


@pytest.mark.timeout(180)
def test_ctrl_c_stops_the_coordinator_and_every_peer(swarm):
    """Runs last in this module: it ends the shared swarm."""
    assert swarm.process.poll() is None, swarm.log()
    modules = sorted(p.cmdline()[2] for p in swarm.started)
    assert modules == ["potluck.coordinator.cli", "potluck.peer.launch", "potluck.peer.launch"]
    descendants = psutil.Process(swarm.process.pid).children(recursive=True)  # averagers start late
    swarm.process.send_signal(signal.SIGINT)
    assert swarm.process.wait(timeout=120) == 130, swarm.log()[-3000:]
    assert "== stopping the peers and the coordinator" in swarm.log()

    def gone(process: psutil.Process) -> bool:
        try:
            return process.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    # torch's shared-memory manager (its own session) exits on its own once its clients are gone
    try:
        wait_until(lambda: all(gone(p) for p in descendants), 60, "every process of the swarm to exit")
    except TimeoutError:
        pytest.fail(f"still running after Ctrl-C: {[p.cmdline() for p in descendants if not gone(p)]}")
