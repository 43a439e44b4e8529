"""``run-peer`` that poisons the averaging: ``python bench/poison_peer.py EVERY [run-peer flags...]``.

A broken or malicious peer (issue 17): every EVERY-th local step, after its backward pass, its gradients
are set to NaN before the averaging strategy accumulates them, so NaN goes into the swarm's gradient
all-reduce while its loss still looks fine. For ``tests/test_poison.py``
(``LocalSwarm.start_peer(entry=(path of this file, "2"))``) and attack benchmarks.

The poison is injected here, by wrapping ``GradientAveraging.step`` before run-peer's own ``main`` runs,
so that ``run-peer`` itself has no attack branch.
"""

from __future__ import annotations

import math
import sys


def main(argv: list[str]) -> int:
    from potluck.peer import cli
    from potluck.peer.averaging.gradient import GradientAveraging

    every, run_peer_args = int(argv[0]), argv[1:]
    original_init, original_step = GradientAveraging.__init__, GradientAveraging.step

    def init(self, spec, dht, params, listener):
        original_init(self, spec, dht, params, listener)
        self.poisoned_params, self.local_steps = list(params), 0

    def step(self, batch_size: int) -> bool:
        self.local_steps += 1
        if self.local_steps % every == 0:
            for p in self.poisoned_params:
                if p.grad is not None:
                    p.grad.fill_(math.nan)
        return original_step(self, batch_size)

    GradientAveraging.__init__, GradientAveraging.step = init, step
    return cli.main(run_peer_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
