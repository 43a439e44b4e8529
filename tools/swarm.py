"""``potluck swarm``: the docker-compose topology as local processes, and the compose stack's init step.

    potluck swarm up --peers N [--workdir DIR] [--max-steps N]
    potluck swarm init --workdir DIR --coordinator HOST:PORT [--max-steps N]

``up`` starts what ``docker-compose.yml`` starts, on this machine: a coordinator, the demo run published
through it, and N ``run-peer`` processes that know only the coordinator's address. It prints the
dashboard and every metrics address, writes a Prometheus config for them (``DIR/prometheus.yml``, from
``deploy/prometheus.yml`` in a checkout), and runs until the peers reach the last global step or Ctrl-C.

``init`` is the compose stack's one-shot service: build the demo's model and data into a shared volume
and publish the demo run at the coordinator. Run again (``docker compose up`` after a stop), it reuses
the assets and leaves the already published run alone.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import time
from pathlib import Path

import yaml

from potluck.protocols.coordinator_access import (
    AccessError,
    CoordinatorAccess,
    access_from_args,
    add_access_arguments,
)
from potluck.protocols.coordinator_client import CoordinatorClient, CoordinatorError
from potluck.protocols.runspec import load_run_spec
from potluck.tools.coordinator_process import LocalCoordinator
from potluck.tools.demo import DEMO_SPEC, DEMO_TASK, train
from potluck.tools.peer_processes import LocalSwarm, PeerProcess
from potluck.tools.tiny.assets import build_assets

DEPLOY_DIR = Path(__file__).resolve().parents[1] / "deploy"
"""``deploy/`` of a checkout; an installed wheel (the Docker image) has none, and ``up`` then skips the
Prometheus config."""
COORDINATOR_JOB = "potluck-coordinator"
"""The scrape job in ``deploy/prometheus.yml`` that reads the coordinator's ``/metrics``."""
PEERS_JOB = "potluck-peers"
"""The scrape job in ``deploy/prometheus.yml`` that reads the peers' own ``/metrics``."""
_MARKER = ".potluck-swarm"  # marks a workdir that ``up`` created, so that it may wipe it next time


