"""The whole swarm stops and restarts from its checkpoints (issue #7, acceptance 7): training goes on
from the global step it had reached, with the optimizer's state, and the loss does not jump.

tests/test_swarm.py covers one peer resuming alone; here every peer of a two-peer swarm stops and
they resume together, each from its own ``--save-dir`` and ``--identity-path``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from potluck.peer.training.checkpoint import list_checkpoints
from potluck.peer.training.exact_match import evaluate_spec
from potluck.protocols.runspec import load_run_spec
from tests.helpers import start_first

pytestmark = pytest.mark.slow

FIRST, SECOND = 5, 8  # global steps of the first run and of the run after the restart
MAX_JUMP = 1.05  # the acceptance: the loss does not jump by more than 5 %


def checkpoints(save_dir: Path) -> dict[int, Path]:
    return {c.global_step: c.path for c in list_checkpoints(save_dir)}


def run_swarm(swarm, tmp_path: Path, max_steps: int, tag: str) -> list:
    """Both peers, started together (--min-peers 2), until --max-steps; they must leave cleanly."""

    def args(name: str) -> list[str]:
        return ["--save-dir", str(tmp_path / name), "--min-peers", "2", "--max-steps", str(max_steps)]

    first, address = start_first(swarm, f"a-{tag}", args("a"), tmp_path, identity=tmp_path / "a.id")
    identity = ["--identity-path", str(tmp_path / "b.id")]
    peers = [first, swarm.start_peer(f"b-{tag}", [*args("b"), *identity], initial_peers=[address])]
    for peer in peers:
        assert peer.process.wait(timeout=300) == 0, peer.log()[-3000:]
    return peers


@pytest.mark.timeout(900)
def test_whole_swarm_restart_resumes_from_checkpoints(make_spec, local_swarm, tmp_path):
    spec_path = make_spec(max_global_steps=100000, checkpoint={"save_every": 1, "keep": 0})
    swarm = local_swarm(spec_path)
    run_swarm(swarm, tmp_path, FIRST, "first")
    before_stop = {name: set(checkpoints(tmp_path / name)) for name in ("a", "b")}
    for name in ("a", "b"):
        assert max(before_stop[name]) == FIRST

    # every peer stopped; the swarm restarts from the peers' own checkpoints
    again = run_swarm(swarm, tmp_path, SECOND, "again")
    for name, peer in zip(("a", "b"), again, strict=True):
        summary = peer.summary()
        assert summary.resumed_from == FIRST, peer.log()[-3000:]
        # the global step went on from FIRST: the run after the restart wrote FIRST+1 .. SECOND
        written = sorted(set(checkpoints(tmp_path / name)) - before_stop[name])
        assert written[0] == FIRST + 1 and written[-1] == SECOND, written
        assert summary.global_step == SECOND, peer.log()[-2000:]

    # the loss on held-out problems right after the restart's first global step, against the last
    # checkpoint before the stop: a restart that lost the optimizer's state (Adam's moments) or the
    # learning-rate schedule's position would jump here
    spec = load_run_spec(spec_path)
    before = evaluate_spec(spec, checkpoint=checkpoints(tmp_path / "a")[FIRST]).loss
    after = evaluate_spec(spec, checkpoint=checkpoints(tmp_path / "a")[FIRST + 1]).loss
    print(
        f"\nheld-out loss at global step {FIRST} (before the stop) {before:.4f}, at {FIRST + 1} {after:.4f}"
    )
    assert after <= before * MAX_JUMP, (before, after)
