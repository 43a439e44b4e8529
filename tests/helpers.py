"""Helpers shared by the multi-process tests: wait on a condition, read Prometheus text, a peer address
nobody serves yet."""

from __future__ import annotations

import contextlib
import re
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path


def wait_until(condition, timeout: float, what: str, interval: float = 0.3):
    """Poll ``condition`` until it returns something truthy (returned) or ``timeout`` passes."""
    from potluck.tools.peer_processes import wait_on

    return wait_on(condition, timeout, f"timed out waiting for {what}", every=interval)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def metric(text: str, name: str) -> float | None:
    """The value of the first series of ``name`` in Prometheus exposition ``text``."""
    match = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def peer_id_of(identity: Path) -> str:
    """The peer id of the identity file ``identity``, which is created first unless it exists."""
    from hivemind.p2p import P2P, PeerID

    if not identity.exists():
        P2P.generate_identity(str(identity))
    return str(PeerID.from_identity(identity.read_bytes()))


def address_of_a_peer_not_started(tmp_path: Path, identity: Path | None = None) -> tuple[str, str, Path]:
    """A libp2p peer that nobody runs yet: (its multiaddr to dial, the address to listen on, its
    identity file: ``identity``, created unless it exists). Start it later with that identity and
    address, or never."""
    from potluck.tools.coordinator_process import free_port

    identity = identity or tmp_path / "not-started.id"
    listen = f"/ip4/127.0.0.1/tcp/{free_port()}"
    return f"{listen}/p2p/{peer_id_of(identity)}", listen, identity


def start_first(swarm, name: str, args: list[str], folder: Path, identity: Path | None = None, **kwargs):
    """Start ``swarm``'s first peer ``name`` on an address chosen in advance: ``(the peer, its address)``.
    Its partners start at once with ``initial_peers=[address]`` (a node dials its initial peers until
    they answer) instead of waiting out the first peer's imports and model load for its address, which
    is seconds of every swarm test. ``identity``: its identity file (default ``folder/NAME.id``)."""
    address, listen, identity = address_of_a_peer_not_started(folder, identity or folder / f"{name}.id")
    peer = swarm.start_peer(
        name, [*args, "--identity-path", str(identity), "--host-maddrs", listen], initial_peers=[], **kwargs
    )
    return peer, address


def start_pairs(local_swarm, make_spec, tmp_path: Path, runs: dict[str, dict]) -> dict:
    """A pair of real peers for each run of ``runs`` (its name: the spec's overrides), all started at once
    (:func:`start_first`). Each pair has its own run (``run_id`` is its name) and averages as a fixed
    pair; its peers ``a`` and ``b`` save into ``tmp_path/NAME/a`` and ``.../b``. The swarms, by name;
    :func:`finished_pairs` waits for them."""
    swarms = {}
    for name, overrides in runs.items():
        folder = tmp_path / name
        folder.mkdir()
        spec_path = make_spec(run_id=name, averaging={"target_group_size": 2}, **overrides)
        swarm = swarms[name] = local_swarm(spec_path)
        _, address = start_first(swarm, "a", ["--save-dir", str(folder / "a"), "--min-peers", "2"], folder)
        swarm.start_peer("b", ["--save-dir", str(folder / "b"), "--min-peers", "2"], initial_peers=[address])
    return swarms


def finished_pairs(swarms: dict, timeout: float = 360):
    """(name, a, b) of each pair of :func:`start_pairs`, once both its peers have exited 0."""
    for name, swarm in swarms.items():
        assert swarm.wait_all(timeout=timeout) == [0, 0], name + "\n".join(
            p.log()[-3000:] for p in swarm.peers
        )
        yield name, *swarm.peers


def checkpoint_of(save_dir: Path, step: int) -> Path:
    """The folder of the checkpoint of global step ``step`` in ``save_dir`` (fails naming the steps there)."""
    from potluck.peer.training.checkpoint import list_checkpoints

    found = {c.global_step: c.path for c in list_checkpoints(save_dir)}
    assert step in found, f"no checkpoint of step {step} in {save_dir}: {sorted(found)}"
    return found[step]


