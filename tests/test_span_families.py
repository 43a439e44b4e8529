"""Block spans of every family a span server loads (``peer/shard/blocks.py`` ``FAMILIES``): Llama, Qwen2, Qwen3,
Mistral and Gemma 3, each the tiny random model of ``tools/tiny/families.py`` (Gemma 3's sliding-window and global
layers alternate, with a window shorter than the sequences here).

In this process: a model cut into spans ``0:1`` and ``1:2`` and run on a left-padded batch gives the logits of the
family's own transformers model, and each row's alone; cached token-by-token steps give its greedy tokens. Through
real span servers (one ``run-peer --role shard`` per family): remote greedy generation equals local, and a padded
batch generates what each of its rows generates alone."""

from __future__ import annotations

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from potluck.peer.shard.blocks import ShardLoadError, load_block_span, load_client_parts, load_config
from potluck.peer.shard.client.remote_model import left_padding, open_remote_model
from potluck.protocols.runspec import load_run_spec
from potluck.protocols.shards import read_shards
from tests.conftest import _TrackedSwarm
from tests.helpers import wait_until
from tests.test_shards import _wait_for_event

FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma3"]
LENGTHS = [14, 11, 8]
"""Tokens of each row of the padded batch: longer than Gemma 3's window (8), so both kinds of its layers differ."""


def _left_padded_batch(vocab_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``LENGTHS`` random tokens, left-padded to the longest; (input ids, attention mask)."""
    generator = torch.Generator().manual_seed(seed)
    width = max(LENGTHS)
    ids = torch.zeros(len(LENGTHS), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(LENGTHS):
        ids[row, width - length :] = torch.randint(4, vocab_size, (length,), generator=generator)
        mask[row, width - length :] = 1
    return ids, mask


def _cut(model_dir, seed: int):
    """The model cut into spans 0:1 and 1:2 and the client's parts, the model whole, and a left-padded batch."""
    config, _ = load_config(model_dir)
    spans = [load_block_span(model_dir, 0, 1), load_block_span(model_dir, 1, config.num_hidden_layers)]
    local = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids, mask = _left_padded_batch(config.vocab_size, seed)
    return spans, load_client_parts(model_dir), local, ids, mask, torch.tensor(left_padding(mask))


@pytest.mark.unit
@pytest.mark.parametrize("family", FAMILIES)
def test_spans_of_a_left_padded_batch_give_the_models_logits_and_each_rows_alone(family, family_model):
    spans, parts, local, ids, mask, padding = _cut(family_model(family), seed=0)

    with torch.no_grad():
        hidden = parts.embed(ids)
        for span in spans:
            hidden = span(hidden, padding=padding)
        logits = parts.logits(hidden)
        expected = local(ids, attention_mask=mask).logits
        assert torch.allclose(logits[mask.bool()], expected[mask.bool()], atol=1e-5)
        assert torch.isfinite(
            logits
        ).all()  # the pads' own outputs too: nobody reads them, but NaN would spread
        for row, pads in enumerate(padding.tolist()):
            alone = parts.embed(ids[row : row + 1, pads:])
            for span in spans:
                alone = span(alone)
            assert torch.allclose(parts.logits(alone)[0], logits[row, pads:], atol=1e-5)


@pytest.mark.unit
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_steps_of_a_left_padded_batch_give_the_models_greedy_tokens(family, family_model):
    spans, parts, local, ids, mask, padding = _cut(family_model(family), seed=1)
    new_tokens = 6

    with torch.no_grad():
        caches = [span.new_cache() for span in spans]
        tokens, step, position = ids, ids, 0
        for _ in range(new_tokens):
            hidden = parts.embed(step)
            for span, cache in zip(spans, caches, strict=True):
                hidden = span(hidden, position, cache=cache, padding=padding)
            position += step.shape[1]
            step = parts.logits(hidden[:, -1:]).argmax(dim=-1)
            tokens = torch.cat([tokens, step], dim=1)
        expected = local.generate(
            ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            pad_token_id=0, eos_token_id=None,
        )  # fmt: skip
    assert torch.equal(tokens, expected)


@pytest.mark.unit
def test_a_model_type_without_spans_is_refused_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(
        ShardLoadError, match=r"model.name_or_path: model type 'gpt2' cannot be sharded yet \(supported: "
    ):
        load_config(tmp_path)


@pytest.mark.unit
def test_a_mask_with_pads_between_tokens_is_refused():
    with pytest.raises(ValueError, match="attention_mask: a row has pads between its tokens"):
        left_padding(torch.tensor([[0, 1, 0, 1, 1]]))
    assert left_padding(torch.tensor([[1, 1, 0], [1, 1, 1]])) is None  # right padding needs nothing
    assert left_padding(torch.tensor([[0, 0, 1], [1, 1, 1]])) == [2, 0]


# -- through real servers ------------------------------------------------------------------------------------------
REMOTE_FAMILIES = [f for f in FAMILIES if f != "llama"]
"""Llama's spans are served in tests/test_shards.py."""


@pytest.fixture(scope="module")
def family_servers(family_model, tiny_assets, tmp_path_factory):
    """One span server per family, serving all of its model's blocks, started together; yields {family: (spec, address)}."""
    swarms: dict[str, _TrackedSwarm] = {}
    specs = {}
    try:
        for family in REMOTE_FAMILIES:
            folder = tmp_path_factory.mktemp(f"span-{family}")
            spec = {
                "run_id": f"span-{family}",
                "model": {"name_or_path": str(family_model(family))},
                "data": {"path": str(tiny_assets["train"]), "max_length": 16},
                "batch": {"target_batch_size": 8, "per_peer_batch_size": 8},
            }
            (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
            swarms[family] = _TrackedSwarm(
                folder / "spec.yaml", folder / "servers", extra_args=["--role", "shard"]
            )
            swarms[family].start_peer("server", ["--blocks", "0:2"])
        for family, swarm in swarms.items():
            _wait_for_event(swarm.peers[0], "serving")
            specs[family] = (load_run_spec(swarm.spec_path), swarm.peers[0].join_address())
        yield specs
    finally:
        for swarm in swarms.values():
            swarm.stop(grace=10)


@pytest.mark.slow
@pytest.mark.parametrize("family", REMOTE_FAMILIES)
def test_remote_greedy_generation_of_a_padded_batch_equals_each_row_generated_locally(family, family_servers):
    spec, address = family_servers[family]
    local = AutoModelForCausalLM.from_pretrained(spec.model.name_or_path, dtype=torch.float32).eval()
    ids, mask = _left_padded_batch(local.config.vocab_size, seed=2)
    new_tokens = 6
    dht, model = open_remote_model(spec, [address], request_timeout=20.0)
    try:
        wait_until(lambda: len(read_shards(dht, spec.run_id).records) == 1, 60, "the server's announcement")
        batch = model.generate(ids, max_new_tokens=new_tokens, attention_mask=mask)
        for row, pads in enumerate(left_padding(mask)):
            alone = ids[row : row + 1, pads:]
            expected = local.generate(
                alone, attention_mask=torch.ones_like(alone), max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None,
            )  # fmt: skip
            assert torch.equal(model.generate(alone, max_new_tokens=new_tokens), expected), f"row {row} alone"
            assert torch.equal(batch[row : row + 1, pads:], expected), f"row {row} in the padded batch"
    finally:
        model.client.shutdown()
        dht.shutdown()
