"""One torchft DiLoCo replica for ``bench/vs_torchft.py``: the run spec's model, data and optimizers on torchft 0.2.0.

Started as torchft's own DiLoCo example starts a replica group of one process (``torchrun --nproc_per_node 1``
sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; the bench sets them itself), with
``TORCHFT_LIGHTHOUSE`` naming the lighthouse: a ``Manager`` over ``ProcessGroupGloo`` with a synchronous quorum,
and ``DiLoCo(manager, [model], inner, outer, sync_every=H)``. It builds what ``run-peer`` builds from the same
spec: the model (``stage.build_model``), the batches (``PeerDataStream`` in the order of ``--data-seed``, the
seed a ``run-peer`` with the same identity walks), inner AdamW with the spec's ``optimizer`` and outer SGD with
its ``averaging.outer_lr``, ``outer_momentum`` and ``nesterov``. It trains until the manager has committed
``max_global_steps`` outer steps, then saves the model's weights (the global weights: DiLoCo leaves them in the
model after a sync).

``--timings`` gets one JSON line per inner step, as ``bench/vs_torchft.py``'s timed ``run-peer`` writes them:
``start`` and ``end`` (unix seconds) of the whole iteration (batch, forward, backward, inner step with DiLoCo's
hooks, zero_grad) and ``outer``: whether this iteration ended an outer step (the H-th: DiLoCo's quorum,
all-reduce and outer step ran in its ``optimizer.step()``), then ``committed`` (the manager's count of outer steps).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from potluck.peer.training.data import PeerDataStream
from potluck.peer.training.stages import make_stage, stage_context
from potluck.peer.training.stages.data import stage_data
from potluck.protocols.runspec import load_run_spec

MISSING = "torchft is missing: `make bench-vs-torchft` installs the bench's extra (vs-torchft) and runs it"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-spec", type=Path, required=True)
    p.add_argument("--replica-id", required=True)
    p.add_argument("--replicas", type=int, required=True, help="min_replica_size: every round holds them all")
    p.add_argument("--data-seed", type=int, required=True)
    p.add_argument("--timings", type=Path, required=True)
    p.add_argument("--weights-out", type=Path, required=True)
    args = p.parse_args(argv)
    try:
        from torchft import Manager, ProcessGroupGloo
        from torchft.local_sgd import DiLoCo
    except ImportError:
        print(MISSING, file=sys.stderr)
        return 2

    spec = load_run_spec(args.run_spec)
    torch.manual_seed(spec.seed)
    device = torch.device("cpu")
    context = stage_context(spec, device, None)
    data = PeerDataStream(
        spec.data, context.tokenizer, spec.batch.per_peer_batch_size, stage_data(spec, context.tokenizer)
    )
    stage = make_stage(spec.stage, context)
    model = stage.build_model()
    opt, averaging = spec.optimizer, spec.averaging
    inner = torch.optim.AdamW(model.parameters(), lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay)
    outer = torch.optim.SGD(
        model.parameters(),
        lr=averaging.outer_lr,
        momentum=averaging.outer_momentum,
        nesterov=averaging.nesterov and averaging.outer_momentum > 0,
    )

    def load_state_dict(state: dict) -> None:
        model.load_state_dict(state["model"])
        inner.load_state_dict(state["inner_optimizer"])

    def state_dict() -> dict:
        return {"model": model.state_dict(), "inner_optimizer": inner.state_dict()}

    manager = Manager(
        pg=ProcessGroupGloo(),
        min_replica_size=args.replicas,
        load_state_dict=load_state_dict,
        state_dict=state_dict,
        replica_id=args.replica_id,
        use_async_quorum=False,  # DiLoCo needs the synchronous quorum
        # torchft's advice for replicas whose weights start identical (here: the same model files): with the
        # default (True) the first quorum, at the H-th step, made every replica but one load that one's model and
        # AdamW state, throwing their first H steps away (held-out loss 1.08 against run-peer's 1.22, 2 replicas)
        init_sync=False,
    )
    batches = data.batches(args.data_seed)
    H = averaging.inner_steps
    taken = 0
    with args.timings.open("w") as timings, DiLoCo(manager, [model], inner, outer, sync_every=H):
        while manager.current_step() < spec.max_global_steps:
            start = time.time()
            loss = stage.loss(model, next(batches))
            loss.backward()
            inner.step()  # the H-th: quorum, all-reduce of the pseudo-gradients, outer step
            inner.zero_grad(set_to_none=True)
            taken += 1
            line = {"start": start, "end": time.time(), "outer": taken % H == 0, "loss": float(loss.detach())}
            timings.write(json.dumps({**line, "committed": manager.current_step()}) + "\n")
            timings.flush()
    args.weights_out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.weights_out)
    manager.shutdown(wait=False)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    sys.exit(main())
