"""Expert shards: mixture-of-experts layers whose experts are served by peers through ``hivemind.moe``.

- **Server** (``python -m potluck.peer.shard.moe --experts expert.0 expert.1 ...``): hivemind's MoE
  ``Server`` hosting the named experts (hivemind's ``ffn`` block, built under a seed derived from the
  uid so any peer can rebuild the same expert) and declaring them in the DHT.
- **Client** (:class:`RemoteMoEClassifier`): a small model whose middle layer is hivemind's
  ``RemoteMixtureOfExperts`` — a trainable gating projection picks the top-``k_best`` experts per
  sample by beam search over the experts declared in the DHT, calls them, and averages their outputs
  by the softmax of the gating scores. Experts that fail or miss ``forward_timeout`` are masked out
  of that average (hivemind's ``_RemoteCallMany``), so training goes on while at least ``k_min``
  experts answer for every sample; experts of a dead server drop out of the DHT when their
  declarations expire (``update_period`` × 2).

The experts themselves are frozen here (no optimizer on the server): the gating projection and the
client's own layers train through them.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

import torch
from hivemind.dht import DHT
from hivemind.moe.client.moe import RemoteMixtureOfExperts
from hivemind.moe.server import ModuleBackend, Server
from hivemind.moe.server.layers.common import FeedforwardBlock
from hivemind.utils.tensor_descr import BatchTensorDescriptor
from torch import nn

from potluck.hivemind_ext.dht import start_dht, visible_addresses
from potluck.protocols.records import record_validators

UID_PREFIX = "expert."


def expert_index(uid: str) -> int:
    if not uid.startswith(UID_PREFIX) or not uid[len(UID_PREFIX) :].isdigit():
        raise ValueError(f"--experts: {uid!r} is not of the form {UID_PREFIX}N")
    return int(uid[len(UID_PREFIX) :])


def build_expert(uid: str, hidden: int, seed: int) -> nn.Module:
    """The expert ``uid``: the same weights wherever it is built (seeded by ``seed`` and its index)."""
    torch.manual_seed(seed * 100_003 + expert_index(uid))
    return FeedforwardBlock(hidden).requires_grad_(False).eval()


def serve_experts(dht: DHT, uids: list[str], hidden: int, seed: int, update_period: float = 5.0) -> Server:
    """Start hivemind's expert server for ``uids`` in background threads; shut it down when done."""
    backends = {
        uid: ModuleBackend(
            name=uid,
            module=build_expert(uid, hidden, seed),
            args_schema=(BatchTensorDescriptor(hidden),),
            outputs_schema=BatchTensorDescriptor(hidden),
            max_batch_size=4096,
        )
        for uid in uids
    }
    server = Server(dht, backends, num_connection_handlers=2, update_period=update_period)
    server.run_in_background(await_ready=True, timeout=120)
    return server


class RemoteMoEClassifier(nn.Module):
    """``inputs → Linear → remote mixture of experts → Linear → class logits``."""

    def __init__(
        self,
        dht: DHT,
        in_features: int,
        hidden: int,
        num_experts: int,
        num_classes: int,
        k_best: int = 2,
        k_min: int = 1,
        timeout: float = 10.0,
    ):
        super().__init__()
        self.encoder = nn.Linear(in_features, hidden)
        self.moe = RemoteMixtureOfExperts(
            in_features=hidden,
            grid_size=(num_experts,),
            dht=dht,
            uid_prefix=UID_PREFIX,
            k_best=k_best,
            k_min=k_min,
            forward_timeout=timeout,
            backward_timeout=timeout,
            timeout_after_k_min=timeout,
        )
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.moe(self.encoder(inputs)))


def local_mixture(
    hidden: torch.Tensor, gating: nn.Linear, experts: dict[int, nn.Module], k: int
) -> torch.Tensor:
    """The same mixture computed in-process (the reference for tests): top-``k`` experts by gating
    score per row, outputs averaged by the softmax of their scores."""
    scores = gating(hidden)
    top_scores, top_index = scores.topk(k, dim=-1)
    weights = torch.softmax(top_scores, dim=-1)
    rows = []
    for row in range(hidden.shape[0]):
        outputs = torch.stack([experts[int(i)](hidden[row : row + 1])[0] for i in top_index[row]])
        rows.append((weights[row, :, None] * outputs).sum(0))
    return torch.stack(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Serve mixture-of-experts experts over hivemind.moe.")
    p.add_argument("--experts", nargs="+", required=True, metavar="UID", help=f"uids like {UID_PREFIX}0")
    p.add_argument("--hidden", type=int, required=True, help="the experts' input and output width")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--initial-peers", nargs="*", default=[], metavar="MADDR")
    p.add_argument("--host-maddrs", nargs="+", default=["/ip4/127.0.0.1/tcp/0"], metavar="MADDR")
    p.add_argument("--update-period", type=float, default=5.0, help="seconds between DHT declarations")
    args = p.parse_args(argv)
    try:
        for uid in args.experts:
            expert_index(uid)
    except ValueError as e:
        print(f"moe: {e}", file=sys.stderr)
        return 2
    dht = start_dht(args.initial_peers, args.host_maddrs, [], None, record_validators=record_validators(None))
    server = serve_experts(dht, args.experts, args.hidden, args.seed, args.update_period)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    addresses = visible_addresses(dht)
    print(
        f"moe: serving {' '.join(args.experts)}; others can join with --initial-peers {addresses[0]}",
        flush=True,
    )
    try:
        stop.wait()
    finally:
        server.shutdown()  # stops the DHT too
    return 0


if __name__ == "__main__":
    sys.exit(main())
