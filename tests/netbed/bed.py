"""Simulated internet hosts on one machine: network namespaces behind a router namespace.

Topology: every host is a namespace with one interface ``eth0`` (address ``10.77.N.2/24``, default
route via ``10.77.N.1``). Its *access link* to the router namespace is two veth pairs with the link
emulator (:mod:`tests.netbed.forwarder`) between them::

    host N: eth0 ── hN-in  [forwarder: delay, jitter]  hN-out ── hN-rt (10.77.N.1) ── router ── other hosts

What shapes the access link (:class:`Link`), each direction separately:

- **rate**: ``tc tbf`` on the host's ``eth0`` (upload) and on the router's ``hN-rt`` (download);
  ``queue_ms`` is how much the buffer of each holds (bufferbloat: raise it; drops at bursts: too low);
- **delay and jitter**: the forwarder (no ``netem`` in this kernel);
- **loss**: ``iptables -m statistic --mode random`` in the router's FORWARD chain, so the loss is
  on the path, seen by TCP as real loss (a drop in the host's own OUTPUT chain would not be).

A packet between two hosts crosses both access links: RTT = 2 × (delay A + delay B), and the loss of
each direction adds up. The router also partitions a host (drops everything to and from it) and
puts a host behind NAT (MASQUERADE, no inbound connections). Every namespace, link and process is
removed by :meth:`NetBed.close`; namespaces that a crashed run left behind are removed by the next.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
NETNS_DIR = Path("/var/run/netns")
PREFIX = "pl7"
TOOLS = {
    "ip": "iproute2",
    "tc": "iproute2",
    "iptables": "iptables",
    "ethtool": "ethtool",
    "ping": "iputils-ping",
}


class NetBedError(RuntimeError):
    pass


def unavailable_reason() -> str | None:
    """Why a test bed cannot be built here (None: it can). Tests skip with this reason."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    missing = sorted({package for tool, package in TOOLS.items() if shutil.which(tool) is None})
    if missing:
        return f"missing {' '.join(missing)} (make system-packages installs them)"
    probe = f"{PREFIX}-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def run(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise NetBedError(f"{' '.join(command)} failed: {done.stderr.strip()}")
    return done


@dataclass(frozen=True)
class Link:
    """A host's access link, applied to each direction (upload and download) separately."""

    rate_mbit: float | None = None
    """Bandwidth in Mbit/s (None: unshaped)."""
    delay_ms: float = 0.0
    """One-way delay of this link; host-to-host RTT = 2 × (delay of one + delay of the other)."""
    jitter_ms: float = 0.0
    """Each frame's delay varies uniformly by ± this (frames keep their order)."""
    loss: float = 0.0
    """Probability that a packet is dropped, in each direction (0.01 = 1 %)."""
    queue_ms: float = 50.0
    """Buffer of the rate shaper, in milliseconds at ``rate_mbit``."""

    def __post_init__(self):
        if not 0.0 <= self.loss < 1.0:
            raise ValueError(f"Link.loss must be in [0, 1), got {self.loss}")
        if self.rate_mbit is not None and self.rate_mbit <= 0:
            raise ValueError(f"Link.rate_mbit must be positive, got {self.rate_mbit}")
        if self.delay_ms < 0 or self.jitter_ms < 0 or self.jitter_ms > self.delay_ms:
            raise ValueError(f"Link.delay_ms/jitter_ms need 0 <= jitter <= delay, got {self}")


