"""A userspace link emulator: forwards Ethernet frames between two interfaces, each held for a delay.

This kernel has no ``netem`` qdisc, so delay and jitter are made here: frames read from one interface
(an ``AF_PACKET`` socket) are sent out of the other after ``delay ± jitter`` milliseconds, in both
directions. Frames never overtake each other (a frame leaves no earlier than the one before it), as
on a real link, so jitter does not turn into reordering that TCP would punish.

Bandwidth and loss are not done here: ``tc tbf`` and ``iptables -m statistic`` do them in the kernel
(see :mod:`tests.netbed.bed`). NOTE: segmentation offloads must be off on both interfaces (and on the
veths behind them), or the kernel hands over frames larger than the MTU that cannot be sent on.

Run in the namespace that holds both interfaces:
``python -m tests.netbed.forwarder IF_A IF_B --delay-ms 10 --jitter-ms 2``.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import select
import socket
import time
from collections import deque

from potluck.hivemind_ext.lifeline import set_parent_death_signal

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4  # frames this socket's interface sends (ours among them): not to be forwarded
MAX_FRAME = 65536
SOCKET_BUFFER = 8 << 20  # a burst at line rate must not overflow while frames wait


def open_interface(name: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((name, 0))
    for option in (33, 32):  # SO_RCVBUFFORCE, SO_SNDBUFFORCE (root may exceed the sysctl caps)
        sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
    sock.setblocking(False)
    return sock


def forward(a: str, b: str, delay: float, jitter: float, seed: int, max_seconds: float | None) -> None:
    """Forward until killed (or for ``max_seconds``). ``delay`` and ``jitter`` are in seconds."""
    rng = random.Random(seed)
    ends = [open_interface(a), open_interface(b)]
    print("forwarding", flush=True)  # the bed waits for this before it uses the link
    other = {ends[0]: ends[1], ends[1]: ends[0]}
    waiting: dict[socket.socket, deque] = {end: deque() for end in ends}  # frames read from an end
    last_departure = dict.fromkeys(ends, 0.0)
    stop_at = time.monotonic() + max_seconds if max_seconds else None
    while stop_at is None or time.monotonic() < stop_at:
        heads = [queue[0][0] for queue in waiting.values() if queue]
        timeout = max(0.0, min(heads) - time.monotonic()) if heads else 1.0
        readable, _, _ = select.select(ends, [], [], timeout)
        now = time.monotonic()
        for end in readable:
            while True:
                try:
                    frame, address = end.recvfrom(MAX_FRAME)
                except BlockingIOError:
                    break
                if address[2] == PACKET_OUTGOING:
                    continue
                departure = max(last_departure[end], now + max(0.0, delay + rng.uniform(-jitter, jitter)))
                last_departure[end] = departure
                waiting[end].append((departure, frame))
        for end, queue in waiting.items():
            while queue and queue[0][0] <= now:
                # a full queue on the way out drops the frame, as a router would
                with contextlib.suppress(OSError):
                    other[end].send(queue.popleft()[1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay, each direction")
    p.add_argument("--jitter-ms", type=float, default=0.0, help="delay varies uniformly by ± this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=None, help="stop by itself after this long")
    args = p.parse_args(argv)
    set_parent_death_signal()  # a test bed that died without its teardown leaves no forwarder running
    forward(args.a, args.b, args.delay_ms / 1000, args.jitter_ms / 1000, args.seed, args.max_seconds)


if __name__ == "__main__":
    main()
