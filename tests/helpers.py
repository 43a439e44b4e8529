"""Helpers shared by the multi-process tests: wait on a condition, read Prometheus text, create hivemind
averagers in the test process, a peer address nobody serves yet."""

from __future__ import annotations

import contextlib
import re
import signal
import time
import urllib.request
from pathlib import Path


def wait_until(condition, timeout: float, what: str, interval: float = 0.3):
    """Poll ``condition`` until it returns something truthy (returned) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)  # the poll period of a deadline-bounded wait, not a guess at timing
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def metric(text: str, name: str) -> float | None:
    """The value of the first series of ``name`` in Prometheus exposition ``text``."""
    match = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def address_of_a_peer_not_started(tmp_path: Path) -> tuple[str, str, Path]:
    """A libp2p peer that nobody runs yet: (its multiaddr to dial, the address to listen on, its
    identity file). Start it later with that identity and address, or never."""
    from hivemind.p2p import P2P, PeerID

    from potluck.tools.coordinator_process import free_port

    identity = tmp_path / "not-started.id"
    P2P.generate_identity(str(identity))
    listen = f"/ip4/127.0.0.1/tcp/{free_port()}"
    return f"{listen}/p2p/{PeerID.from_identity(identity.read_bytes())}", listen, identity


@contextlib.contextmanager
def sigint_kept():
    """Create hivemind averagers (and the strategies that hold them) in the test process inside this.

    Creating one leaves SIGINT ignored in the creating process, and processes that pytest starts later
    would inherit that (tests/test_ops_prometheus.py's Ctrl-C then did nothing)."""
    handler = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)


class QuietListener:
    """An averaging listener that records nothing (tests that read the models instead of the metrics)."""

    def averaging_round(self, *args) -> None: ...

    def state_download(self, *args) -> None: ...
