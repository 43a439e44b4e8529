"""``potluck generate``: greedy text from a run's model, locally or through its shard servers (block spans, or the
experts of a mixture-of-experts model)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from potluck.peer.shard.experts import serves_experts
from potluck.peer.training.data import Turn, encode_prompt
from potluck.peer.training.model import load_base_model, load_tokenizer
from potluck.protocols.runspec import RunSpec


@dataclass(frozen=True)
class Generation:
    text: str
    """The greedy continuation (special tokens left out)."""
    prompt: str
    """The prompt as the model got it: its tokens decoded with the special ones (BOS, chat markup) shown."""
    counters: dict = field(default_factory=dict)
    """Through shards: the client's counters (requests, failures, replays); empty locally."""


def generate_text(
    spec: RunSpec,
    prompt: Turn,
    max_new_tokens: int,
    initial_peers: list[str] | None = None,
    identity_path: Path | None = None,
    access_token: Path | None = None,
) -> Generation:
    """The prompt's greedy continuation, through shards when ``initial_peers`` are given (expert servers for a
    mixture-of-experts model, else block spans; without, the whole model is loaded here). ``prompt``: text, or a conversation for the chat template; laid out as the stages train
    (``encode_prompt``: one BOS). A private run's servers answer only with this identity's ``access_token``."""
    tokenizer = load_tokenizer(spec.model)
    ids = torch.tensor([encode_prompt(prompt, tokenizer)])
    if initial_peers is None:
        model = load_base_model(spec.model, torch.device("cpu")).eval()
        tokens = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        counters: dict = {}
    elif serves_experts(spec):
        from potluck.peer.shard.client.remote_experts import open_remote_moe_model

        dht, model, client = open_remote_moe_model(spec, initial_peers, identity_path=identity_path)
        access = _join(dht, spec, access_token)
        try:
            with torch.no_grad():
                tokens = model.eval().generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
            counters = client.metrics.snapshot()
        finally:
            if access is not None:
                access.stop()
            client.shutdown()
            dht.shutdown()
    else:
        from potluck.peer.shard.client.remote_model import open_remote_model

        dht, model = open_remote_model(spec, initial_peers, identity_path=identity_path)
        access = _join(dht, spec, access_token)
        try:
            tokens = model.generate(ids, max_new_tokens, eos_token_id=tokenizer.eos_token_id)
            counters = model.client.metrics.snapshot()
        finally:
            if access is not None:
                access.stop()
            model.client.shutdown()
            dht.shutdown()
    text = tokenizer.decode(tokens[0, ids.shape[1] :], skip_special_tokens=True)
    return Generation(text, tokenizer.decode(ids[0]), counters)


def _join(dht, spec: RunSpec, access_token: Path | None):
    """A private run's token published (the servers read it before they answer); None for a public run."""
    from hivemind.utils.crypto import RSAPrivateKey

    from potluck.peer.net.access import join_private_run
    from potluck.protocols.records import public_key_tag

    return join_private_run(dht, public_key_tag(RSAPrivateKey.process_wide()), spec, access_token)
