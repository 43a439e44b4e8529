"""gRPC's fork handlers, turned off in every Potluck process before gRPC starts.

Potluck processes fork after using gRPC: ``run-peer --coordinator`` asks the coordinator for the run,
then hivemind forks its DHT and averager processes; the test process forks DHTs after the coordinator
tests' servers and channels. The gRPC core in grpcio runs handlers around every ``fork()`` that stop and
restart its threads, and under load one of them never returned: a ``make test`` process hung for 17
minutes inside ``fork()`` in gRPC's handler (``py-spy dump --native``: ``fork`` → ``cygrpc`` →
``syscall``), where ``tests/test_moe.py`` started a DHT. No Potluck child uses a gRPC channel or server
it inherited (children are hivemind's DHT and averager processes, or ``fork`` + ``exec``), so the
handlers are not needed. The variable is read when gRPC initialises; importing this module first (the
``protocols`` and ``coordinator`` packages do) sets it for this process and every process it starts.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
