"""Start ``run-peer`` processes forked from a template that has already imported the peer: for the test suite.

Every ``run-peer`` spends 4-6 s of CPU importing torch, transformers, peft and hivemind before it reads its flags,
and the suite starts about 140 peers on 2 cores. :class:`WarmLauncher` keeps one template process
(``multiprocessing``'s fork server, which imports :mod:`potluck.tools.peer_template` once) and forks each peer
from it: the same ``potluck.peer.launch.main`` with the same arguments, in its own session, with its own log,
environment and exit code, started in a fraction of a second. :class:`WarmProcess` answers what tests ask of a
``subprocess.Popen``. A fork draws its own random numbers (:func:`fresh_random_state`) and makes its own
cross-process locks and counters (``hivemind_ext/forks.py``), as a fresh interpreter would: shared with the template's
other forks, a peer killed while holding one left every later peer of the suite's worker waiting on it.

What a forked peer does not cover, so ``LocalSwarm`` starts it the usual way: the imports themselves (and a
Ctrl-C during them: ``tests/test_cli.py``), a peer run through another command (``command_prefix``), another entry
script, and a run whose spec may quantise (the template leaves bitsandbytes out, as ``run-peer`` does for a run
that quantises nothing: ``peer/unused_libraries.py``). Its helper processes (DHT, averagers) are forks of it, so
their command lines are the template's (``tests/test_orphans.py`` starts its peers the usual way).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

FRESH_START_METHOD = multiprocessing.get_all_start_methods()[0]
"""The ``multiprocessing`` start method of a fresh interpreter here (``fork`` on Linux before Python 3.14)."""
TEMPLATE = "potluck.tools.peer_template"
CLONE_NEWNET = 0x40000000  # <linux/sched.h>
"""What the template process imports before it forks a peer."""


class WarmProcess:
    """A forked peer, answering as a ``subprocess.Popen`` does (``pid``, ``poll``, ``wait``, ``send_signal``,
    ``returncode``: negative for a signal)."""

    def __init__(self, process: multiprocessing.Process, args: list[str]):
        self._process = process
        self.args = args
        self.pid: int = process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._process.exitcode

    def send_signal(self, sig: int) -> None:
        if self._process.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class WarmLauncher:
    """Forks ``run-peer`` processes from one template process (started at the first peer, about 6 s)."""

    def __init__(self) -> None:
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload([TEMPLATE])

    @staticmethod
    def can_start(argv: Sequence[str]) -> bool:
        """Whether a peer with these ``run-peer`` arguments runs as it would when launched: its spec (named by
        ``--run-spec``) quantises nothing, so bitsandbytes is not missed."""
        from potluck.peer.unused_libraries import quantises_nothing

        return quantises_nothing(argv)

    def start(
        self, argv: Sequence[str], log_path: Path, env: dict[str, str], netns: str | None = None
    ) -> WarmProcess:
        """``run-peer argv`` with ``env`` as its whole environment, its output appended to ``log_path``; in the
        network namespace ``netns`` (as ``ip netns exec`` names it) if given."""
        process = self.context.Process(
            target=_run_peer,
            args=(list(argv), str(log_path), dict(env), netns),
            name=f"run-peer {log_path.stem}",
        )
        process.start()
        return WarmProcess(process, [sys.executable, "-m", "potluck.peer.launch", *argv])


def fresh_random_state() -> None:
    """Seed ``random``, numpy's and torch's global generators from the OS, as a fresh interpreter does: forks of one
    template would all draw the same numbers."""
    import random

    import numpy
    import torch

    random.seed()
    numpy.random.seed()
    torch.seed()


def enter_network_namespace(name: str) -> None:
    """Move this process, which must have one thread, into the network namespace ``ip netns`` calls ``name``: its
    sockets and every process it starts from now on are there (the network part of ``ip netns exec``)."""
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into network namespace {name!r}")
    finally:
        os.close(fd)


def _run_peer(argv: list[str], log_path: str, env: dict[str, str], netns: str | None) -> None:
    """In the forked peer: become what ``subprocess.Popen(start_new_session=True)`` would have started."""
    if netns is not None:
        enter_network_namespace(netns)
    os.setsid()
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.environ.clear()
    os.environ.update(env)
    for stream in (sys.stdout, sys.stderr):  # PYTHONUNBUFFERED, as the template's streams were made before
        stream.reconfigure(line_buffering=True, write_through=True)
    fresh_random_state()
    # a fresh interpreter forks (hivemind's DHT and averagers); the fork server left its own method as the default
    multiprocessing.set_start_method(FRESH_START_METHOD, force=True)
    import torch

    from potluck.hivemind_ext.forks import start_own_family
    from potluck.peer import launch

    start_own_family()  # the template's cross-process locks are every fork's: a peer killed holding one hung the rest

    if "OMP_NUM_THREADS" in env:  # read by the template's torch when it loaded, not by the fork
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.argv = [launch.__file__, *argv]  # as ``python -m potluck.peer.launch`` sets it
    launch.main(argv)  # ends the process itself (launch.exit_now)
