"""``potluck generate``: greedy text from a run's model, locally or through its shard servers."""

from __future__ import annotations

import torch

from potluck.peer.training.model import load_base_model, load_tokenizer
from potluck.protocols.runspec import RunSpec


def generate_text(
    spec: RunSpec, prompt: str, max_new_tokens: int, initial_peers: list[str] | None = None
) -> tuple[str, dict]:
    """The prompt's greedy continuation and, through shards (``initial_peers`` given), the client's
    counters (requests, failures, replays). Locally the whole model is loaded instead."""
    tokenizer = load_tokenizer(spec.model)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
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
    else:
        from potluck.peer.shard.client.remote_model import open_remote_model

        dht, model = open_remote_model(spec, initial_peers)
        try:
            tokens = model.generate(ids, max_new_tokens, eos_token_id=tokenizer.eos_token_id)
            counters = model.client.metrics.snapshot()
        finally:
            model.client.shutdown()
            dht.shutdown()
    return tokenizer.decode(tokens[0, ids.shape[1] :], skip_special_tokens=True), counters
