"""A peer forked from the warm template (``tools/warm_peers.py``) answers as a launched ``run-peer`` does: its
errors, exit codes, signals, own session and output, and random numbers of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from potluck.peer.results import read_events
from tests.conftest import WARM_PEERS
from tests.helpers import wait_until

pytestmark = pytest.mark.integration


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def test_a_forked_peer_reports_a_bad_flag_as_run_peer_does(tmp_path):
    launched = subprocess.run(
        [sys.executable, "-m", "potluck.peer.launch", "--no-such-flag"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    log = tmp_path / "bad.log"
    forked = WARM_PEERS.start(["--no-such-flag"], log, _env())
    assert forked.wait(timeout=120) == launched.returncode == 2
    assert "unrecognized arguments: --no-such-flag" in log.read_text() and log.read_text() == launched.stderr


def _start_lone_peer(tmp_path, spec_path, name: str):
    """A forked peer that waits for a second one, once it joined (the test kills it), and its results file."""
    results = tmp_path / f"{name}.events.jsonl"
    argv = ["--run-spec", str(spec_path), "--min-peers", "2", "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
            "--results", str(results)]  # fmt: skip
    return WARM_PEERS.start(argv, tmp_path / f"{name}.log", _env()), results


def test_a_forked_peer_leads_its_own_session_and_ends_by_a_signal(tmp_path, make_spec):
    peer, results = _start_lone_peer(tmp_path, make_spec(), "lone")
    try:
        wait_until(lambda: read_events(results), 120, "the lone peer to join")
        assert os.getpgid(peer.pid) == peer.pid != os.getpgid(0)
        assert peer.poll() is None
        with pytest.raises(subprocess.TimeoutExpired):
            peer.wait(timeout=0.1)
    finally:
        os.killpg(peer.pid, signal.SIGKILL)
    assert peer.wait(timeout=30) == -signal.SIGKILL


def test_forked_peers_draw_their_own_random_numbers(tmp_path):
    """Forks of one template share its state; a fresh interpreter seeds ``random`` and numpy from the OS."""
    draws = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.txt"
        process = WARM_PEERS.context.Process(target=_draw, args=(str(out),))
        process.start()
        process.join(60)
        draws.append(out.read_text().split())
    assert all(a != b for a, b in zip(*draws, strict=True)), draws  # random, numpy, torch


def _draw(path: str) -> None:
    import random

    import numpy
    import torch

    from potluck.tools.warm_peers import fresh_random_state

    fresh_random_state()
    with open(path, "w") as f:
        f.write(f"{random.random()} {numpy.random.random()} {torch.rand(1).item()}")


def test_a_fork_that_dies_holding_hiveminds_locks_leaves_later_peers_starting(tmp_path, make_spec):
    """Forks of one template shared the cross-process locks hivemind makes at import: a peer killed while one of its
    processes held one (the fault tests' ``kill -9`` and ``SIGSTOP``) left every later peer waiting at its DHT's
    start (CI: four tests' peers printed no join address in 120 s)."""
    holder = WARM_PEERS.context.Process(target=_die_holding_hiveminds_locks)
    holder.start()
    holder.join(60)
    assert holder.exitcode == -signal.SIGKILL
    peer, results = _start_lone_peer(tmp_path, make_spec(), "next")
    try:
        wait_until(lambda: read_events(results), 120, "the next forked peer to join")
    finally:
        os.killpg(peer.pid, signal.SIGKILL)
        peer.wait(timeout=30)


def _die_holding_hiveminds_locks() -> None:
    from hivemind.utils.mpfuture import MPFuture, SharedBytes

    for lock in (MPFuture._update_lock, MPFuture._initialization_lock, SharedBytes._lock):
        lock.acquire()
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_forked_peer_renews_every_cross_process_lock_and_counter_its_imports_made(tmp_path):
    """Every ``multiprocessing`` lock or shared value a module or class holds once the template imported the peer
    is a new one after ``start_own_family``: a new upstream one fails here, named."""
    out = tmp_path / "shared.txt"
    process = WARM_PEERS.context.Process(target=_list_shared_after_renewal, args=(str(out),))
    process.start()
    process.join(60)
    assert process.exitcode == 0
    found, still_shared = out.read_text().split("\n", 1)
    assert int(found) >= 6  # hivemind's four locks, allreduce's and access's counters
    assert still_shared == "", still_shared


def _list_shared_after_renewal(path: str) -> None:
    from potluck.hivemind_ext.forks import start_own_family

    before = _cross_process_objects()
    start_own_family()
    after = _cross_process_objects()
    kept = sorted(name for name, held in before.items() if after.get(name) is held)
    with open(path, "w") as f:
        f.write(f"{len(before)}\n" + "\n".join(kept))


def _cross_process_objects() -> dict[str, object]:
    """Every ``multiprocessing`` lock or shared value held by a module's or a module-level class's namespace."""
    import inspect
    import multiprocessing.sharedctypes
    import multiprocessing.synchronize

    kinds = (multiprocessing.synchronize.SemLock, multiprocessing.sharedctypes.SynchronizedBase)
    found = {}
    for module_name, module in list(sys.modules.items()):
        namespaces = [(module_name, vars(module))] if module is not None else []
        namespaces += [
            (f"{module_name}.{name}", vars(value))
            for name, value in list(namespaces[0][1].items() if namespaces else [])
            if inspect.isclass(value) and value.__module__ == module_name
        ]
        for prefix, namespace in namespaces:
            for name, value in list(namespace.items()):
                if isinstance(value, kinds):
                    found[f"{prefix}.{name}"] = value
    return found
