"""docker-compose.yml for real: the images ``make images`` built, up as a swarm, checked, then down.

One stack serves the module (``make test-compose``; never part of ``make test``, see tests/conftest.py):
a coordinator, the demo run, 2 peer replicas and Prometheus, under a project name of its own, with the
host ports on free loopback ports. The tests read what users read: the coordinator's API, each peer's
``--results`` file in its volume, Prometheus' API (targets, every Grafana panel's query, alerts). Grafana
itself is not started: its image is the one that comes from a container registry.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import yaml

from potluck.tools.coordinator_process import free_port
from potluck.tools.demo import DEMO_SPEC
from tests.helpers import wait_until
from tests.test_operations import COMPOSE_FILE, compose
from tests.test_ops_prometheus import api, every_dashboard_query_returns_data

pytestmark = pytest.mark.compose
RUN_ID = DEMO_SPEC["run_id"]
IMAGES = ("potluck:cpu", "potluck-prometheus:bookworm")
SERVICES = ("coordinator", "demo-init", "peer", "prometheus")
"""What the test starts: all but Grafana."""
RESULTS = "/var/lib/potluck/checkpoints/results.jsonl"
"""Each peer's ``--results`` file, in its own volume (docker-compose.yml)."""
GRAFANA_VARIABLES = {"$run_id": RUN_ID, "$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}
"""Grafana's values at deploy/prometheus.yml's 15 s scrapes: ``$__rate_interval`` is 4 of them."""


def docker(*args: str, timeout: float = 120) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"docker {' '.join(args)}: {done.stderr.strip()}"
    return done.stdout


def compose_programs() -> list[list[str]]:
    """The compose implementations installed: ``docker compose`` (v2) and ``docker-compose`` (v1)."""
    found = []
    if shutil.which("docker"):
        v2 = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if v2.returncode == 0:
            found.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        found.append(["docker-compose"])
    return found


def require_docker() -> list[str]:
    """The compose program to drive, or skip saying what is missing (``make test-compose`` provides it all)."""
    if not shutil.which("docker"):
        pytest.skip("docker is missing: make test-compose installs docker.io as root")
    if subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode != 0:
        pytest.skip("no Docker daemon answers: make test-compose starts dockerd as root")
    programs = compose_programs()
    if not programs:
        pytest.skip("neither docker compose nor docker-compose: make test-compose installs docker-compose")
    missing = [
        i for i in IMAGES if subprocess.run(["docker", "image", "inspect", i], capture_output=True).returncode
    ]
    if missing:
        pytest.skip(f"images {missing} are missing: make test-compose builds them (make images)")
    return programs[0]


@dataclass
class Stack:
    program: list[str]
    files: list[Path]
    project: str
    env: dict[str, str]
    http: str
    """``http://127.0.0.1:PORT`` of the coordinator's dashboard, API and /metrics."""
    prometheus: str
    volumes: set[str] = field(default_factory=set)
    """Every volume the project's containers mount, anonymous ones (the peers' checkpoints) included."""

    def compose(self, *args: str, timeout: float = 300) -> str:
        files = [w for f in self.files for w in ("-f", str(f))]
        done = subprocess.run(
            [*self.program, "-p", self.project, *files, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
        )
        assert done.returncode == 0, f"compose {' '.join(args)}: {done.stdout[-2000:]}{done.stderr[-3000:]}"
        return done.stdout

    def containers(self, service: str | None = None) -> list[str]:
        """Ids of the project's containers (of one service), stopped ones included."""
        label = f"label=com.docker.compose.project={self.project}"
        service_label = ["--filter", f"label=com.docker.compose.service={service}"] if service else []
        return docker("ps", "-aq", "--no-trunc", "--filter", label, *service_label).split()

    def coordinator_api(self, path: str) -> dict:
        with urllib.request.urlopen(f"{self.http}{path}", timeout=10) as response:
            return json.loads(response.read())


def results(container: str) -> list[dict]:
    """The events a peer wrote to its ``--results`` file so far (a half-written last line left out)."""
    text = docker("exec", container, "cat", RESULTS)
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


def logs_of(stack: Stack) -> str:
    return "\n".join(f"== {c[:12]}\n" + docker_logs(c) for c in stack.containers())


def docker_logs(container: str) -> str:
    done = subprocess.run(["docker", "logs", "--tail", "30", container], capture_output=True, text=True)
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    program = require_docker()
    root = tmp_path_factory.mktemp("compose")
    # peers train until the test stops them, not until the demo's last global step
    init = compose()["services"]["demo-init"]["command"]
    override = root / "compose.test.yml"
    override.write_text(
        yaml.safe_dump({"services": {"demo-init": {"command": [*init, "--max-steps", "100000"]}}})
    )
    ports = {name: free_port() for name in ("HTTP", "GRPC", "DHT", "PROMETHEUS", "GRAFANA")}
    env = dict(os.environ, **{f"POTLUCK_{name}_PORT": f"127.0.0.1:{port}" for name, port in ports.items()})
    env["GRAFANA_ADMIN_PASSWORD"] = secrets.token_urlsafe(18)  # docker-compose.yml has no default
    stack = Stack(
        program,
        [COMPOSE_FILE, override],
        f"potluck-test-{os.getpid()}",
        env,
        f"http://127.0.0.1:{ports['HTTP']}",
        f"http://127.0.0.1:{ports['PROMETHEUS']}",
    )
    try:
        # returns once the coordinator is healthy, demo-init has published the run and the rest started
        stack.compose("up", "-d", "--no-build", "--scale", "peer=2", *SERVICES, timeout=600)
        for container in stack.containers():
            mounts = json.loads(docker("inspect", "-f", "{{json .Mounts}}", container))
            stack.volumes.update(m["Name"] for m in mounts if m["Type"] == "volume")
        yield stack
    finally:
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            stack.compose("down", "-v", "--remove-orphans", "--timeout", "10", timeout=300)


def test_every_installed_compose_accepts_the_file(tmp_path):
    programs = compose_programs()
    if not programs:
        pytest.skip("neither docker compose nor docker-compose: make test-compose installs docker-compose")
    for program in programs:
        config = [*program, "-f", str(COMPOSE_FILE), "config", "-q"]
        env = dict(os.environ, GRAFANA_ADMIN_PASSWORD=secrets.token_urlsafe(18))
        done = subprocess.run(config, capture_output=True, text=True, timeout=60, env=env)
        assert done.returncode == 0, f"{' '.join(program)} config: {done.stderr}"
        # without a password, compose refuses the file rather than start Grafana with a default one
        env.pop("GRAFANA_ADMIN_PASSWORD")
        (tmp_path / "empty.env").write_text("")  # not the .env that `make compose-env` wrote
        unset = [*program, "--env-file", str(tmp_path / "empty.env"), *config[len(program) :]]
        refused = subprocess.run(unset, capture_output=True, text=True, timeout=60, env=env)
        assert refused.returncode != 0 and "GRAFANA_ADMIN_PASSWORD" in refused.stderr, refused


@pytest.mark.timeout(1200)  # the stack's start (model builds, the first rounds) is part of this test
def test_peers_train_together(stack):
    def both_reported():
        peers = stack.coordinator_api(f"/api/runs/{RUN_ID}")["peers"]
        return len(peers) == 2 and all(p["global_step"] >= 5 for p in peers)

    try:
        wait_until(both_reported, 420, "both peers to report global step 5 or more to the coordinator")
    except TimeoutError:
        pytest.fail(f"{stack.coordinator_api(f'/api/runs/{RUN_ID}')['peers']}\n{logs_of(stack)}")

    # they take their steps together: one global step (5 or later) that each peer took by a successful
    # averaging round in a group of 2, not each alone catching up by state downloads (what one fixed DHT
    # port for every replica did). Read from each peer's own results, not from the coordinator's latest
    # reports: those are sent at each peer's own moment, so their steps differ by however many steps fit
    # between the two reports.
    def averaged_steps(container: str) -> set[int]:
        return {
            e["global_step"]
            for e in results(container)
            if e["event"] == "global_step"
            and e["global_step"] >= 5
            and e["round"] == {"outcome": "succeeded", "group_size": 2}
        }

    def a_step_taken_together():
        first, second = (averaged_steps(c) for c in stack.containers("peer"))
        return first & second

    try:
        wait_until(
            a_step_taken_together, 120, "both peers to take one global step by averaging in a group of 2"
        )
    except TimeoutError:
        steps = {
            c[:12]: [e for e in results(c) if e["event"] == "global_step"][-3:]
            for c in stack.containers("peer")
        }
        pytest.fail(f"last global steps: {steps}\n{logs_of(stack)}")


@pytest.mark.timeout(300)
def test_every_prometheus_target_is_up(stack):
    def targets():
        return [
            (t["labels"]["job"], t["health"])
            for t in api(stack.prometheus, "targets")["data"]["activeTargets"]
        ]

    def all_up():
        found = targets()
        return sorted(found) == [
            ("potluck-coordinator", "up"),
            ("potluck-peers", "up"),
            ("potluck-peers", "up"),
        ]

    try:
        wait_until(all_up, 120, "Prometheus to scrape the coordinator and both peer replicas")
    except TimeoutError:
        pytest.fail(
            f"targets: {json.dumps(api(stack.prometheus, 'targets')['data']['activeTargets'], indent=1)}"
        )


@pytest.mark.timeout(300)
def test_every_grafana_panel_query_returns_data_from_the_live_swarm(stack):
    queries = every_dashboard_query_returns_data(stack.prometheus, GRAFANA_VARIABLES, 180)
    assert len(queries) >= 15


@pytest.mark.timeout(120)
def test_the_dashboard_answers(stack):
    with urllib.request.urlopen(f"{stack.http}/", timeout=10) as response:
        assert response.status == 200 and b"<title>Potluck coordinator</title>" in response.read()
    run = stack.coordinator_api(f"/api/runs/{RUN_ID}")
    assert run["run"]["status"] == "active" and run["history"], run["run"]
    assert run["history"][-1]["peers"] == 2


def firing(stack: Stack, alert: str, peer: str) -> bool:
    alerts = api(stack.prometheus, "alerts")["data"]["alerts"]
    return any(
        a["labels"]["alertname"] == alert and a["labels"].get("peer") == peer and a["state"] == "firing"
        for a in alerts
    )


@pytest.mark.timeout(900)
def test_a_killed_peer_fires_peer_down_and_resumes_from_its_volume(stack):
    peer, other = stack.containers("peer")

    def checkpoint():
        return next((e for e in results(peer) if e["event"] == "checkpoint"), None)

    saved = wait_until(checkpoint, 420, "the peer's first checkpoint (the demo saves every 100 steps)")
    (joined,) = [e for e in results(peer) if e["event"] == "joined"]
    label = joined["peer_id"][-12:]  # how the coordinator labels its series
    docker("kill", peer)  # no clean leave; a killed container is not restarted by its restart policy
    try:
        wait_until(lambda: firing(stack, "PotluckPeerDown", label), 300, "PotluckPeerDown to fire")
    except TimeoutError:
        pytest.fail(f"alerts: {json.dumps(api(stack.prometheus, 'alerts')['data']['alerts'], indent=1)}")

    docker("start", peer)  # the same container: its volume holds the checkpoint and the peer id

    def trains_again() -> dict | None:
        """The ``resumed`` event of the restarted peer, once a global step followed it."""
        events = results(peer)
        kinds = [e["event"] for e in events]
        if "resumed" in kinds and "global_step" in kinds[kinds.index("resumed") :]:
            return events[kinds.index("resumed")]
        return None

    try:
        resumed = wait_until(trains_again, 300, "the restarted peer to resume and take a global step")
    except TimeoutError:
        pytest.fail(f"{results(peer)[:5]}\n{docker_logs(peer)}")
    assert resumed["global_step"] >= saved["global_step"]
    assert resumed["checkpoint"].startswith("/var/lib/potluck/checkpoints/")
    (rejoined,) = [e for e in results(peer) if e["event"] == "joined"]
    assert rejoined["peer_id"] == joined["peer_id"], "its identity comes from its volume too"
    wait_until(lambda: not firing(stack, "PotluckPeerDown", label), 180, "the alert to clear")
    assert docker("inspect", "-f", "{{.State.Running}}", other).strip() == "true"


@pytest.mark.timeout(300)
def test_down_leaves_no_container_network_volume_or_process(stack):
    containers = stack.containers()
    assert len(containers) == 5  # coordinator, demo-init, 2 peers, prometheus
    label = f"label=com.docker.compose.project={stack.project}"
    assert docker("network", "ls", "-q", "--filter", label).split()
    stack.compose("down", "-v", "--remove-orphans", timeout=300)
    assert stack.containers() == []
    assert docker("network", "ls", "-q", "--filter", label).split() == []
    left = set(docker("volume", "ls", "-q").split()) & stack.volumes
    assert not left, f"volumes left behind: {left}"

    def in_a_container(process: psutil.Process) -> bool:
        """A process of one of the stack's containers (its cgroup), or the shim that ran one."""
        with contextlib.suppress(OSError, psutil.Error):
            text = Path(f"/proc/{process.pid}/cgroup").read_text() + " ".join(process.cmdline())
            return any(c in text for c in containers)
        return False

    try:
        wait_until(
            lambda: not any(in_a_container(p) for p in psutil.process_iter()), 30, "their processes to exit"
        )
    except TimeoutError:
        pytest.fail(f"still running: {[p.cmdline() for p in psutil.process_iter() if in_a_container(p)]}")
