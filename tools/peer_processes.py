"""Start ``run-peer`` processes on this machine (loopback) and stop them: for the demo, tests and benchmarks."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from potluck.peer.results import PeerSummary, read_events, read_summary
from potluck.tools.warm_peers import WarmLauncher, WarmProcess

JOIN_ADDRESS = re.compile(r"--initial-peers (\S+)")
RUN_PEER = ("-m", "potluck.peer.launch")
"""What ``python`` runs for a peer by default (``start_peer(entry=...)`` replaces it)."""


@dataclass
class PeerProcess:
    name: str
    process: subprocess.Popen | WarmProcess
    log_path: Path
    results_path: Path | None = None
    """Its ``--results`` file (JSON Lines, see ``peer/results.py``)."""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        """The events it wrote so far (only those of ``kind``, if given)."""
        found = read_events(self.results_path) if self.results_path else []
        return [e for e in found if kind is None or e["event"] == kind]

    def summary(self) -> PeerSummary | None:
        """Its summary line, once it left (None while it runs, or if it was killed)."""
        return read_summary(self.results_path) if self.results_path else None

    def peer_id(self) -> str | None:
        joined = self.events("joined")
        return joined[-1]["peer_id"] if joined else None

    def join_address(self) -> str | None:
        if self.results_path is not None:
            joined = self.events("joined")
            return joined[-1]["addresses"][0] if joined and joined[-1]["addresses"] else None
        # NOTE: a process started without --results (none here) has only its log to say it
        match = JOIN_ADDRESS.search(self.log())
        return match.group(1) if match else None

    @property
    def running(self) -> bool:
        return self.process.poll() is None


@dataclass
class LocalSwarm:
    """A set of peer processes sharing one run spec; use as a context manager so all are stopped."""

    spec_path: Path
    workdir: Path
    extra_args: list[str] = field(default_factory=list)
    threads_per_peer: int = 1
    peers: list[PeerProcess] = field(default_factory=list)
    warm: WarmLauncher | None = None
    """Fork the peers it can from a template that has imported the peer (``tools/warm_peers.py``; the test suite)."""

    def start_peer(
        self,
        name: str,
        args: list[str] = (),
        initial_peers: list[str] | None = None,
        use_spec: bool = True,
        command_prefix: list[str] = (),
        entry: tuple[str, ...] = RUN_PEER,
        netns: str | None = None,
    ) -> PeerProcess:
        """Start ``run-peer``; ``initial_peers`` defaults to the first running peer's address.
        ``use_spec=False`` leaves out ``--run-spec`` (the peer finds its run through ``args``, e.g. a coordinator that
        published the swarm's spec: that file still says whether the peer may be forked from ``warm``).
        ``command_prefix`` runs it through another command, e.g. ``ip netns exec HOST`` (tests/netbed);
        ``entry`` replaces ``-m potluck.peer.launch`` with another script taking run-peer's flags (bench/slow_peer.py).
        ``netns`` runs it in that network namespace (``ip netns exec NETNS`` unless it is forked: tests/netbed).
        Its events and summary go to ``<workdir>/<name>.events.jsonl`` (``PeerProcess.events``/``summary``)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if initial_peers is None:
            initial_peers = [a for a in (p.join_address() for p in self.peers if p.running) if a][:1]
        results_path = self.workdir / f"{name}.events.jsonl"
        argv = [
            *(["--run-spec", str(self.spec_path)] if use_spec else []),
            "--results", str(results_path),
            "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
            "--progress-interval", "5",
            *(["--initial-peers", *initial_peers] if initial_peers else []),
            *self.extra_args, *args,
        ]  # fmt: skip
        log_path = self.workdir / f"{name}.log"
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads_per_peer), PYTHONUNBUFFERED="1")
        with log_path.open("w") as log:
            if (
                self.warm is not None
                and not command_prefix
                and entry == RUN_PEER
                and self.warm.can_start(
                    argv if use_spec or "--run-spec" in argv else [*argv, "--run-spec", str(self.spec_path)]
                )
            ):
                process = self.warm.start(argv, log_path, env, netns=netns)
            else:
                in_netns = ["ip", "netns", "exec", netns] if netns else []
                # own session: a signal to the demo's terminal does not hit peers twice, and stop() can
                # reach the peer's children (DHT, averagers, p2pd) through the process group
                process = subprocess.Popen(
                    [*in_netns, *command_prefix, sys.executable, *entry, *argv],
                    stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                )  # fmt: skip
        peer = PeerProcess(name, process, log_path, results_path)
        self.peers.append(peer)
        return peer

    def wait_for_address(self, peer: PeerProcess, timeout: float = 120.0) -> str:
        return wait_on(peer.join_address, timeout, f"peer {peer.name} printed no join address", peer)

    def wait_for_event(self, peer: PeerProcess, kind: str, timeout: float = 120.0) -> dict[str, Any]:
        """The peer's first ``kind`` event (``serving``, ``joined``...), once it wrote one."""

        def first() -> dict[str, Any] | None:
            found = peer.events(kind)
            return found[0] if found else None

        return wait_on(first, timeout, f"peer {peer.name} wrote no {kind!r} event", peer)

    def wait_all(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        for peer in self.peers:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                codes.append(peer.process.wait(timeout=remaining))
            except subprocess.TimeoutExpired:
                raise TimeoutError(
                    f"peer {peer.name} still running after {timeout}s:\n{peer.log()[-3000:]}"
                ) from None
        return codes

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM every peer (a clean leave), then SIGKILL whatever is left of its process group."""
        for peer in self.peers:
            if peer.running:
                peer.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for peer in self.peers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                peer.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(peer.process.pid, signal.SIGKILL)  # children of a dead peer, if any survived
            peer.process.wait()

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_on(
    condition: Callable[[], Any],
    timeout: float,
    failure: str,
    peer: PeerProcess | None = None,
    every: float = 0.2,
) -> Any:
    """``condition()``'s first truthy value, polled every ``every`` seconds until ``timeout``; ``failure`` says what
    did not happen in the error. With ``peer``: fails at once, with its log, if it exits first. The one poll loop
    of the tools, tests (``tests/helpers.wait_until``) and benchmarks (``bench/workdir.wait_for``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        if peer is not None and not peer.running:
            raise RuntimeError(
                f"peer {peer.name} exited with {peer.process.returncode}:\n{peer.log()[-3000:]}"
            )
        time.sleep(every)  # the poll period of a deadline-bounded wait, not a guess at timing
    raise TimeoutError(
        f"{failure} within {timeout}s" + (f":\n{peer.log()[-3000:]}" if peer is not None else "")
    )
