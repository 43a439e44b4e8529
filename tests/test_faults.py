"""The swarm keeps training through crashes, restarts, partitions and NAT, on links shaped like homes.

Every peer runs in its own simulated host (tests/netbed): 50 Mbit/s, 10 ms each way (40 ms RTT
between two peers), ±2 ms jitter, 0.5 % loss per direction (about 1 % on a peer-to-peer path).
Parameters are compared through the checkpoints each peer writes at every global step. The times
the tests print (kill → next step, catch-up) are recorded in docs/reliability.md.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from potluck.peer.training.checkpoint import list_checkpoints
from tests.helpers import metric, peer_id_of, recent_steps, wait_until
from tests.netbed import Host, Link

pytestmark = [pytest.mark.netns, pytest.mark.slow]

HOME = Link(rate_mbit=50, delay_ms=10, jitter_ms=2, loss=0.005)
PORT = 31337
# a full round trip through the emulated links takes 40 ms, and the loaded CI machine adds more:
# matchmaking gets 2 s (the loopback tests use 0.5 s)
AVERAGING = {"matchmaking_time": 2.0, "averaging_timeout": 20, "load_state_timeout": 30}
TOLERANCE = 1e-5
PARTITION_SECONDS = 30


def steps(save_dir: Path) -> dict[int, Path]:
    return {c.global_step: c.path for c in list_checkpoints(save_dir)} if save_dir.exists() else {}


@functools.lru_cache(maxsize=512)  # a checkpoint folder never changes once it exists (atomic rename)
def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model.safetensors")


def difference(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def common_steps(*save_dirs: Path) -> list[int]:
    return sorted(set.intersection(*(set(steps(d)) for d in save_dirs)))


def scrape_in(host: Host, port: int) -> str:
    """A peer's metrics endpoint listens on its host's loopback: read it from inside."""
    code = f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics').read().decode())"
    return host.run(sys.executable, "-c", code, check=False).stdout


def succeeded_rounds(text: str) -> float:
    # NOTE: reads the Prometheus exposition (the live counter of a running peer), not a log line
    match = re.search(r'^potluck_averaging_rounds_total\{[^}]*outcome="succeeded"[^}]*\} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


class HomeSwarm:
    """Peers in netbed hosts, each with its own save dir and identity, listening on its host's address."""

    def __init__(self, local_swarm, spec_path: Path, workdir: Path):
        self.swarm, self.workdir = local_swarm(spec_path), workdir

    def save_dir(self, host: Host) -> Path:
        return self.workdir / host.name

    def address(self, host: Host) -> str:
        """Where ``host``'s peer listens, known before it starts: its partners need not wait for it."""
        return f"/ip4/{host.address}/tcp/{PORT}/p2p/{peer_id_of(self.workdir / f'{host.name}.id')}"

    def start(self, host: Host, *args: str, name: str | None = None, initial_peers=None):
        peer_args = [
            "--host-maddrs", f"/ip4/{host.address}/tcp/{PORT}",
            "--identity-path", str(self.workdir / f"{host.name}.id"),
            "--save-dir", str(self.save_dir(host)),
            *args,
        ]  # fmt: skip
        return self.swarm.start_peer(
            name or host.name, peer_args, initial_peers=initial_peers, netns=host.namespace
        )


def home_spec(make_spec) -> Path:
    return make_spec(
        max_global_steps=10000,
        batch={"target_batch_size": 256, "per_peer_batch_size": 64},
        checkpoint={"save_every": 1, "keep": 0},  # every global step, all kept: what the test compares
        averaging=AVERAGING,
    )


def equal_to_the_swarm(mine: Path, donors: list[Path]) -> bool:
    """Equal to one of the donors, within the spread the donors have among themselves."""
    spread = max(difference(donors[0], d) for d in donors)
    return min(difference(mine, d) for d in donors) <= max(TOLERANCE, spread)


def all_equal(step: int, *save_dirs: Path) -> bool:
    first, *others = (steps(d)[step] for d in save_dirs)
    return all(difference(first, other) <= TOLERANCE for other in others)


def alignment(mine: Path, theirs: Path, last: int = 6) -> str:
    """A failure's detail: how a peer's last checkpoints compare with another peer's of the same and the
    neighbouring steps (tells a peer a step behind, or one that averages apart, from one never back)."""
    own, other = steps(mine), steps(theirs)
    lines = [f"{mine.name}'s last checkpoints against {theirs.name}'s (max |difference|):"]
    for step in sorted(own)[-last:]:
        near = [
            f"{theirs.name}{s}: {difference(own[step], other[s]):.1e}"
            for s in (step - 1, step, step + 1)
            if s in other
        ]
        lines.append(f"  {mine.name}{step}  " + ("  ".join(near) or "none of its steps"))
    return "\n".join(lines)


