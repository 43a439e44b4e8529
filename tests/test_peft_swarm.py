"""The PEFT methods not trained by a swarm elsewhere, each by two real peers: IA3, prefix tuning and prompt
tuning (LoRA is in most swarm tests, P-tuning in tests/test_swarm.py; tests/test_model.py covers every
method's checkpoint, resume, evaluation and generation in one process). The three pairs run at once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import checkpoint_of, finished_pairs, global_step_losses, start_pairs

ADAPTERS = {
    "ia3": {"kind": "ia3"},
    "prefix": {"kind": "prefix", "num_virtual_tokens": 4},
    "prompt_tuning": {"kind": "prompt_tuning", "num_virtual_tokens": 4},
}
STEPS = 6


@pytest.mark.timeout(420)
def test_two_peers_train_each_peft_method_to_the_same_adapter(make_spec, local_swarm, tmp_path):
    runs = {kind: {"adapter": adapter, "optimizer": {"lr": 0.05}, "max_global_steps": STEPS}
            for kind, adapter in ADAPTERS.items()}  # fmt: skip
    for kind, a, b in finished_pairs(start_pairs(local_swarm, make_spec, tmp_path, runs)):
        assert a.summary().rounds.succeeded >= 1, (kind, a.summary())
        # the swarm's loss at each global step, over both peers' batches: the last two steps' below the first
        # two's by 0.1 (their sums fell by 0.27-0.49 from about 7.7 in a run at this learning rate)
        losses = global_step_losses((a, b))
        assert len(losses) == STEPS and sum(losses[-2:]) < sum(losses[:2]) - 0.1, (kind, losses)
        saved = [adapter_files(checkpoint_of(tmp_path / kind / name, STEPS)) for name in "ab"]
        assert saved[0].keys() == saved[1].keys() and saved[0], (kind, saved[0].keys())
        for name, tensors in saved[0].items():
            assert all(torch.equal(tensors[k], saved[1][name][k]) for k in tensors), (kind, name)


def adapter_files(checkpoint: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every safetensors file of the checkpoint's adapter (prompt learning adds its prompt encoder's)."""
    return {
        f.name: load_file(f)
        for f in sorted(checkpoint.glob("*.safetensors"))
        if f.name != "model.safetensors"
    }
