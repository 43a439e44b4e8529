"""Start ``run-coordinator`` as a local process (loopback): for the demo, tests and benchmarks."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCoordinator:
    def __init__(
        self,
        workdir: Path,
        dht_port: int | None = None,
        collect_interval: float = 1.0,
        extra_args: tuple[str, ...] = (),
    ):
        """``extra_args``: more ``run-coordinator`` flags (TLS, the operator token)."""
        self.workdir = workdir
        self.extra_args = extra_args
        self.db = workdir / "coordinator.db"
        self.grpc_port, self.http_port = free_port(), free_port()
        self.dht_port = dht_port or free_port()
        self.collect_interval = collect_interval
        self.process: subprocess.Popen | None = None
        self.log_path = workdir / "coordinator.log"

    def start(self, timeout: float = 120.0) -> LocalCoordinator:
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "potluck.coordinator.cli", "--db", str(self.db),
            "--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port),
            "--dht-host-maddrs", f"/ip4/127.0.0.1/tcp/{self.dht_port}",
            "--identity-path", str(self.workdir / "coordinator.id"),
            "--collect-interval", str(self.collect_interval), *self.extra_args,
        ]  # fmt: skip
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("a") as log:
            # own process group: stop() also reaches its DHT process and p2pd
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        # the last line run-coordinator prints once it serves (the web server's own "dashboard on" log line comes
        # before the TLS and token lines: a test that read those right after it failed when the CLI was slower)
        while "run-coordinator: runs are signed by" not in self.log():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"run-coordinator did not start:\n{self.log()[-3000:]}")
            time.sleep(0.2)
        return self

    def log(self) -> str:
        """What the current process (since the last ``start``) wrote."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[getattr(self, "_log_offset", 0) :]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/"

    @property
    def key_tag(self) -> bytes:
        return self.db.with_suffix(".pub").read_bytes()

    def dht_addresses(self) -> list[str]:
        return re.findall(r"DHT bootstrap address (\S+)", self.log())

    def get(self, path: str, token: str | None = None) -> str:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}")
        if token is not None:  # a coordinator started with --http-auth
            request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.read().decode()

    def run_report(self, run_id: str) -> dict:
        return json.loads(self.get(f"/api/runs/{run_id}"))

    def kill(self) -> None:
        """SIGKILL, as a crash would: no goodbye to the swarm."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self._kill_group()

    def stop(self, grace: float = 30.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._kill_group()

    def _kill_group(self) -> None:
        try:
            import os

            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
