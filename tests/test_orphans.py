"""A peer killed with SIGKILL takes its helper processes with it, and can restart in its own place."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from potluck.tools.coordinator_process import free_port
from tests.helpers import in_signal_set, start_first, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.cold_peers]  # counts its helpers by their command lines


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def alive(processes: list[psutil.Process]) -> list[str]:
    """Those still running (zombies count as dead: only their exit status is left)."""
    names = []
    for proc in processes:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                names.append(f"{proc.pid} {' '.join(proc.cmdline())[:100]}")
        except psutil.NoSuchProcess:
            pass
    return names


@pytest.mark.timeout(300)
def test_kill_9_leaves_no_helper_processes_and_the_peer_restarts_in_place(make_spec, local_swarm, tmp_path):
    spec_path = make_spec(
        max_global_steps=100000, batch={"target_batch_size": 128, "per_peer_batch_size": 64}
    )
    swarm = local_swarm(spec_path)
    first, address = start_first(swarm, "a", ["--min-peers", "2"], tmp_path)
    port = free_port()
    mine = ["--host-maddrs", f"/ip4/127.0.0.1/tcp/{port}", "--identity-path", str(tmp_path / "b.id")]
    victim = swarm.start_peer("b", ["--min-peers", "2", *mine], initial_peers=[address])
    # training together: the DHT, both averagers and p2pd are all running by the first step
    wait_until(lambda: victim.events("global_step"), 240, "b's first global step")
    helpers = descendants(victim.process.pid)
    commands = [" ".join(p.cmdline()) for p in helpers]
    assert any("p2pd" in c for c in commands), commands
    assert sum("potluck.peer.launch" in c for c in commands) >= 3, commands  # DHT + 2 averagers

    os.kill(victim.process.pid, signal.SIGKILL)
    victim.process.wait(timeout=10)
    wait_until(lambda: not alive(helpers), 15, "the killed peer's helpers to exit")

    again = swarm.start_peer("b-again", ["--min-peers", "2", *mine])
    address = swarm.wait_for_address(again)
    assert f"/tcp/{port}/" in address
    assert again.peer_id() is not None, again.log()[-3000:]
    assert again.peer_id() == victim.peer_id(), "--identity-path did not keep the peer id"
    # it listens on its old port and is back in the run: it downloads the state from the peer that stayed
    wait_until(
        lambda: any(e["global_step"] >= 1 for e in again.events("state_loaded")),
        180,
        "the restarted peer to load the swarm's state",
    )
    assert first.running, first.log()[-3000:]


@pytest.mark.timeout(300)
def test_sigterm_to_the_whole_process_group_ends_a_waiting_peer_within_10_s(make_spec, local_swarm, tmp_path):
    """``kill -TERM -- -PGID`` (systemd's way of stopping a service) also ends libp2p's daemon: a lone peer
    waiting for its partners then waited forever on a DHT call, 15 minutes after the signal. Now its leave
    has a deadline (``runtime/leaving.py``) and it says where it was stuck."""
    swarm = local_swarm(make_spec(max_global_steps=100000))
    waiting = swarm.start_peer("waiting", ["--min-peers", "2"])
    # its stop handlers are in place once its strategy is: it then waits for a partner that will not come
    wait_until(
        lambda: in_signal_set(waiting.process.pid, "SigCgt", signal.SIGTERM),
        180,
        "the peer's SIGTERM handler",
    )
    helpers = descendants(waiting.process.pid)
    assert any("p2pd" in " ".join(p.cmdline()) for p in helpers)
    os.killpg(waiting.process.pid, signal.SIGTERM)
    signalled = time.monotonic()
    code = waiting.process.wait(timeout=60)
    assert time.monotonic() - signalled < 10, f"left {time.monotonic() - signalled:.1f} s after SIGTERM"
    assert code in (0, 128 + signal.SIGTERM), waiting.log()[-3000:]
    if code != 0:  # the leave in order did not finish: one line says where it stopped
        assert "could not leave in order within" in waiting.log().splitlines()[-1], waiting.log()[-3000:]
    wait_until(lambda: not alive(helpers), 15, "the peer's helpers to exit")


def test_watchdog_kills_what_the_parent_death_signal_cannot_reach(tmp_path):
    """A grandchild started with subprocess (no fork hook) and a child forked from a non-main thread."""
    script = tmp_path / "tree.py"
    script.write_text(
        "import os, subprocess, threading, time\n"
        "from potluck.hivemind_ext.lifeline import bind_children\n"
        "bind_children(interval=0.2)\n"
        "subprocess.Popen(['sleep', '600'])\n"
        "def fork():\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(600)\n"
        "        os._exit(0)\n"
        "threading.Thread(target=fork).start()\n"
        "if os.fork() == 0:\n"
        "    time.sleep(600)\n"
        "    os._exit(0)\n"
        "print('ready', flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert parent.stdout.readline().strip() == "ready"
        # the watchdog, `sleep`, the thread's child and the main thread's child
        children = wait_until(lambda: len(c := descendants(parent.pid)) >= 4 and c, 30, "4 children")
        parent.kill()
        parent.wait(timeout=10)
        wait_until(lambda: not alive(children), 15, "every child of the killed process to exit")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)  # its children share its group (the watchdog follows)
        parent.wait()
