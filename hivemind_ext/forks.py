"""A process forked from a template that imported hivemind starts a process family of its own.

hivemind makes ``multiprocessing`` locks when it is imported: ``MPFuture``'s update and initialization locks and
``SharedBytes``'s, taken whenever a future is made or resolved across processes (a DHT telling its peer it is
ready, every DHT call), and ``_AsyncContextWrapper``'s executor lock. This folder makes shared counters the same
way (``allreduce``'s refused and capped parts, ``access``'s refusals). All are meant to be shared by one peer and
the DHT and averager processes it forks after the import. A process forked from a template that has imported them
(``tools/warm_peers.py``: the test suite's peers) shares them with every other process forked from that template:
once one peer was killed or stopped (``kill -9``, ``SIGSTOP`` in the fault tests) while one of its processes held
such a lock, every later peer of that template waited on it for good at its DHT's start, and the counters of one
peer counted the others' refusals. :func:`start_own_family` gives the process new ones, as a fresh interpreter
has; it is called in the forked process before it starts anything.
"""

from __future__ import annotations

import multiprocessing as mp

from hivemind.utils.asyncio import _AsyncContextWrapper
from hivemind.utils.mpfuture import MPFuture

from potluck.hivemind_ext import access, allreduce

UPSTREAM = {
    "hivemind.utils.mpfuture.MPFuture.reset_backend": "06cd5e31b99b4f58",  # renews MPFuture's and SharedBytes' locks
    "hivemind.utils.asyncio._AsyncContextWrapper.get_process_wide_executor": "8776276b21fb8d8a",  # its EXECUTOR_LOCK
}
"""The upstream pieces this module depends on, pinned (see ``upstream.py``)."""


def start_own_family() -> None:
    """New cross-process locks and counters for this process and those it forks from now on."""
    MPFuture.reset_backend()
    _AsyncContextWrapper.EXECUTOR_LOCK = mp.Lock()
    allreduce.renew_counters()
    access.renew_counters()