def latest(save_dir: Path) -> int:
    return max(steps(save_dir), default=-1)


@pytest.mark.timeout(600)
def test_home_swarm_survives_nat_a_partition_a_kill_and_a_restart(netbed, make_spec, local_swarm, tmp_path):
    """One swarm through the acceptance scenarios in turn (starting a swarm is the slow part):
    a and b are public, c sits behind NAT in client mode."""
    a, b = netbed.add_host("a", HOME, seed=1), netbed.add_host("b", HOME, seed=2)
    c = netbed.add_host("c", HOME, nat=True, seed=3)
    swarm = HomeSwarm(local_swarm, home_spec(make_spec), tmp_path)
    # a's address (its identity file made now) before a starts: a would make its own, another one
    metrics_port, initial = 9400, [swarm.address(a)]  # each host has its own loopback
    peer_a = swarm.start(a, "--min-peers", "3", initial_peers=[])
    peer_b = swarm.start(b, "--min-peers", "3", "--metrics-port", str(metrics_port), initial_peers=initial)
    peer_c = swarm.start(
        c, "--min-peers", "3", "--client-mode", "--metrics-port", str(metrics_port), initial_peers=initial
    )
    dir_a, dir_b, dir_c = (swarm.save_dir(h) for h in (a, b, c))

    # 1. training progresses and the peers hold equal parameters after global steps. NOTE: a peer whose
    # gradient round fails (a timeout on the loaded machine) steps with its local gradients and differs
    # until the next state averaging pulls it back, so not every step is equal: count them.
    def equal_steps() -> list[int]:
        return [s for s in common_steps(dir_a, dir_b, dir_c) if all_equal(s, dir_a, dir_b, dir_c)]

    wait_until(lambda: len(equal_steps()) >= 3, 300, "3 global steps with equal parameters on all peers")
    print(
        f"\nequal on all 3 peers: {len(equal_steps())} of {len(common_steps(dir_a, dir_b, dir_c))} global steps"
    )

    # 5. behind NAT, in client mode, c's gradients are averaged with the others' (rounds that succeeded)
    text = wait_until(
        lambda: (t := scrape_in(c, metrics_port)) and succeeded_rounds(t) >= 1 and t,
        60,
        "the NAT peer's successful averaging rounds",
    )
    assert metric(text, "potluck_samples_total") > 0
    rounds, seconds = (
        metric(text, "potluck_averaging_round_seconds_count"),
        metric(text, "potluck_averaging_round_seconds_sum"),
    )
    print(
        f"the NAT peer's averaging rounds: {rounds:.0f}, mean {seconds / max(rounds, 1):.2f} s "
        f"(deadline {AVERAGING['averaging_timeout']} s)"
    )

    # 4. partition b for 30 s, and until a and c have gone on for 2 global steps without it; heal: b
    # rejoins and converges back
    netbed.partition(b)
    cut_at, cut_time = latest(dir_a), time.monotonic()
    wait_until(
        lambda: latest(dir_a) >= cut_at + 2 and time.monotonic() - cut_time >= PARTITION_SECONDS,
        120 + PARTITION_SECONDS,
        "a and c to go on without b",
    )
    netbed.heal(b)
    healed_at, after = time.monotonic(), latest(dir_a)
    print(f"partition: {healed_at - cut_time:.1f} s, a went from global step {cut_at} to {after}")
    rounds_at_heal = succeeded_rounds(scrape_in(b, metrics_port))

    # b is back *with* the swarm: averaging with it again, at its global step, with its parameters. (A
    # state round can still meet one of the next step, which leaves peers an update apart until the
    # next one: so the test waits for its newest step to be equal, and prints how many were.)
    def rejoined() -> int | None:
        if (
            succeeded_rounds(scrape_in(b, metrics_port)) < rounds_at_heal + 3
            or latest(dir_b) < latest(dir_a) - 1
        ):
            return None
        shared = [s for s in common_steps(dir_a, dir_b) if s > after]
        newest = shared[-1] if shared else None  # after its rounds, not only the state it downloaded
        equal = newest is not None and difference(steps(dir_a)[newest], steps(dir_b)[newest]) <= TOLERANCE
        return newest if equal else None

    try:
        step = wait_until(
            rejoined, 180, "b to average with the swarm again, at its step, with its parameters"
        )
    except TimeoutError as timeout:
        raise TimeoutError(f"{timeout}\n{alignment(dir_b, dir_a)}") from None
    shared = [s for s in common_steps(dir_a, dir_b) if s > after]
    gaps = [difference(steps(dir_a)[s], steps(dir_b)[s]) for s in shared]
    print(
        f"\nheal → b averaging with the swarm again (global step {step}): {time.monotonic() - healed_at:.1f} s; "
        f"a vs b after the heal: {sum(g <= TOLERANCE for g in gaps)} of {len(gaps)} steps equal, "
        f"largest gap {max(gaps):.1e}"
    )
    assert peer_a.running and peer_b.running and peer_c.running, "nobody crashes"

    # 2. kill -9 b mid-training: a and c reach the next global step
    reached = max(latest(dir_a), latest(dir_c))
    os.kill(peer_b.process.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    wait_until(
        lambda: min(latest(dir_a), latest(dir_c)) > reached, 120, "a and c to pass the step of the kill"
    )
    print(f"kill -9 → both survivors past the global step of the kill: {time.monotonic() - killed_at:.1f} s")

    # ... and the crash corrupts neither: they hold equal parameters again (a round the kill cut short
    # can leave them apart until the next full one)
    def survivors_equal() -> int | None:
        newest = max(common_steps(dir_a, dir_c), default=-1)
        return newest if newest > reached and all_equal(newest, dir_a, dir_c) else None

    try:
        settled = wait_until(survivors_equal, 120, "a and c to hold equal parameters again after the kill")
    except TimeoutError as timeout:
        raise TimeoutError(
            f"{timeout}\n{alignment(dir_c, dir_a)}\n{recent_steps(peer_a)}\n{recent_steps(peer_c)}"
        ) from None
    print(f"kill -9 → a and c equal again at global step {settled}: {time.monotonic() - killed_at:.1f} s")

    # 3. b restarts with the same identity and address and loads the swarm's state before its first
    # step; --max-steps 1 is already reached, so it saves what it downloaded and leaves
    restarted_at = time.monotonic()
    again = swarm.start(b, "--max-steps", "1", name="b-again", initial_peers=[peer_a.join_address()])
    assert again.process.wait(timeout=180) == 0, again.log()[-3000:]
    print(f"restart → swarm state downloaded and saved: {time.monotonic() - restarted_at:.1f} s")
    loads = again.summary().state_loads
    assert loads, again.log()[-3000:]
    downloaded = loads[0].global_step
    assert downloaded > reached
    wait_until(lambda: min(latest(dir_a), latest(dir_c)) >= downloaded, 60, "the donors' checkpoints")
    mine = steps(dir_b)[latest(dir_b)]
    assert equal_to_the_swarm(mine, [steps(dir_a)[downloaded], steps(dir_c)[downloaded]])
    assert peer_a.running and peer_c.running


@pytest.mark.timeout(300)
def test_sigterm_while_downloading_the_state_over_a_slow_link_exits_within_seconds(netbed, make_spec, local_swarm,
                                                                                  tmp_path):  # fmt: skip
    """A newcomer on a 1 Mbit/s link takes half a minute to download the tiny model's state (weights and
    Adam's statistics, about 4 MB). SIGTERM then waited out the download (up to load_state_timeout per
    attempt); it now ends the download and the peer leaves within seconds, having trained nothing."""
    a, slow = (
        netbed.add_host("a", HOME, seed=1),
        netbed.add_host("slow", Link(rate_mbit=1, delay_ms=10), seed=2),
    )
    swarm = HomeSwarm(local_swarm, home_spec(make_spec), tmp_path)
    donor = swarm.start(a)
    swarm.swarm.wait_for_address(donor, timeout=180)
    wait_until(lambda: donor.events("global_step"), 120, "the donor's first global step")
    newcomer = swarm.start(slow)
    wait_until(lambda: "state download: from" in newcomer.log(), 180, "the newcomer's state download")
    newcomer.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert newcomer.process.wait(timeout=60) == 0, newcomer.log()[-3000:]
    assert time.monotonic() - signalled < 10, f"left {time.monotonic() - signalled:.1f} s after SIGTERM"
    summary = newcomer.summary()
    assert (summary.exit_reason, summary.local_steps) == ("signal", 0), summary
    log = newcomer.log()
    assert "state download: left unfinished, this peer is leaving" in log and "Traceback" not in log, log[
        -3000:
    ]
    assert donor.running