def prepare_demo_run(workdir: Path, max_steps: int | None = None) -> Path:
    """Build the demo's model and data in ``workdir`` unless they are there; write and return its spec.

    The spec's relative paths resolve against ``workdir``, so peers must see the assets at the same path
    (in compose: the same volume mounted at the same place).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir, data_dir = workdir / "tiny-model", workdir / "data"
    if not (model_dir / "config.json").is_file() or not any(data_dir.glob("*.jsonl")):
        build_assets(workdir, DEMO_TASK)
    spec_path = workdir / "run.yaml"
    spec = dict(DEMO_SPEC, max_global_steps=max_steps or DEMO_SPEC["max_global_steps"])
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return spec_path


def publish_run(
    coordinator: str, spec_path: Path, wait: float = 60.0, access: CoordinatorAccess | None = None
) -> tuple[str, bool]:
    """Publish the spec at ``coordinator``; return ``(run_id, newly_published)``.

    A run with the same id already there counts as published (a restarted init). A coordinator that is
    not up yet (``UNAVAILABLE``) is retried for ``wait`` seconds; raise it if the coordinator starts slowly.
    """
    spec = load_run_spec(spec_path)  # validates, and makes the paths in it absolute
    deadline = time.monotonic() + wait
    while True:
        try:
            with CoordinatorClient(coordinator, access=access) as client:
                return client.publish(spec.model_dump_json()).run_id, True
        except CoordinatorError as e:
            if e.code == "ALREADY_EXISTS":
                return spec.run_id, False
            if e.code != "UNAVAILABLE" or time.monotonic() > deadline:
                raise
        time.sleep(1.0)


def render_prometheus_config(
    template: Path, coordinator: str, peers: list[str], scrape_interval: str | None = None
) -> dict:
    """``deploy/prometheus.yml`` with its compose targets replaced by ``HOST:PORT`` addresses.

    The coordinator job scrapes ``coordinator``; the peers job's DNS discovery (compose replicas) becomes
    a static list of ``peers``. Rule files become absolute paths (Prometheus resolves them against the
    config file's folder). ``scrape_interval`` overrides the scrape and evaluation intervals.
    """
    config = yaml.safe_load(template.read_text())
    config["rule_files"] = [str((template.parent / f).resolve()) for f in config.get("rule_files", [])]
    if scrape_interval:
        config["global"] = dict(
            config.get("global") or {}, scrape_interval=scrape_interval, evaluation_interval=scrape_interval
        )
    targets = {COORDINATOR_JOB: [coordinator], PEERS_JOB: list(peers)}
    for job in config["scrape_configs"]:
        if job["job_name"] in targets:
            for discovery in [k for k in job if k.endswith("_sd_configs")]:
                del job[discovery]
            job["static_configs"] = [{"targets": targets.pop(job["job_name"])}]
    if targets:
        raise ValueError(f"{template} has no scrape job named {', '.join(targets)}")
    return config


class _ObservedSwarm(LocalSwarm):
    """Remembers each peer's metrics address as the demo's ``train`` starts it; once all ``expected``
    peers are up, writes the Prometheus config for the swarm."""

    def __init__(self, spec_path: Path, workdir: Path, expected: int, on_all_started):
        super().__init__(spec_path, workdir)
        self.expected = expected
        self.on_all_started = on_all_started
        self.metrics_addresses: list[str] = []

    def start_peer(self, name: str, args: list[str] = (), **kwargs) -> PeerProcess:
        peer = super().start_peer(name, args, **kwargs)
        if "--metrics-port" in args:
            self.metrics_addresses.append(f"127.0.0.1:{args[list(args).index('--metrics-port') + 1]}")
        if len(self.peers) == self.expected:
            self.on_all_started(self.metrics_addresses)
        return peer


def _raise_interrupt(*_) -> None:
    raise KeyboardInterrupt


def up(workdir: Path, peers: int, max_steps: int | None) -> int:
    """Run the compose topology as local processes until the peers finish or Ctrl-C/SIGTERM."""
    workdir = workdir.resolve()
    if workdir.exists() and any(workdir.iterdir()) and not (workdir / _MARKER).exists():
        print(
            f"potluck swarm: {workdir} is not empty and not a swarm's workdir; pick another --workdir",
            file=sys.stderr,
        )
        return 2
    shutil.rmtree(workdir, ignore_errors=True)  # a fresh swarm each time, like the demo
    workdir.mkdir(parents=True)
    (workdir / _MARKER).touch()
    print(f"== building the demo's model and data in {workdir}", flush=True)
    spec_path = prepare_demo_run(workdir, max_steps)

    def write_prometheus_config(peer_addresses: list[str]) -> None:
        template = DEPLOY_DIR / "prometheus.yml"
        if not template.is_file():
            return
        config = render_prometheus_config(template, f"127.0.0.1:{coordinator.http_port}", peer_addresses)
        path = workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        print(f"== Prometheus config for this swarm: {path} (prometheus --config.file {path})", flush=True)

    # SIGTERM (docker, systemd) stops the swarm the way Ctrl-C does: through the finally below
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, _raise_interrupt)
    # "Ctrl-C stops everything", whatever this process inherited: Python keeps an inherited ignored SIGINT (a
    # launcher's background job, or a parent whose library ignored it) and Ctrl-C would then do nothing
    signal.signal(signal.SIGINT, signal.default_int_handler)
    coordinator = LocalCoordinator(workdir / "coordinator", collect_interval=2.0)
    swarm = _ObservedSwarm(spec_path, workdir / "logs", peers, write_prometheus_config)
    interrupted = False
    try:
        coordinator.start()
        print(
            f"== coordinator up: dashboard {coordinator.dashboard} metrics {coordinator.dashboard}metrics "
            f"gRPC {coordinator.address}",
            flush=True,
        )
        run_id, _ = publish_run(coordinator.address, spec_path)
        print(f"== run {run_id!r} published; starting {peers} peers (Ctrl-C stops everything)", flush=True)
        train(swarm, coordinator, workdir, peers)
    except KeyboardInterrupt:
        interrupted = True
        print("\n== stopping the peers and the coordinator", flush=True)
    finally:
        # NOTE: peers run in sessions of their own (a terminal's Ctrl-C does not reach them): a second
        # signal must not cut this cleanup short and leave them running
        for signum in handlers:
            signal.signal(signum, signal.SIG_IGN)
        swarm.stop()
        coordinator.stop()
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    if interrupted:
        return 130
    failed = [p for p in swarm.peers if p.process.returncode != 0]
    for p in failed:
        print(
            f"== {p.name} failed (exit {p.process.returncode}); last lines:\n{p.log()[-2000:]}",
            file=sys.stderr,
        )
    print(f"== done; logs in {workdir / 'logs'}, the coordinator's history in {coordinator.db}")
    return 1 if failed else 0


def init(
    workdir: Path,
    coordinator: str,
    max_steps: int | None,
    wait: float,
    access: CoordinatorAccess | None = None,
) -> int:
    """Build the demo assets in ``workdir`` (once) and publish the demo run at ``coordinator``."""
    spec_path = prepare_demo_run(workdir.resolve(), max_steps)
    try:
        run_id, new = publish_run(coordinator, spec_path, wait, access)
    except CoordinatorError as e:
        print(f"potluck swarm: coordinator {coordinator}: {e}", file=sys.stderr)
        return 1
    state = "published" if new else "was already published"
    print(f"potluck swarm: run {run_id!r} {state} at {coordinator}; its files are in {spec_path.parent}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="potluck swarm",
        description="The docker-compose topology as local processes, and the compose stack's init step.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    start = commands.add_parser("up", help="coordinator + demo run + N peers as local processes")
    start.add_argument("--peers", type=int, default=2, help="how many run-peer processes (default: 2)")
    start.add_argument("--workdir", type=Path, default=Path(".swarm"), help="wiped and rebuilt on each start")
    start.add_argument("--max-steps", type=int, default=None, help="global steps of the demo run")
    setup = commands.add_parser("init", help="build the demo assets and publish the demo run (compose)")
    setup.add_argument("--workdir", type=Path, required=True, help="where the assets go (a shared volume)")
    setup.add_argument("--coordinator", required=True, metavar="HOST:PORT", help="its gRPC address")
    setup.add_argument("--max-steps", type=int, default=None, help="global steps of the demo run")
    setup.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the coordinator")
    add_access_arguments(setup)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        access = access_from_args(args) if args.command == "init" else None
    except AccessError as e:
        print(f"potluck swarm: {e}", file=sys.stderr)
        return 2
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    if args.command == "up":
        if args.peers < 1:
            print("potluck swarm: --peers must be at least 1", file=sys.stderr)
            return 2
        return up(args.workdir, args.peers, args.max_steps)
    return init(args.workdir, args.coordinator, args.max_steps, args.wait, access)
