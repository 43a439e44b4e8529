"""The strategy of a peer with nothing of its own to average: a shard client whose adapter lives on the servers.

With a ``lora`` run the client holds no trainable tensor: its backward passes train the servers' span adapters,
which the replicas of each span average among themselves (``peer/shard/server/adapters.py``). Each of its local
steps is then one of its global steps, and it counts them alone."""

from __future__ import annotations

from potluck.peer.averaging.strategy import AveragingStrategy, SwarmProgress


class NothingToAverage(AveragingStrategy):
    def __init__(self, target_batch_size: int):
        self.target_batch_size = target_batch_size
        self._global_step = 0

    @property
    def global_step(self) -> int:
        return self._global_step

    def load_state_from_peers(self) -> int | None:
        return None  # the state is the servers'

    def peers_in_run(self) -> int:
        return 1

    def step(self, batch_size: int) -> bool:
        self._global_step += 1
        return True

    def zero_grad(self) -> None:
        """No tensors of its own: nothing to zero."""

    def progress(self) -> SwarmProgress:
        return SwarmProgress(self._global_step, 1, 0, self.target_batch_size, 0.0)

    def state_dict(self) -> dict:
        return {"global_step": self._global_step}

    def load_state_dict(self, state: dict) -> None:
        self._global_step = int(state["global_step"])

    def settle(self) -> None:
        """Nothing runs in the background."""

    def shutdown(self) -> None:
        """Nothing to stop."""
