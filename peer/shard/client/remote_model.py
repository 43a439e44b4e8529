"""A causal LM whose blocks live on shard servers: embeddings, final norm, head and the trainable
prompt stay on the client; the blocks are :meth:`ShardClient.blocks` (training) or an inference
session (generation).

It returns ``.loss``/``.logits`` like a transformers model, so the trainer's stages
(``stages/sft.py``) compute its loss unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from hivemind.dht import DHT
from torch import nn
from torch.nn import functional as F

from potluck.hivemind_ext.dht import start_dht
from potluck.hivemind_ext.keys import sign_records_with_identity
from potluck.peer.shard.blocks import ClientParts, load_client_parts, load_config, resolve_model_dir
from potluck.peer.shard.client.spans import Pass, ShardClient
from potluck.protocols.runspec import RunSpec
from potluck.protocols.shards import shard_record_validators


@dataclass
class RemoteOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


class RemoteCausalLM(nn.Module):
    """The client's trainable tensors, if any (the remote blocks stay frozen on the servers):

    - ``prompt_tokens`` > 0, prompt tuning: that many trainable input embeddings before every sequence
      (initialised from the embeddings of random vocabulary tokens under ``seed``);
    - ``prefix_tokens`` > 0, prefix tuning (as peft's): that many trainable keys and values in front of
      every block's attention (initialised N(0, 1) under ``seed``, as peft's prefix encoder), sent with
      each request and trained by the gradients the servers return for them.

    A run whose servers hold a LoRA adapter has none: the servers train it from the gradients the client
    sends back. ``adapters=False`` on :meth:`forward` leaves all of these out, the client's and the
    servers' (the base model: a DPO reference without a second copy of the model).

    Batches may be padded on either side, as ``attention_mask`` says: left pads travel to the servers
    as each row's count (positions and attention leave them out, as transformers' models do); right
    pads need nothing, since no real token attends to the pads after it."""

    def __init__(
        self,
        parts: ClientParts,
        client: ShardClient,
        prompt_tokens: int = 0,
        seed: int = 0,
        prefix_tokens: int = 0,
    ):
        super().__init__()
        if prompt_tokens and prefix_tokens:
            raise ValueError("adapter: a prompt and a prefix together are not supported")
        self.parts, self.client = parts, client
        self.prompt: nn.Parameter | None = None
        self.prefix: nn.Parameter | None = None
        generator = torch.Generator().manual_seed(seed)
        if prompt_tokens:
            ids = torch.randint(0, parts.config.vocab_size, (prompt_tokens,), generator=generator)
            self.prompt = nn.Parameter(parts.embed(ids).detach().clone())
        if prefix_tokens:
            config = parts.config
            head_size = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            shape = (config.num_hidden_layers, 2, config.num_key_value_heads, prefix_tokens, head_size)
            self.prefix = nn.Parameter(torch.randn(shape, generator=generator).to(parts.lm_head.weight.dtype))

    @property
    def device(self) -> torch.device:
        return self.parts.lm_head.weight.device

    def embed(
        self, input_ids: torch.Tensor, with_prompt: bool = True, padding: list[int] | None = None
    ) -> torch.Tensor:
        """Token embeddings, with the prompt (if any) after each row's left pads and before its tokens."""
        embeds = self.parts.embed(input_ids.to(self.device))
        if not with_prompt or self.prompt is None:
            return embeds
        if padding is None:
            return torch.cat([self.prompt.expand(input_ids.shape[0], -1, -1), embeds], dim=1)
        return torch.stack(
            [torch.cat([row[:p], self.prompt, row[p:]]) for row, p in zip(embeds, padding, strict=True)]
        )

    @property
    def prompt_length(self) -> int:
        return 0 if self.prompt is None else self.prompt.shape[0]

    def _pass(self, padding: list[int] | None, adapters: bool) -> Pass:
        if not adapters or self.prefix is None:
            return Pass(padding=padding, adapter=adapters)
        return Pass(position_offset=self.prefix.shape[3], padding=padding, prefix=self.prefix)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.parts.logits(hidden)

    def _without_prompt(self, logits: torch.Tensor, padding: list[int] | None) -> torch.Tensor:
        """The logits at the input's own positions (the prompt's left out, after each row's pads)."""
        if not self.prompt_length:
            return logits
        tokens = logits.shape[1] - self.prompt_length
        index = torch.stack(
            [torch.cat([torch.arange(p), torch.arange(p + self.prompt_length, tokens + self.prompt_length)])
             for p in (padding or [0] * logits.shape[0])]
        )  # fmt: skip
        return logits.gather(1, index[:, :, None].expand(-1, -1, logits.shape[2]).to(logits.device))

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        adapters: bool = True,
    ) -> RemoteOutput:
        padding = left_padding(attention_mask)
        embeds = self.embed(input_ids, with_prompt=adapters, padding=padding)
        if torch.is_grad_enabled() and not embeds.requires_grad:
            # nothing trainable on the client (a server-side adapter): backward must still reach the servers
            embeds = embeds.detach().requires_grad_(True)
        # the wire carries tensors from host memory; autograd takes the gradients back to the device
        hidden = self.client.blocks(embeds.cpu(), self._pass(padding, adapters)).to(self.device)
        logits = self.head(hidden)
        if adapters:
            logits = self._without_prompt(logits, padding)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(),
                labels[:, 1:].to(self.device).flatten(),
                ignore_index=-100,
            )
        return RemoteOutput(logits=logits, loss=loss)

    def without_adapters(self) -> nn.Module:
        """This model with every adapter left out, the client's and the servers': a frozen reference."""
        return _WithoutAdapters(self)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int | None = None,
        on_token: Callable[[torch.Tensor], None] | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Greedy decoding with attention caches on the servers; returns prompt + new tokens.
        ``on_token`` gets each new token column as it is produced (for streaming output). A batch of
        prompts of different lengths comes left-padded with its ``attention_mask``; a row that has
        produced ``eos_token_id`` goes on with it until every row has."""
        tokens = input_ids.cpu()
        padding = left_padding(attention_mask)
        done = torch.zeros(input_ids.shape[0], 1, dtype=torch.bool)
        how = self._pass(padding, adapters=True)
        used = self.prompt_length + how.position_offset  # positions taken by the prompt or the prefix
        with self.client.inference_session(rows=input_ids.shape[0], how=how) as session:
            hidden = session.step(self.embed(input_ids, padding=padding).cpu())
            for produced in range(1, max_new_tokens + 1):
                next_token = self.head(hidden[:, -1].to(self.device)).argmax(dim=-1, keepdim=True).cpu()
                if eos_token_id is not None:
                    next_token = next_token.masked_fill(done, eos_token_id)
                    done = done | (next_token == eos_token_id)
                tokens = torch.cat([tokens, next_token], dim=1)
                if on_token is not None:
                    on_token(next_token)
                full = tokens.shape[1] + used >= self.parts.config.max_position_embeddings
                if produced == max_new_tokens or bool(done.all()) or full:
                    break
                hidden = session.step(self.embed(next_token, with_prompt=False).cpu())
        return tokens


class _WithoutAdapters(nn.Module):
    def __init__(self, model: RemoteCausalLM):
        super().__init__()
        self.model = [model]  # not a submodule: its parameters stay the trained model's own

    def forward(self, input_ids, labels=None, attention_mask=None) -> RemoteOutput:
        return self.model[0](input_ids, labels, attention_mask, adapters=False)


def left_padding(attention_mask: torch.Tensor | None) -> list[int] | None:
    """Each row's count of left pads in a transformers ``attention_mask`` (None: no row has any).
    A row's real tokens must be contiguous: pads on the left, the right, or both."""
    if attention_mask is None:
        return None
    mask = attention_mask.bool()
    pads = (~mask).long().cumprod(dim=1).sum(dim=1)
    real = mask.sum(dim=1)
    positions = torch.arange(mask.shape[1], device=mask.device)[None]
    if not torch.equal(mask, (positions >= pads[:, None]) & (positions < (pads + real)[:, None])):
        raise ValueError(
            "attention_mask: a row has pads between its tokens (only left or right padding goes remote)"
        )
    return [int(p) for p in pads] if bool(pads.any()) else None


