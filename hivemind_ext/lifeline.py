"""A peer's helper processes die with it, even when the peer is killed with SIGKILL.

hivemind forks the DHT and the averagers from the peer process (``multiprocessing`` fork), and the
DHT process starts the libp2p daemon ``p2pd`` (an asyncio subprocess). None of them notices that the
peer died: after ``kill -9`` they kept running for minutes in a trial, and ``p2pd`` kept holding the
dead peer's port and identity, so a restarted peer could not listen there and others dialled a stale
daemon. Two layers make them follow the peer:

1. **Parent-death signal.** :func:`bind_children` registers a fork hook: every child forked by the
   main thread of this process, and recursively by theirs, asks the kernel for ``SIGKILL`` when its
   parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``). The chain peer → DHT → ``p2pd`` therefore dies
   link by link within milliseconds. (uvloop, which the DHT process runs, calls Python's fork hooks
   when it spawns ``p2pd``; the signal survives ``exec``.)
2. **Watchdog.** A small sidecar process (this file run as a script, with the peer's PID) keeps a snapshot
   of the peer's descendants, refreshed every ``interval`` seconds, and kills whatever of it
   survives the peer. It covers what the first layer cannot: children forked from other threads
   (the kernel ties the signal to the forking *thread*), spawners that skip fork hooks, and
   platforms without ``prctl``. Tune ``interval`` down if processes that live for less than it must
   be caught too; it costs one ``/proc`` scan per interval.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import psutil

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# killed without a word: torch's shared-memory manager outlives every clean exit for a while by design
QUIET = {"torch_shm_manager"}
_bound = False
_watchdog: subprocess.Popen | None = None
_fork_state = {"from_main_thread": False, "parent": 0}
SIDECAR = (
    sys.executable,
    "-I",  # neither the working directory nor PYTHON* variables change what it imports
    "-c",
    "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')",
    os.path.abspath(__file__),
)
"""The watchdog's command line, less its arguments: this file run as a script. Run as
``potluck.hivemind_ext.lifeline`` it would import the package, and with it hivemind: 1.5 s of CPU at
every peer start, for a process that needs only psutil."""


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when the thread that created it exits.

    Returns False where that is not available (not Linux, no libc)."""
    libc = _libc()
    return libc is not None and libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc if hasattr(libc, "prctl") else None
    except OSError:
        return None


def _before_fork() -> None:
    # In the child, the forking thread becomes the main thread, so remember here which it was.
    _fork_state["from_main_thread"] = threading.current_thread() is threading.main_thread()
    _fork_state["parent"] = os.getpid()


def _after_fork_in_child() -> None:
    if not _fork_state["from_main_thread"]:
        return  # the signal would fire when that thread ends, not when the process does
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != _fork_state["parent"]:
        os._exit(1)  # the parent died before the signal was armed


def bind_children(watchdog: bool = True, interval: float = 1.0) -> None:
    """Make every process this one starts from now on die with it. Idempotent; call it in the main
    thread of the peer process before hivemind forks anything (``swarm.start_dht`` does).

    ``watchdog=False`` leaves out the sidecar process (the parent-death signal alone)."""
    global _bound, _watchdog
    if _bound:
        return
    _bound = True
    _libc()  # loaded here, not in a freshly forked child
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
    if watchdog:
        _watchdog = start_watchdog(os.getpid(), interval)


