"""``run-peer`` that attacks the averaging: ``python bench/poison_peer.py ATTACK EVERY [run-peer flags...]``.

A broken or malicious peer (issue 17). Every EVERY-th local step, after its backward pass and before the
averaging strategy takes its gradients, it applies ATTACK:

- ``nan``: its gradients become NaN (its loss still looks fine);
- ``sign_flip``: its gradients are multiplied by -10;
- ``random``: its gradients become a random direction at 1000x their norm;
- ``inflate``: it claims 1000x the samples it computed (hivemind weights a peer's gradients by its claim);
- ``label_flip``: it trains on wrong labels, every supervised token ``y`` of its batches replaced by
  ``vocab - 1 - y`` (BTARD's label flipping, for a language model): honest-looking gradients of the wrong task;
- ``stale``: it sends the gradients it computed ``STALE_STEPS`` local steps earlier (BTARD's delayed gradients).

For ``tests/test_poison.py`` (``LocalSwarm.start_peer(entry=(path of this file, "nan", "2"))``) and
``bench/attacks.py``. The attack is injected here, by wrapping ``GradientAveraging.step`` before run-peer's own
``main`` runs, so that ``run-peer`` itself has no attack branch.
"""

from __future__ import annotations

import math
import sys

import torch

ATTACKS = ("nan", "sign_flip", "random", "inflate", "label_flip", "stale")
INFLATION = 1000
STALE_STEPS = 10


def poison(attack: str, grad: torch.Tensor) -> None:
    """``attack`` applied to one gradient, in place (``inflate`` leaves gradients alone)."""
    if attack == "nan":
        grad.fill_(math.nan)
    elif attack == "sign_flip":
        grad.mul_(-10)
    elif attack == "random":
        direction = torch.randn_like(grad)
        grad.copy_(direction * (1000 * grad.norm() / direction.norm().clamp_min(1e-12)))


def main(argv: list[str]) -> int:
    from potluck.peer import cli
    from potluck.peer.averaging.gradient import GradientAveraging

    attack, every, run_peer_args = argv[0], int(argv[1]), argv[2:]
    if attack not in ATTACKS:
        print(f"poison_peer.py: ATTACK is one of {', '.join(ATTACKS)}, not {attack!r}", file=sys.stderr)
        return 2
    original_init, original_step = GradientAveraging.__init__, GradientAveraging.step
    if attack == "label_flip":
        flip_labels(every)

    def init(self, spec, dht, params, listener):
        original_init(self, spec, dht, params, listener)
        self.poisoned_params, self.local_steps, self.past = list(params), 0, []

    def step(self, batch_size: int) -> bool:
        self.local_steps += 1
        if attack == "stale":  # every step's gradients kept; the ones STALE_STEPS back sent instead
            self.past.append([p.grad.clone() if p.grad is not None else None for p in self.poisoned_params])
            old = self.past.pop(0) if len(self.past) > STALE_STEPS else None
            if old is not None and self.local_steps % every == 0:
                for p, grad in zip(self.poisoned_params, old, strict=True):
                    if p.grad is not None and grad is not None:
                        p.grad.copy_(grad)
        elif self.local_steps % every == 0:
            if attack == "inflate":
                return original_step(self, batch_size * INFLATION)
            for p in self.poisoned_params:
                if p.grad is not None:
                    poison(attack, p.grad)
        return original_step(self, batch_size)

    GradientAveraging.__init__, GradientAveraging.step = init, step
    return cli.main(run_peer_args)


def flip_labels(every: int) -> None:
    """Every ``every``-th batch the trainer's stage computes its loss on is given flipped labels."""
    from potluck.peer.roles import trainer

    original_make_stage = trainer.make_stage

    def make_stage(name, context):
        stage = original_make_stage(name, context)
        original_loss, batches = stage.loss, [0]

        def loss(model, batch):
            batches[0] += 1
            labels = batch.get("labels")
            if labels is not None and batches[0] % every == 0:
                vocab = model.get_output_embeddings().weight.shape[0]
                batch = {**batch, "labels": labels.where(labels < 0, vocab - 1 - labels)}
            return original_loss(model, batch)

        stage.loss = loss
        return stage

    trainer.make_stage = make_stage


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
