"""Measure what a test bed's links deliver: RTT (ping), TCP rate and UDP loss between two hosts.

``python -m tests.netbed.measure`` (root) builds a bed with home-like links and prints what was asked
next to what was measured; docs/reliability.md records its output.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys

from tests.netbed.bed import Host, Link, NetBed


def ping_times(source: Host, target: Host, count: int = 20) -> list[float]:
    """Round-trip times in ms of ``count`` pings 50 ms apart (lost ones are missing)."""
    out = source.run("ping", "-n", "-c", str(count), "-i", "0.05", "-W", "2", target.address, check=False)
    return [float(t) for t in re.findall(r"time=([\d.]+) ms", out.stdout)]


def reachable(source: Host, target: Host) -> bool:
    return (
        source.run("ping", "-n", "-c", "2", "-i", "0.2", "-W", "1", target.address, check=False).returncode
        == 0
    )


def _probe(*args: str) -> list[str]:
    return [sys.executable, "-m", "tests.netbed.probe", *args]


def _start_sink(host: Host, *args: str) -> subprocess.Popen:
    sink = host.popen(_probe(*args), stdout=subprocess.PIPE, text=True)
    if sink.stdout.readline().strip() != "listening":
        raise RuntimeError(f"the probe on {host.name} did not start")
    return sink


def tcp_transfer(source: Host, target: Host, size: int, port: int = 5201) -> dict:
    """Send ``size`` bytes over one TCP connection; the receiver's bytes, seconds and view of the sender."""
    sink = _start_sink(target, "tcp-sink", str(port))
    source.run(*_probe("tcp-source", target.address, str(port), str(size)))
    return json.loads(sink.stdout.readline())


def tcp_mbit(source: Host, target: Host, size: int) -> float:
    result = tcp_transfer(source, target, size)
    return result["bytes"] * 8 / result["seconds"] / 1e6


def udp_loss(
    source: Host, target: Host, count: int = 2000, per_second: float = 2000, port: int = 5301
) -> float:
    """Fraction of ``count`` paced UDP datagrams that did not arrive."""
    sink = _start_sink(target, "udp-sink", str(port), str(count))
    source.run(*_probe("udp-source", target.address, str(port), str(count), str(per_second)))
    return 1 - json.loads(sink.stdout.readline())["received"] / count


def main() -> None:
    home = Link(rate_mbit=50, delay_ms=10, jitter_ms=2, loss=0.005)
    print("| link of each host (asked) | measured between two such hosts |")
    print("| --- | --- |")
    with NetBed() as bed:
        a, b = bed.add_host("a", home), bed.add_host("b", home, seed=1)
        times = ping_times(a, b, 50)
        print(
            f"| 10 ms ± 2 ms each way: RTT 40 ms | ping ×50: min {min(times):.1f}, "
            f"median {statistics.median(times):.1f}, max {max(times):.1f} ms |"
        )
        up, down = tcp_mbit(a, b, 6_000_000), tcp_mbit(b, a, 6_000_000)
        print(f"| 50 Mbit/s | TCP, 6 MB one connection: {up:.1f} Mbit/s a→b, {down:.1f} Mbit/s b→a |")
        lost = udp_loss(a, b, 4000)
        print(f"| 0.5 % loss each direction: 1.0 % on a path | UDP ×4000 a→b: {lost * 100:.2f} % lost |")


if __name__ == "__main__":
    main()