def start_watchdog(pid: int, interval: float = 1.0) -> subprocess.Popen:
    """Start the sidecar that kills ``pid``'s descendants when ``pid`` dies; it exits then too.

    Returns once the sidecar watches (a fraction of a second), so nothing started afterwards escapes
    it. It runs in its own session, so a signal to the peer's process group does not kill it before
    it has done its job, and it is spawned without the fork hook (it must outlive the peer)."""
    watchdog = subprocess.Popen(
        [*SIDECAR, str(pid), str(interval)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        start_new_session=True,
        close_fds=True,
    )
    with watchdog.stdout:
        if watchdog.stdout.readline().strip() != b"watching":
            logger.warning("the lifeline watchdog did not start; helper processes rely on prctl alone")
    return watchdog


def _snapshot(root: psutil.Process) -> dict[int, float]:
    """pid → start time of ``root``'s descendants (start time guards against reused pids)."""
    found = {}
    with contextlib.suppress(psutil.Error):
        for child in root.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                found[child.pid] = child.create_time()
    found.pop(os.getpid(), None)  # the watchdog is the peer's child too
    return found


def _still_ours(known: dict[int, float]) -> list[psutil.Process]:
    procs = []
    for pid, started in known.items():
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if proc.create_time() == started and proc.status() != psutil.STATUS_ZOMBIE:
                procs.append(proc)
    return procs


def _orphans_in_group(group: int, adopters: set[int]) -> list[psutil.Process]:
    """Processes of the dead peer's process group now adopted by init (or a subreaper): those started
    too shortly before the peer died for a snapshot to see them."""
    found = []
    for proc in psutil.process_iter(["ppid"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if (
                proc.info["ppid"] in adopters
                and os.getpgid(proc.pid) == group
                and proc.status() != psutil.STATUS_ZOMBIE
            ):
                found.append(proc)
    return found


def _kill(known: dict[int, float], group: int | None, grace: float = 1.0) -> list[str]:
    # the parent-death signal is usually on its way: give it ``grace`` seconds, so that what this
    # reports is only what the first layer missed
    deadline = time.monotonic() + grace
    while (survivors := _still_ours(known)) and time.monotonic() < deadline:
        select.select([], [], [], 0.05)
    # processes they started after the last snapshot
    for proc in list(survivors):
        with contextlib.suppress(psutil.Error):
            survivors.extend(proc.children(recursive=True))
    if group is not None:
        adopters = {1}
        for proc in survivors:
            with contextlib.suppress(psutil.Error):
                adopters.add(proc.ppid())
        survivors.extend(_orphans_in_group(group, adopters))
    killed = []
    for proc in {p.pid: p for p in survivors if p.pid != os.getpid()}.values():
        with contextlib.suppress(psutil.Error):
            name = proc.name()
            proc.kill()
            if name not in QUIET:
                killed.append(name)
    return killed


def watch(pid: int, interval: float = 1.0, ready: Callable[[], None] | None = None) -> list[str]:
    """Wait for ``pid`` to exit, then kill its last known descendants. Returns the names of those killed.

    When ``pid`` leads its own process group (as under ``LocalSwarm``, ``setsid`` or a shell job),
    orphans left in that group are killed too: they cover processes started after the last snapshot.
    ``ready`` is called once the first snapshot is taken and ``pid`` is being watched."""
    try:
        root = psutil.Process(pid)
        group = pid if os.getpgid(pid) == pid and os.getpgid(0) != pid else None
    except (psutil.NoSuchProcess, ProcessLookupError):
        return []
    known = _snapshot(root)
    pidfd = None
    with contextlib.suppress(AttributeError, OSError):
        pidfd = os.pidfd_open(pid)
    if ready is not None:
        ready()
    while True:
        if pidfd is not None:
            exited = bool(select.select([pidfd], [], [], interval)[0])
        else:
            exited = not root.is_running() or root.status() == psutil.STATUS_ZOMBIE
            if not exited:
                select.select([], [], [], interval)
        if exited or not root.is_running():
            return _kill(known, group)
        known.update(_snapshot(root))
        # forget pids that exited on their own, so a reused pid is never taken for one of ours
        known = {p: t for p, t in known.items() if psutil.pid_exists(p)}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the peer's terminal is the peer's to handle

    def ready() -> None:
        print("watching", flush=True)
        os.close(sys.stdout.fileno())  # the peer reads one line, then closes its end

    killed = watch(int(args[0]), float(args[1]) if len(args) > 1 else 1.0, ready)
    if killed:
        print(f"lifeline: killed what process {args[0]} left behind: {', '.join(killed)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
