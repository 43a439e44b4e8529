"""Traffic probes for checking the test bed's links: a TCP transfer (rate) and paced UDP (loss).

Run inside hosts with ``host.popen``/``host.run``. Every probe is bounded in bytes, packets and time.

- ``python -m tests.netbed.probe tcp-sink PORT`` prints ``listening``, then, after one transfer,
  ``{"bytes": N, "seconds": T, "peer": ADDR}`` (T from the first byte to the last, ADDR the
  sender's address as seen here);
- ``python -m tests.netbed.probe tcp-source ADDR PORT BYTES``;
- ``python -m tests.netbed.probe udp-sink PORT COUNT`` prints ``listening``, then ``{"received": N}``
  once COUNT datagrams arrived or none came for 2 s;
- ``python -m tests.netbed.probe udp-source ADDR PORT COUNT PER_SECOND``.
"""

from __future__ import annotations

import json
import socket
import sys
import time

CHUNK = 64 * 1024
IDLE_SECONDS = 2.0
MAX_SECONDS = 60.0


def tcp_sink(port: int) -> dict:
    with socket.create_server(("0.0.0.0", port)) as server:
        server.settimeout(MAX_SECONDS)
        print("listening", flush=True)
        conn, peer = server.accept()
        with conn:
            conn.settimeout(MAX_SECONDS)
            received, first, last = 0, None, None
            while data := conn.recv(CHUNK):
                last = time.monotonic()
                first = first or last
                received += len(data)
    return {"bytes": received, "seconds": (last - first) if first else 0.0, "peer": peer[0]}


def tcp_source(address: str, port: int, size: int) -> None:
    payload = b"\0" * CHUNK
    with socket.create_connection((address, port), timeout=MAX_SECONDS) as conn:
        sent = 0
        while sent < size:
            conn.sendall(payload[: min(CHUNK, size - sent)])
            sent += min(CHUNK, size - sent)


def udp_sink(port: int, count: int) -> dict:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind(("0.0.0.0", port))
        sock.settimeout(MAX_SECONDS)
        print("listening", flush=True)
        received = 0
        seen = set()
        while received < count:
            try:
                data = sock.recv(2048)
            except TimeoutError:
                break
            sock.settimeout(IDLE_SECONDS)
            seen.add(int.from_bytes(data[:4], "big"))
            received = len(seen)
    return {"received": received}


def udp_source(address: str, port: int, count: int, per_second: float) -> None:
    started = time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for n in range(count):
            # pace: a burst would overflow queues and count as loss that the link did not cause
            while time.monotonic() < started + n / per_second:
                time.sleep(0.0005)
            sock.sendto(n.to_bytes(4, "big") + b"\0" * 96, (address, port))


def main(argv: list[str]) -> None:
    kind, *args = argv
    if kind == "tcp-sink":
        print(json.dumps(tcp_sink(int(args[0]))), flush=True)
    elif kind == "tcp-source":
        tcp_source(args[0], int(args[1]), int(args[2]))
    elif kind == "udp-sink":
        print(json.dumps(udp_sink(int(args[0]), int(args[1]))), flush=True)
    elif kind == "udp-source":
        udp_source(args[0], int(args[1]), int(args[2]), float(args[3]))
    else:
        raise SystemExit(f"unknown probe {kind!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
