"""The shared training loop never trains on, nor averages, a NaN or Inf loss: it skips such batches up to
``optimizer.max_nonfinite_losses`` and then stops the peer with one line (``run-peer`` exits 1); in a swarm the
peer that stops leaves, and the others train on."""

from __future__ import annotations

import json
import math
import shutil
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from potluck.peer.averaging.strategy import AveragingStrategy, SwarmProgress
from potluck.peer.training.data import PeerDataStream
from potluck.peer.training.loop import NonFiniteLossError, Trainer
from potluck.peer.training.metrics import PeerMetrics
from potluck.peer.training.progress import ProgressDisplay
from potluck.peer.training.stages.sft import SupervisedFineTuning
from potluck.protocols.runspec import DataSpec
from tests.helpers import address_of_a_peer_not_started


class LocalSteps(AveragingStrategy):
    """One peer and no swarm: every local batch is a global step of plain AdamW. The loop's seam without a DHT;
    it records what reached it."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.optimizer = torch.optim.AdamW(params, lr=1e-3)
        self.steps = 0
        self.stop_requested = False
        self.gradients_finite: list[bool] = []

    @property
    def global_step(self) -> int:
        return self.steps

    def step(self, batch_size: int) -> bool:
        grads = [
            p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None
        ]
        self.gradients_finite.append(all(bool(torch.isfinite(g).all()) for g in grads))
        self.optimizer.step()
        self.steps += 1
        return True

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def request_stop(self) -> None:
        self.stop_requested = True

    def progress(self) -> SwarmProgress:
        return SwarmProgress(self.steps, 1, 0, 1, math.nan)

    def load_state_from_peers(self) -> int | None:
        return None

    def peers_in_run(self) -> int:
        return 1

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def settle(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


def write_sums(path, rows: int):
    path.write_text(
        "".join(json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) + "\n" for i in range(rows))
    )
    return path


def poisoned_trainer(tiny_assets, tmp_path, nan_at: set[int], max_nonfinite_losses: int, steps: int = 5):
    """A trainer whose model's final norm turns NaN on the local steps ``nan_at`` (1-based): a forward hook, as a
    diverged weight or an overflow would."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets["model"])
    model = AutoModelForCausalLM.from_pretrained(tiny_assets["model"])
    forwards = [0]

    def poison(module, inputs, output):
        forwards[0] += 1
        return output * math.nan if forwards[0] in nan_at else output

    model.model.norm.register_forward_hook(poison)
    path = write_sums(tmp_path / "rows.jsonl", 8)
    strategy = LocalSteps([p for p in model.parameters() if p.requires_grad])
    trainer = Trainer(model=model, stage=SupervisedFineTuning(), strategy=strategy,
                      batches=PeerDataStream(DataSpec(path=str(path)), tokenizer, 4).batches(0),
                      device=torch.device("cpu"), max_global_steps=steps, metrics=PeerMetrics("run"),
                      progress=ProgressDisplay(steps, interval=60), stop=threading.Event(),
                      max_nonfinite_losses=max_nonfinite_losses)  # fmt: skip
    return trainer, strategy, model


def all_finite(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.unit
def test_a_nan_loss_stops_the_loop_with_one_line_before_it_reaches_the_strategy(tiny_assets, tmp_path):
    trainer, strategy, model = poisoned_trainer(tiny_assets, tmp_path, nan_at={3}, max_nonfinite_losses=0)
    with pytest.raises(NonFiniteLossError) as stopped:
        trainer.run()
    message = str(stopped.value)
    assert message.startswith("the loss is nan at local step 3 (global step 2): stopping")
    assert "optimizer.max_nonfinite_losses is 0" in message and "\n" not in message
    assert strategy.steps == 2 and strategy.gradients_finite == [True, True]  # no NaN gradient was handed on
    assert strategy.stop_requested  # rounds still running get seconds, not their timeouts, as the peer leaves
    assert trainer.metrics.latest["nonfinite_losses"] == 1
    assert all_finite(model)


@pytest.mark.unit
def test_nonfinite_losses_up_to_the_limit_are_skipped_and_counted(tiny_assets, tmp_path):
    trainer, strategy, model = poisoned_trainer(tiny_assets, tmp_path, nan_at={2, 4}, max_nonfinite_losses=2)
    result = trainer.run()
    assert (result.global_step, result.local_steps, trainer.nonfinite_losses) == (5, 5, 2)
    assert math.isfinite(result.last_loss) and all(strategy.gradients_finite) and all_finite(model)
    assert trainer.metrics.latest["nonfinite_losses"] == 2


@pytest.mark.timeout(180)
def test_a_peer_whose_loss_is_nan_leaves_the_swarm_and_the_other_trains_on(tiny_assets, make_spec, local_swarm,
                                                                           tmp_path):  # fmt: skip
    """Peer ``b`` holds a corrupted copy of the base model (a NaN in a frozen weight, which the LoRA run never
    downloads from the swarm): its first loss is NaN. It exits 1 with one line and leaves; ``a`` finishes alone.
    ``b`` lives about a second, so ``a`` may never see it online: ``a``'s wait for two peers is bounded."""
    corrupted = tmp_path / "corrupted-model"
    shutil.copytree(tiny_assets["model"], corrupted)
    weights = load_file(corrupted / "model.safetensors")
    weights["model.norm.weight"][0] = math.nan
    save_file(weights, corrupted / "model.safetensors", metadata={"format": "pt"})
    rows = write_sums(
        tmp_path / "rows.jsonl", 64
    )  # a few rows: the peers start sooner than on the task's 20,000
    run = {"adapter": {"kind": "lora", "r": 4}, "max_global_steps": 3, "data": {"path": str(rows)}}
    swarm = local_swarm(make_spec(**run))
    # both start at once (their imports take most of the time): b dials a's address, known in advance
    address, listen, identity = address_of_a_peer_not_started(tmp_path)
    # a waits a while for b, whose life is short: when a busy machine lets a miss it, a starts alone after 20 s
    wait_for_b = ["--min-peers", "2", "--min-peers-timeout", "20"]
    healthy = swarm.start_peer(
        "a", [*wait_for_b, "--identity-path", str(identity), "--host-maddrs", listen], initial_peers=[]
    )
    nan_spec = make_spec(**run, model={"name_or_path": str(corrupted)})
    broken = swarm.start_peer(
        "b", ["--run-spec", str(nan_spec), "--min-peers", "2"], initial_peers=[address], use_spec=False
    )

    assert broken.process.wait(timeout=120) == 1, broken.log()[-3000:]
    summary = broken.summary()
    assert summary.exit_reason.startswith("error: NonFiniteLossError: the loss is nan at local step 1"), (
        summary
    )
    assert summary.nonfinite_losses == 1 and summary.local_steps == 0
    log = broken.log()
    assert "run-peer: the loss is nan at local step 1" in log and "Traceback" not in log, log[-3000:]

    assert healthy.process.wait(timeout=60) == 0, healthy.log()[-3000:]
    kept_on = healthy.summary()
    assert (kept_on.exit_reason, kept_on.global_step) == ("finished", 3), kept_on
    assert "Traceback" not in healthy.log(), healthy.log()[-3000:]