@dataclass
class Host:
    """A simulated machine: its own namespace, address and access link."""

    bed: NetBed
    name: str
    index: int
    link: Link
    nat: bool = False
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def namespace(self) -> str:
        return f"{self.bed.prefix}-{self.name}"

    @property
    def address(self) -> str:
        return f"10.77.{self.index}.2"

    @property
    def router_port(self) -> str:
        return f"h{self.index}-rt"

    def command(self, command: Sequence[str]) -> list[str]:
        """``command`` as run inside this host."""
        return ["ip", "netns", "exec", self.namespace, *command]

    def run(self, *command: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(self.command(command), capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise NetBedError(f"{self.name}: {' '.join(command)} failed ({done.returncode}): {done.stderr}")
        return done

    def popen(self, command: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start ``command`` inside this host, in its own process group; killed at teardown."""
        kwargs.setdefault("cwd", REPO_ROOT)
        process = subprocess.Popen(self.command(command), start_new_session=True, **kwargs)
        self.processes.append(process)
        return process


class NetBed:
    """Hosts in network namespaces behind one router namespace; use as a context manager."""

    def __init__(self, max_seconds: float = 1800.0):
        self.prefix = f"{PREFIX}x{os.getpid()}x{time.monotonic_ns() % 100000}"
        self.router = f"{self.prefix}-router"
        self.hosts: dict[str, Host] = {}
        self.forwarders: list[subprocess.Popen] = []
        self.max_seconds = max_seconds  # forwarders stop by themselves after this, whatever happens
        remove_stale_namespaces()
        try:
            self._namespace(self.router)
            self._in(self.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            # the router owns 10.77.N.1 on hN-rt only: it must not answer ARP for it on hN-in/hN-out
            self._in(self.router, "sysctl", "-qw", "net.ipv4.conf.all.arp_ignore=1")
        except BaseException:
            self.close()
            raise

    # -- building -------------------------------------------------------------------------------------

    def add_host(self, name: str, link: Link | None = None, nat: bool = False, seed: int = 0) -> Host:
        """A new host on its own access link. ``nat=True``: behind NAT, no inbound connections."""
        if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", name) or name in self.hosts or name == "router":
            raise ValueError(f"host name must be new, short lowercase letters/digits, got {name!r}")
        link = link or Link()
        host = Host(self, name, len(self.hosts) + 1, link, nat)
        self.hosts[name] = host
        ns, r, i = host.namespace, self.router, host.index
        self._namespace(ns)
        run("ip", "-n", r, "link", "add", f"h{i}-in", "type", "veth", "peer", "name", "eth0", "netns", ns)
        run("ip", "-n", r, "link", "add", f"h{i}-out", "type", "veth", "peer", "name", f"h{i}-rt")
        run("ip", "-n", ns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        run("ip", "-n", r, "addr", "add", f"10.77.{i}.1/24", "dev", f"h{i}-rt")
        for namespace, device in ((ns, "eth0"), (r, f"h{i}-in"), (r, f"h{i}-out"), (r, f"h{i}-rt")):
            # large offloaded frames could not pass the forwarder's sockets
            self._in(namespace, "ethtool", "-K", device, "tso", "off", "gso", "off", "gro", "off",
                     "tx", "off", "rx", "off")  # fmt: skip
            run("ip", "-n", namespace, "link", "set", device, "up")
        for device in (f"h{i}-in", f"h{i}-out"):  # the forwarder's ends: no IP, no ARP, all frames
            run("ip", "-n", r, "link", "set", device, "arp", "off", "promisc", "on")
        run("ip", "-n", ns, "route", "add", "default", "via", f"10.77.{i}.1")
        if link.rate_mbit is not None:
            self._shape(ns, "eth0", link)
            self._shape(r, f"h{i}-rt", link)
        if link.loss > 0:
            for direction in ("-i", "-o"):
                self._in(r, "iptables", "-A", "FORWARD", direction, f"h{i}-rt", "-m", "statistic",
                         "--mode", "random", "--probability", f"{link.loss:.6f}", "-j", "DROP")  # fmt: skip
        if nat:
            self._in(r, "iptables", "-t", "nat", "-A", "POSTROUTING", "-s", f"10.77.{i}.0/24",
                     "!", "-d", f"10.77.{i}.0/24", "-j", "MASQUERADE")  # fmt: skip
            self._in(r, "iptables", "-A", "FORWARD", "-o", f"h{i}-rt", "-m", "conntrack",
                     "--ctstate", "NEW", "-j", "DROP")  # fmt: skip
        forwarder = subprocess.Popen(
            ["ip", "netns", "exec", r, sys.executable, "-m", "tests.netbed.forwarder",
             f"h{i}-in", f"h{i}-out", "--delay-ms", str(link.delay_ms),
             "--jitter-ms", str(link.jitter_ms), "--seed", str(seed + i),
             "--max-seconds", str(self.max_seconds)],
            cwd=REPO_ROOT, start_new_session=True, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.forwarders.append(forwarder)
        if forwarder.stdout.readline().strip() != "forwarding":
            raise NetBedError(f"the link emulator of host {name} did not start (exit {forwarder.wait()})")
        return host

    def _namespace(self, name: str) -> None:
        run("ip", "netns", "add", name)
        self._in(name, "ip", "link", "set", "lo", "up")
        # no IPv6 autoconfiguration chatter on the emulated links
        self._in(name, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
        self._in(name, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")

    def _shape(self, namespace: str, device: str, link: Link) -> None:
        rate_bytes = link.rate_mbit * 1e6 / 8
        burst = max(16_000, int(rate_bytes / 250))  # at least a 4 ms burst at 250 Hz timers
        self._in(namespace, "tc", "qdisc", "replace", "dev", device, "root", "tbf",
                 "rate", f"{link.rate_mbit}mbit", "burst", str(burst),
                 "latency", f"{link.queue_ms}ms")  # fmt: skip

    @staticmethod
    def _in(namespace: str, *command: str) -> subprocess.CompletedProcess:
        return run("ip", "netns", "exec", namespace, *command)

    # -- faults ---------------------------------------------------------------------------------------

    def _partition_rules(self, host: Host) -> list[list[str]]:
        return [["FORWARD", direction, host.router_port, "-j", "DROP"] for direction in ("-i", "-o")]

    def partition(self, host: Host) -> None:
        """Cut ``host`` off from every other host (it keeps running; its packets go nowhere)."""
        for rule in self._partition_rules(host):
            self._in(self.router, "iptables", "-I", rule[0], "1", *rule[1:])

    def heal(self, host: Host) -> None:
        for rule in self._partition_rules(host):
            self._in(self.router, "iptables", "-D", *rule)

    def _split_rules(self, side: Sequence[Host], other: Sequence[Host]) -> list[list[str]]:
        return [
            ["FORWARD", "-i", a.router_port, "-o", b.router_port, "-j", "DROP"]
            for x, y in ((side, other), (other, side))
            for a in x
            for b in y
        ]

    def split(self, side: Sequence[Host], other: Sequence[Host]) -> None:
        """Cut every host of ``side`` off from every host of ``other``; each side still reaches itself."""
        for rule in self._split_rules(side, other):
            self._in(self.router, "iptables", "-I", rule[0], "1", *rule[1:])

    def join(self, side: Sequence[Host], other: Sequence[Host]) -> None:
        """Undo :meth:`split`."""
        for rule in self._split_rules(side, other):
            self._in(self.router, "iptables", "-D", *rule)

    # -- teardown -------------------------------------------------------------------------------------

    def namespaces(self) -> list[str]:
        return [self.router, *(h.namespace for h in self.hosts.values())]

    def close(self) -> None:
        """Kill every process in the bed's namespaces, then delete them (their links go with them)."""
        for process in [*(p for h in self.hosts.values() for p in h.processes), *self.forwarders]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
        for namespace in self.namespaces():
            delete_namespace(namespace)

    def __enter__(self) -> NetBed:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def kill_namespace_processes(namespace: str, timeout: float = 10.0) -> None:
    """SIGKILL whatever runs in ``namespace`` (processes a test started there and their children)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = run("ip", "netns", "pids", namespace, check=False).stdout.split()
        if not listed:
            return
        for pid in listed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.05)  # the kill's own latency: poll until the namespace is empty


def delete_namespace(namespace: str) -> None:
    if not (NETNS_DIR / namespace).exists():
        return
    kill_namespace_processes(namespace)
    run("ip", "netns", "del", namespace, check=False)


def remove_stale_namespaces() -> None:
    """Namespaces of test beds whose test process is gone (killed before its teardown)."""
    if not NETNS_DIR.exists():
        return
    for path in NETNS_DIR.iterdir():
        match = re.match(rf"{PREFIX}x(\d+)x", path.name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            delete_namespace(path.name)