def global_step_losses(peers) -> list[float]:
    """The swarm's loss at each global step: the mean over the peers' batches of that step."""
    per_peer = [[e["loss"] for e in peer.events("global_step")] for peer in peers]
    return [sum(step) / len(step) for step in zip(*per_peer, strict=True)]


def recent_steps(peer, last: int = 8) -> str:
    """A failure's detail: a peer's last global steps, each with its round (outcome, group) or how it was
    reached (a state download: no round), and its state downloads."""
    events = [e for e in peer.events() if e["event"] in ("global_step", "state_download")][-last:]
    return f"{peer.name}'s last steps: " + "; ".join(
        f"{e['global_step']} {(e['round'] or {}).get('outcome', 'no round')}/{(e['round'] or {}).get('group_size')}"
        if e["event"] == "global_step"
        else f"download {e['outcome']}"
        for e in events
    )


def swarm_story(peers) -> str:
    """A failure's detail for a swarm that should have learned: each peer's loss every 5th global step, its last
    steps (:func:`recent_steps`) and its summary (rounds by outcome, state loads, local steps, samples)."""
    return "\n".join(
        f"{peer.name}: losses "
        + " ".join(
            f"{e['global_step']}:{e['loss']:.3f}"
            for e in peer.events("global_step")
            if e["global_step"] % 5 == 0
        )
        + f"\n{recent_steps(peer, last=12)}\n{peer.name}'s summary: {peer.summary()}"
        for peer in peers
    )


class QuietListener:
    """An averaging listener that records nothing (tests that read the models instead of the metrics)."""

    def averaging_round(self, *args, **kwargs) -> None: ...

    def state_download(self, *args) -> None: ...


def in_signal_set(pid: int, field: str, signum: int) -> bool:
    """Whether ``signum`` is in the process's ``field`` set of /proc/PID/status, the kernel's view of it: ``SigIgn``
    (ignored) or ``SigCgt`` (caught by a handler)."""
    with open(f"/proc/{pid}/status") as status:
        mask = next(int(line.split()[1], 16) for line in status if line.startswith(f"{field}:"))
    return bool(mask & (1 << (signum - 1)))


def outcomes_of(controls, timeout: float) -> list:
    """What each averaging round of ``controls`` (``averager.step(wait=False)``, started together) ended with: its
    gathered data, or the exception it raised (no group found, or the round failed)."""
    outcomes = []
    for control in controls:
        try:
            outcomes.append(control.result(timeout=timeout))
        except Exception as e:  # noqa: BLE001 (how a round ended is what the tests look at)
            outcomes.append(e)
    return outcomes


def all_averaged(outcomes, size: int) -> bool:
    """Whether every round of ``outcomes`` (``outcomes_of``) averaged in one group of ``size`` and got all of it."""
    from potluck.hivemind_ext.rounds import group_of, received_fraction

    return all(
        isinstance(o, dict) and len(group_of(o)) == size and received_fraction(o) == 1.0 for o in outcomes
    )


@contextlib.contextmanager
def loopback_averagers(
    classes_and_values: Sequence, size: int, prefix: str, clients: Sequence[int] = (), **options
) -> Iterator[list]:
    """One real hivemind averager per (class, value) in this process, each on its own DHT node of one loopback
    DHT, averaging one tensor: the value's, or ``size`` elements filled with it; those at the indices ``clients``
    in client mode (as behind NAT); ``options`` override the averagers' timings. All shut down at the end."""
    import torch

    from potluck.hivemind_ext.dht import start_dht

    settings = {"min_matchmaking_time": 1.0, "request_timeout": 0.5, "allreduce_timeout": 10.0,
                "next_chunk_timeout": 2.0, **options}  # fmt: skip
    dhts, averagers = [], []
    try:
        for index, (cls, value) in enumerate(classes_and_values):
            initial = [str(a) for a in dhts[0].get_visible_maddrs()] if dhts else []
            dhts.append(start_dht(initial, ["/ip4/127.0.0.1/tcp/0"], [], None, client_mode=index in clients))
            tensor = value if isinstance(value, torch.Tensor) else torch.full((size,), float(value))
            averagers.append(cls([tensor], dhts[-1], prefix=prefix, start=True, **settings))
        yield averagers
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in reversed(dhts):
            dht.shutdown()
