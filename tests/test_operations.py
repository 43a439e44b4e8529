"""The deployment as files: docker-compose.yml, the images, Prometheus' config and rules, Grafana's provisioning.

Checked without a Docker engine, in seconds: every service runs a real CLI invocation that parses, the
ports Prometheus scrapes are the ones the services serve, the files Prometheus and Grafana mount exist
and are valid, the Dockerfiles install what the build context holds. promtool checks the config and
rules and runs the rules' unit tests. tests/test_ops_prometheus.py runs a real Prometheus against a real
swarm; tests/test_compose.py builds the images and runs the compose swarm itself (``make test-compose``).
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
PROMETHEUS_DOCKERFILE = DEPLOY / "prometheus.Dockerfile"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
ENTRY_POINTS = {
    e.name: e.value.split(":")[0]
    for e in importlib.metadata.distribution("potluck").entry_points
    if e.group == "console_scripts"
}
"""Console script → module: run-peer, run-coordinator, potluck."""


# -- reading the files ---------------------------------------------------------------------------------
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def potluck_services() -> dict[str, dict]:
    """Services that run this project's image (their command is one of its console scripts)."""
    return {n: s for n, s in compose()["services"].items() if s.get("command", [None])[0] in ENTRY_POINTS}


def flag(command: list[str], name: str, default: str | None = None) -> str | None:
    """The value of ``--name V`` or ``--name=V`` in a command line."""
    for i, word in enumerate(command):
        if word == name and i + 1 < len(command):
            return command[i + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return default


def mounts(service: dict) -> list[tuple[str, PurePosixPath]]:
    """``(source, container path)`` of a service's volumes; bind sources as absolute host paths."""
    found = []
    for entry in service.get("volumes", []):
        source, target = entry.split(":")[:2]
        if source.startswith((".", "/")):
            source = str((COMPOSE_FILE.parent / source).resolve())
        found.append((source, PurePosixPath(target)))
    return found


def host_path(service: dict, container_path: str) -> Path:
    """Where a path inside the container comes from on this machine (through its bind mounts)."""
    path = PurePosixPath(container_path)
    for source, target in sorted(mounts(service), key=lambda m: -len(m[1].parts)):
        if path == target or target in path.parents:
            if not source.startswith("/"):
                raise AssertionError(f"{container_path} is in the named volume {source!r}, not a file here")
            return Path(source) / path.relative_to(target)
    raise AssertionError(f"nothing is mounted at {container_path}")


def container_ports(entries: list) -> set[int]:
    """``"8080:8080"``, ``"9100"`` or ``"31337:31337/tcp"`` → container ports."""
    return {int(str(e).split(":")[-1].split("/")[0]) for e in entries}


def dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """``(panel title, PromQL)`` for every query of a dashboard (panels and template variables)."""
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            queries.append((panel["title"], target["expr"]))
    for variable in dashboard["templating"]["list"]:
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        queries.append((f"variable {variable['name']}", query))
    return queries


def alert_rules() -> list[dict]:
    return [
        rule
        for group in yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"]
        for rule in group["rules"]
    ]


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with continuation lines joined and comments dropped."""
    text = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")),
    )
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
        for line in text.splitlines()
        if line.strip()
    ]


def healthcheck_command() -> list[str]:
    """The image's HEALTHCHECK command (exec form)."""
    (args,) = [a for i, a in dockerfile_instructions() if i == "HEALTHCHECK"]
    return json.loads(args.split("CMD", 1)[1])


def cli(script: str) -> list[str]:
    """How to run a console script of this project: the venv's script, else ``python -m``."""
    installed = Path(sys.executable).parent / script
    return [str(installed)] if installed.exists() else [sys.executable, "-m", ENTRY_POINTS[script]]


# -- docker-compose.yml --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(potluck_services()))
def test_compose_service_runs_a_cli_invocation_that_parses(name):
    command = potluck_services()[name]["command"]
    assert all(isinstance(word, str) for word in command), f"{name}: quote numbers in the command"
    # argparse converts values before it acts on --help, so a bad value fails here too; --help then
    # stops it before an unknown flag would be reported, hence the second check
    done = subprocess.run(
        [*cli(command[0]), *command[1:], "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"{name}: {' '.join(command)} --help\n{done.stderr[-3000:]}"
    options = set(re.findall(r"--[\w.-]+", done.stdout))  # exact: no argparse abbreviations either
    unknown = [w for w in command[1:] if w.startswith("--") and w.split("=")[0] not in options]
    assert not unknown, f"{name}: {unknown} are not options of {' '.join(command[:3])}"


def test_compose_topology_coordinator_init_scalable_peers_prometheus_grafana():
    services = compose()["services"]
    ours = potluck_services()
    unchecked = set(services) - set(ours) - {"prometheus", "grafana"}
    assert not unchecked, f"services this test knows nothing about: {unchecked}"
    roles = {n: tuple(s["command"][:3]) for n, s in ours.items()}
    assert ("run-coordinator",) in {r[:1] for r in roles.values()}
    assert ("potluck", "swarm", "init") in roles.values(), "a one-shot service publishes the demo run"
    peer = services["peer"]
    assert peer["command"][0] == "run-peer"
    # `--scale peer=N` needs replicas that do not claim a fixed name or host port
    assert "container_name" not in peer and "ports" not in peer
    # docker's default 10 s before SIGKILL may cut a peer's clean leave (finish the step, say goodbye)
    assert int(peer["stop_grace_period"].rstrip("s")) >= 30
    assert peer["depends_on"]["demo-init"]["condition"] == "service_completed_successfully"
    assert services["demo-init"]["depends_on"]["coordinator"]["condition"] == "service_healthy"
    # every service of our image is built from deploy/Dockerfile
    for name, service in ours.items():
        build = service["build"]
        assert (ROOT / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE, name
    named = {s for service in services.values() for s, _ in mounts(service) if not s.startswith("/")}
    assert named <= set(compose()["volumes"]), f"undeclared volumes: {named - set(compose()['volumes'])}"
    assert "deploy:" in COMPOSE_FILE.read_text() and "driver: nvidia" in COMPOSE_FILE.read_text()


def test_peers_reach_the_coordinator_and_share_the_demo_files():
    services = compose()["services"]
    coordinator = services["coordinator"]["command"]
    grpc_port = flag(coordinator, "--grpc-port", "50051")
    assert flag(coordinator, "--host") == "0.0.0.0", "the coordinator must listen beyond its loopback"
    dht_port = flag(coordinator, "--dht-host-maddrs").split("/tcp/")[1]
    published = container_ports(services["coordinator"]["ports"])
    assert {int(grpc_port), int(dht_port), int(flag(coordinator, "--http-port", "8080"))} <= published
    init, peer = services["demo-init"]["command"], services["peer"]["command"]
    for command in (init, peer):
        assert flag(command, "--coordinator") == f"coordinator:{grpc_port}"
    # the published spec holds absolute paths: peers must mount the init's files at the same place
    workdir = PurePosixPath(flag(init, "--workdir"))
    (shared,) = [(s, t) for s, t in mounts(services["demo-init"]) if t == workdir or t in workdir.parents]
    assert shared in mounts(services["peer"]), "peers must mount the demo volume where init wrote it"
    # a port of its own per replica: with one fixed port, the 127.0.0.1 address every peer tells the
    # others is the same for all and reaches the dialler's own node (see the note in docker-compose.yml)
    assert flag(peer, "--host-maddrs") == "/ip4/0.0.0.0/tcp/0"
    assert int(flag(peer, "--metrics-port")) in container_ports(services["peer"]["expose"])


def test_prometheus_scrapes_the_ports_the_services_serve_metrics_on():
    services = compose()["services"]
    prometheus = services["prometheus"]
    config_path = flag(prometheus["command"], "--config.file")
    config_file = host_path(prometheus, config_path)
    assert config_file == DEPLOY / "prometheus.yml"
    config = yaml.safe_load(config_file.read_text())
    for rule_file in config["rule_files"]:  # relative to the config file, inside the container
        assert host_path(prometheus, str(PurePosixPath(config_path).parent / rule_file)).is_file()
    # where each of our services serves /metrics, and on which address
    serves = {}
    for name, service in potluck_services().items():
        command = service["command"]
        if command[0] == "run-coordinator":
            serves[name] = (flag(command, "--host", "127.0.0.1"), int(flag(command, "--http-port", "8080")))
        elif command[0] == "run-peer":
            serves[name] = (
                flag(command, "--metrics-host", "127.0.0.1"),
                int(flag(command, "--metrics-port")),
            )
    scraped = set()
    for job in config["scrape_configs"]:
        targets = [t for c in job.get("static_configs", []) for t in c["targets"]]
        targets += [f"{n}:{c['port']}" for c in job.get("dns_sd_configs", []) for n in c["names"]]
        assert targets, f"job {job['job_name']} has no targets"
        for target in targets:
            host, port = target.rsplit(":", 1)
            assert host in serves, f"job {job['job_name']}: {host} is not a service with a metrics endpoint"
            assert serves[host] == ("0.0.0.0", int(port)), (
                f"{host} serves metrics on {serves[host]}, not {port}"
            )
            scraped.add(host)
    assert scraped == set(serves), f"services nobody scrapes: {set(serves) - scraped}"
    assert "9090" in flag(prometheus["command"], "--web.listen-address")


def test_grafana_has_no_default_admin_password():
    # `${VAR:?message}`: compose refuses the file while it is unset (tests/test_compose.py runs that)
    password = compose()["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert password.startswith("${GRAFANA_ADMIN_PASSWORD:?") and password.endswith("}"), password


def test_grafana_provisioning_is_mounted_and_valid():
    services = compose()["services"]
    grafana = services["grafana"]
    provisioning = host_path(grafana, "/etc/grafana/provisioning")
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    prometheus_port = flag(services["prometheus"]["command"], "--web.listen-address").rsplit(":", 1)[1]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == f"http://prometheus:{prometheus_port}"
    scrape_interval = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["global"]["scrape_interval"]
    assert datasource["jsonData"]["timeInterval"] == scrape_interval, "$__rate_interval depends on it"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "potluck.yml").read_text())["providers"]
    folder = host_path(grafana, provider["options"]["path"])
    assert folder == DASHBOARDS and dashboards(), "the provider's folder holds the dashboards"
    assert host_path(grafana, grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]).is_file()
    for name, dashboard in dashboards().items():
        panels = dashboard["panels"]
        assert dashboard["uid"] and dashboard["title"], name
        ids = [p["id"] for p in panels]
        assert len(ids) == len(set(ids)), f"{name}: panel ids repeat"
        for panel in panels:
            assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, f"{name}: {panel['title']} too wide"
            if panel["type"] == "row":
                continue
            assert panel["targets"], f"{name}: {panel['title']} has no query"
            for ref in [panel["datasource"], *(t["datasource"] for t in panel["targets"])]:
                assert ref == {"type": "prometheus", "uid": datasource["uid"]}, f"{name}: {panel['title']}"
    assert len(dashboard_queries(dashboards()["potluck-swarm.json"])) >= 15
    assert set(dashboards()) == {"potluck-swarm.json", "potluck-experts.json"}  # each checked live by a test


# -- the images ----------------------------------------------------------------------------------------
def test_dockerfile_installs_the_wheelhouse_without_an_index_on_a_base_given_as_argument():
    text = DOCKERFILE.read_text()
    assert not text.startswith("# syntax="), (
        "a frontend image from a registry: the classic builder needs none"
    )
    instructions = dockerfile_instructions()
    assert instructions[0] == ("ARG", "BASE_IMAGE=potluck-base:bookworm")
    stages = {args.split(" AS ")[1]: args.split(" AS ")[0] for i, args in instructions if i == "FROM"}
    assert stages == {"dependencies": "${BASE_IMAGE}", "runtime": "${BASE_IMAGE}"}
    runs = " ".join(args for i, args in instructions if i == "RUN")
    installs = re.findall(r"pip install ([^&]*)", runs)
    assert installs and all("--no-index" in i for i in installs), installs
    assert "COPY build/wheelhouse/${VARIANT}/ /wheelhouse/" in [f"{i} {a}" for i, a in instructions]
    assert "COPY --from=dependencies /opt/venv /opt/venv" in [f"{i} {a}" for i, a in instructions]
    # compose builds the same image on the same base; cpu and cuda differ by their wheelhouse only
    for name, service in potluck_services().items():
        args = service["build"]["args"]
        assert args == {
            "VARIANT": "${POTLUCK_VARIANT:-cpu}",
            "BASE_IMAGE": "${POTLUCK_BASE_IMAGE:-potluck-base:bookworm}",
        }
        assert service["image"] == "potluck:${POTLUCK_VARIANT:-cpu}", name
    images_script = (DEPLOY / "images.sh").read_text()
    assert "cuda) TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu" in images_script
    users = [args for i, args in instructions if i == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"
    (volumes,) = [json.loads(args) for i, args in instructions if i == "VOLUME"]
    for kind in ("models", "data", "checkpoints"):
        assert f"/var/lib/potluck/{kind}" in volumes
    health = healthcheck_command()
    assert health[0] == "python" and "POTLUCK_HEALTH_URL" in health[-1]
    env = " ".join(args for i, args in instructions if i == "ENV")
    assert "POTLUCK_HEALTH_URL=http://127.0.0.1:8080/healthz" in env
    # the services point the healthcheck at what they serve
    for name, service in potluck_services().items():
        url = service.get("environment", {}).get("POTLUCK_HEALTH_URL")
        command = service["command"]
        if command[0] == "run-coordinator":
            assert url == f"http://127.0.0.1:{flag(command, '--http-port', '8080')}/healthz"
        elif command[0] == "run-peer":
            assert url == f"http://127.0.0.1:{flag(command, '--metrics-port')}/metrics"
        else:
            assert service["healthcheck"] == {"disable": True}, f"{name} is a one-shot service"


def test_the_build_context_is_the_source_and_the_wheelhouse():
    """The root .dockerignore (read by the classic builder, BuildKit and both compose versions) lets through
    what the Dockerfile copies, and nothing else that is large: not .venv, .git or the tests."""
    assert not (DEPLOY / "Dockerfile.dockerignore").exists(), "BuildKit would read it instead of the root one"
    ignore = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if not line.startswith("#")]
    assert ignore[0] == "*", "everything is left out but what is let through"
    let_through = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for i, args in dockerfile_instructions():
        if i == "COPY" and "--from" not in args:
            for source in args.split()[:-1]:
                fixed = source.split("${")[0].rstrip(
                    "/"
                )  # build/wheelhouse/${VARIANT}: made by `make images`
                assert fixed in let_through, f"{source} is not in the build context"
                assert "${" in source or (ROOT / source).exists(), source
    assert let_through.isdisjoint({".venv", ".git", "tests", "bench", "docs", "build"})


def test_wheelhouse_pins_the_runtime_dependencies_at_the_tested_versions():
    wheelhouse = runpy.run_path(str(DEPLOY / "wheelhouse.py"))
    pins = wheelhouse["runtime_pins"]()
    for name in ("torch", "hivemind", "transformers", "peft", "grpcio-tools", "numpy", "setuptools"):
        assert pins[name] == importlib.metadata.version(name), name  # numpy: through torch and datasets
    for name in ("potluck", "pytest", "ruff", "trl", "hypothesis", "codespell"):  # itself and [dev]
        assert name not in pins, name
    text = wheelhouse["requirements_text"](pins, torch_from_index=True)
    assert f"torch=={pins['torch'].split('+')[0]}\n" in text, "the CUDA variant takes the index's build"


def test_prometheus_image_is_debians_package_on_the_same_base():
    service = compose()["services"]["prometheus"]
    build = service["build"]
    assert (ROOT / build["context"] / build["dockerfile"]).resolve() == PROMETHEUS_DOCKERFILE
    # its context is deploy/, a few kB: not the repository root with the wheelhouse
    assert (ROOT / build["context"]).resolve() == DEPLOY
    assert build["args"]["BASE_IMAGE"] == compose()["services"]["peer"]["build"]["args"]["BASE_IMAGE"]
    instructions = dockerfile_instructions(PROMETHEUS_DOCKERFILE)
    assert ("FROM", "${BASE_IMAGE}") in instructions
    (run,) = [args for i, args in instructions if i == "RUN"]
    assert "apt-get install -y --no-install-recommends prometheus" in run
    (entrypoint,) = [json.loads(args) for i, args in instructions if i == "ENTRYPOINT"]
    assert entrypoint == ["/usr/bin/prometheus"], "compose's command is Prometheus' flags"
    assert [args for i, args in instructions if i == "USER"] == ["prometheus"]
    assert all(word.startswith("--") for word in service["command"])


# -- promtool ------------------------------------------------------------------------------------------
def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is missing: apt-get install prometheus (make test installs it as root)")
    return subprocess.run([binary, *args], input=stdin, capture_output=True, text=True, timeout=60)


def test_promtool_accepts_the_config_and_rules():
    for args in (
        ("check", "config", str(DEPLOY / "prometheus.yml")),
        ("check", "rules", str(DEPLOY / "alerts.yml")),
    ):
        done = promtool(*args)
        assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_unit_tests_that_pass():
    done = promtool("test", "rules", str(DEPLOY / "alerts.test.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    cases = [
        c
        for t in yaml.safe_load((DEPLOY / "alerts.test.yml").read_text())["tests"]
        for c in t["alert_rule_test"]
    ]
    for rule in alert_rules():
        own = [c for c in cases if c["alertname"] == rule["alert"]]
        assert any(c["exp_alerts"] for c in own), f"no test makes {rule['alert']} fire"
        assert any(not c["exp_alerts"] for c in own), f"no test checks that {rule['alert']} stays quiet"
    names = {
        "PotluckCoordinatorDown",
        "PotluckGlobalStepStalled",
        "PotluckPeersOnlineLow",
        "PotluckAveragingFailureRateHigh",
    }
    assert names <= {r["alert"] for r in alert_rules()}


def test_the_image_install_ships_every_subpackage():
    """The image installs the package non-editably (``pip install .``): a folder with an ``__init__.py``
    missing from pyproject's explicit package list would be left out of it and fail at import there only."""
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    for name, folder in setuptools["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            assert ".".join((name, *relative)) in listed, f"{init.parent} is not in pyproject's packages"