def join_shard_swarm(
    spec: RunSpec,
    initial_peers: list[str],
    host_maddrs: list[str] | None = None,
    client_mode: bool = True,
    identity_path: Path | None = None,
) -> DHT:
    """A DHT node of the run's shard swarm for a client or trainer (by default a DHT client: no incoming
    connections), with the run's shard record schemas. ``identity_path``: the identity this process then signs its
    records with too (a private run's client: its token names that identity's peer id); call it once per process."""
    identity = sign_records_with_identity(identity_path) if identity_path is not None else None
    return start_dht(
        initial_peers,
        host_maddrs or ["/ip4/127.0.0.1/tcp/0"],
        [],
        None,
        client_mode=client_mode,
        record_validators=shard_record_validators(None, spec.run_id),
        identity=identity,
    )


def open_remote_model(
    spec: RunSpec,
    initial_peers: list[str],
    prompt_tokens: int = 0,
    host_maddrs: list[str] | None = None,
    client_mode: bool = True,
    prefix_tokens: int = 0,
    device: torch.device | None = None,
    identity_path: Path | None = None,
    **client_options,
) -> tuple[DHT, RemoteCausalLM]:
    """Join the swarm (by default as a DHT client: no incoming connections) and build the run's model
    over its shard servers, its local parts on ``device`` (default: the CPU). Shut the client and the
    returned DHT down when done. A client that also averages with other clients (``run-peer --role
    client``) needs ``client_mode=False``: hivemind's state averager cannot share state from a DHT client."""
    model_dir = resolve_model_dir(spec.model.name_or_path, spec.model.revision)
    config, _ = load_config(model_dir)
    parts = load_client_parts(model_dir, dtype=getattr(torch, spec.model.dtype))
    dht = join_shard_swarm(spec, initial_peers, host_maddrs, client_mode, identity_path)
    client = ShardClient(dht, spec.run_id, config.num_hidden_layers, **client_options)
    model = RemoteCausalLM(
        parts, client, prompt_tokens=prompt_tokens, seed=spec.seed, prefix_tokens=prefix_tokens
    )
    return dht, model.to(device or torch.device("cpu"))
