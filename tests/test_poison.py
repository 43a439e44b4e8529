"""A peer that sends NaN into the averaging never corrupts another's state (issue 17): the others' reducers
refuse its parts, each honest peer refuses the NaN averages of its reducer, and they train on."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import start_first
from tests.test_swarm import checkpoint_at

pytestmark = pytest.mark.slow

POISON_PEER = Path(__file__).resolve().parents[1] / "bench" / "poison_peer.py"
"""run-peer that attacks the averaging (its first argument) every N-th local step (its second)."""


@pytest.mark.timeout(300)
def test_a_peer_sending_nan_gradients_leaves_the_others_finite_and_training(make_spec, local_swarm, tmp_path):
    steps = 8
    swarm = local_swarm(make_spec(max_global_steps=steps, checkpoint={"save_every": 1, "keep": 0}))
    first, address = start_first(
        swarm, "a", ["--save-dir", str(tmp_path / "a"), "--min-peers", "3"], tmp_path
    )
    honest = [
        first,
        swarm.start_peer(
            "b", ["--save-dir", str(tmp_path / "b"), "--min-peers", "3"], initial_peers=[address]
        ),
    ]
    poisoner = swarm.start_peer(
        "nan", ["--min-peers", "3"], initial_peers=[address], entry=(str(POISON_PEER), "nan", "2")
    )
    for peer in honest:
        assert peer.process.wait(timeout=240) == 0, peer.log()[-3000:]
    poisoner.process.wait(timeout=60)

    assert any("averaging: refused" in peer.log() for peer in honest), [p.log()[-2000:] for p in honest]
    for peer in honest:
        assert peer.summary().global_step == steps, peer.log()[-3000:]
        assert all(math.isfinite(e["loss"]) for e in peer.events("global_step")), peer.events("global_step")
        weights = load_file(checkpoint_at(tmp_path / peer.name, steps) / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values())
