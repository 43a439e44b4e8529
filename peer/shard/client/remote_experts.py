"""A mixture-of-experts causal LM whose experts live on expert servers: everything else trains here.

:func:`open_remote_moe_model` builds the run's model (``experts.load_without_experts``: attention, embeddings,
norms, routers and head from the checkpoint, no expert weight) with a :class:`RemoteExperts` in place of each MoE
layer's experts. The family's own sparse block still runs here: its router picks each token's top-k experts and
their gates (trainable here), and calls :class:`RemoteExperts`, which sends each expert's tokens to a server
hosting it (``expert_calls.py``, with its fault rule) and mixes the outputs by the gates. Gradients flow to the
gates and router here, and to the experts' inputs through the servers' backward, which also trains the experts
there. The model's own loss (``output_router_logits``) adds the router's load-balancing loss, as local training
does; greedy ``generate`` works as on the local model (the attention cache is local, experts are stateless).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from hivemind.dht import DHT
from torch import nn

from potluck.peer.shard.blocks import resolve_model_dir
from potluck.peer.shard.client.expert_calls import ExpertClient
from potluck.peer.shard.client.remote_model import join_shard_swarm
from potluck.peer.shard.experts import load_without_experts, moe_config, num_experts
from potluck.protocols.experts import expert_uid
from potluck.protocols.runspec import RunSpec


def renormalised(gates: torch.Tensor, answered: torch.Tensor) -> torch.Tensor:
    """The fault rule's gates: a token's gates as they are when all its experts answered, else those of the
    experts that answered rescaled to sum to one (all zero when none did). ``gates``, ``answered``:
    ``[tokens, k]``."""
    kept = gates * answered
    total = kept.sum(-1, keepdim=True)
    rescaled = kept / torch.where(total > 0, total, torch.ones_like(total))
    return torch.where(answered.all(-1, keepdim=True), gates, rescaled)


class _ExpertsCall(torch.autograd.Function):
    """``hidden [tokens, hidden]`` → each token's top-k expert outputs ``[tokens, k, hidden]`` and which of them
    answered ``[tokens, k]``, computed (and differentiated) on the expert servers."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, top_k_index: torch.Tensor, module: RemoteExperts):
        routed = {
            int(expert): torch.where(top_k_index == expert) for expert in torch.unique(top_k_index).tolist()
        }
        limit = module.capacity(top_k_index.numel())
        if limit is not None:
            for expert, (tokens, slots) in routed.items():
                if len(tokens) > limit:  # the batch's first tokens keep their place, as in Switch Transformer
                    module.client.metrics.overflow_tokens += len(tokens) - limit
                    routed[expert] = tokens[:limit], slots[:limit]
        answers = module.client.forward(
            module.layer, {e: hidden[tokens] for e, (tokens, _) in routed.items()}
        )
        outputs = hidden.new_zeros(*top_k_index.shape, hidden.shape[-1])
        answered = torch.zeros(top_k_index.shape, dtype=torch.bool, device=hidden.device)
        for expert, (tokens, slots) in routed.items():
            output, _ = answers[expert]
            if output is not None:
                outputs[tokens, slots] = output.to(hidden.device, hidden.dtype)
                answered[tokens, slots] = True
        ctx.save_for_backward(hidden)
        ctx.module = module
        ctx.idle = [e for e in range(module.count) if e not in routed]
        ctx.routed = {e: pair for e, pair in routed.items() if answers[e][0] is not None}
        ctx.served_by = {e: answers[e][1] for e in ctx.routed}
        ctx.mark_non_differentiable(answered)
        return outputs, answered

    @staticmethod
    def backward(ctx, grad_outputs: torch.Tensor, _grad_answered):
        (hidden,) = ctx.saved_tensors
        requests = {
            e: (hidden[tokens], grad_outputs[tokens, slots]) for e, (tokens, slots) in ctx.routed.items()
        }
        grads = ctx.module.client.backward(ctx.module.layer, requests, ctx.served_by, ctx.idle)
        grad_hidden = torch.zeros_like(hidden)
        for expert, grad in grads.items():
            if grad is not None:
                grad_hidden.index_add_(0, ctx.routed[expert][0], grad.to(hidden.device, hidden.dtype))
        return grad_hidden, None, None


class RemoteExperts(nn.Module):
    """The experts of MoE layer ``layer``, called like the family's experts module. ``capacity_factor``: each
    expert takes at most ``ceil(capacity_factor × token-expert pairs / experts)`` of a call's tokens; the rest
    skip it, their other gates renormalised as for a dropped expert, and are counted (``overflow_tokens``). None:
    no limit, as the local model."""

    def __init__(self, client: ExpertClient, layer: int, count: int, capacity_factor: float | None = None):
        super().__init__()
        self.client, self.layer, self.count = client, layer, count
        self.capacity_factor = capacity_factor

    def capacity(self, pairs: int) -> int | None:
        if self.capacity_factor is None:
            return None
        return max(1, math.ceil(self.capacity_factor * pairs / self.count))

    @property
    def uids(self) -> list[str]:
        return [expert_uid(self.layer, e) for e in range(self.count)]

    def forward(
        self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        outputs, answered = _ExpertsCall.apply(hidden, top_k_index, self)
        gates = renormalised(top_k_weights, answered).to(outputs.dtype)
        return (outputs * gates[..., None]).sum(1)


def open_remote_moe_model(
    spec: RunSpec,
    initial_peers: list[str],
    host_maddrs: list[str] | None = None,
    client_mode: bool = True,
    identity_path: Path | None = None,
    **client_options,
) -> tuple[DHT, nn.Module, ExpertClient]:
    """Join the swarm (by default as a DHT client) and build the run's MoE model over its expert servers, calling
    them as ``spec.expert_calls`` says (``client_options``, :class:`ExpertClient`'s, override its timeout and
    bans). Shut the client, then the DHT, down when done."""
    calls = spec.expert_calls
    options = {"request_timeout": calls.request_timeout, "ban_seconds": calls.ban_seconds, **client_options}
    model_dir = resolve_model_dir(spec.model.name_or_path, spec.model.revision)
    config, _ = moe_config(model_dir)
    dht = join_shard_swarm(spec, initial_peers, host_maddrs, client_mode, identity_path)
    try:
        client = ExpertClient(dht, spec.run_id, **options)
        count = num_experts(config)
        model = load_without_experts(
            model_dir,
            lambda layer: RemoteExperts(client, layer, count, calls.capacity_factor),
            dtype=getattr(torch, spec.model.dtype),
        )
    except BaseException:
        dht.shutdown()
        raise
    return dht, model, client
