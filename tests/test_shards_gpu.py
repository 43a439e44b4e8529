"""Block spans on a CUDA device: equal to the whole model run there, in float32 and bfloat16, with and
without an attention cache. Needs only torch and transformers (no swarm), so it runs on a bare GPU
machine: ``pytest tests/test_shards_gpu.py --noconftest -m gpu``."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from potluck.peer.shard.blocks import load_block_span, load_client_parts
from potluck.tools.tiny.model import TinyModelConfig, build_tiny_model
from potluck.tools.tiny.task import ALPHABET, ArithmeticTask

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    config = TinyModelConfig(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2, max_positions=128)
    return build_tiny_model(
        tmp_path_factory.mktemp("gpu") / "model", ArithmeticTask().corpus(), ALPHABET, config
    )


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
def test_spans_on_cuda_equal_the_whole_model(model_dir, dtype, atol):
    device = torch.device("cuda")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    parts = load_client_parts(model_dir, dtype).to(device)
    spans = [load_block_span(model_dir, a, b, dtype).to(device) for a, b in ((0, 1), (1, 3), (3, 4))]
    ids = torch.randint(4, 30, (3, 40), device=device)
    with torch.no_grad():
        expected = model(ids).logits.float()
        hidden = parts.embed_tokens(ids)
        for span in spans:
            hidden = span(hidden)
        logits = parts.lm_head(parts.norm(hidden)).float()
        torch.testing.assert_close(logits, expected, atol=atol, rtol=0)

        # prefill 30 tokens, then 10 one at a time, with a cache per span
        caches = [span.new_cache() for span in spans]
        outputs = []
        for start, end in [(0, 30)] + [(t, t + 1) for t in range(30, 40)]:
            hidden = parts.embed_tokens(ids[:, start:end])
            for span, cache in zip(spans, caches, strict=True):
                hidden = span(hidden, start, cache=cache)
            outputs.append(hidden)
        cached = parts.lm_head(parts.norm(torch.cat(outputs, dim=1))).float()
        torch.testing.assert_close(cached, expected, atol=atol, rtol=0)


def test_span_gradients_on_cuda_equal_the_whole_model(model_dir):
    device = torch.device("cuda")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    spans = [load_block_span(model_dir, a, b).to(device) for a, b in ((0, 2), (2, 4))]
    hidden = torch.randn(2, 24, 256, device=device, requires_grad=True)
    upstream = torch.randn(2, 24, 256, device=device)
    output = hidden
    for span in spans:
        output = span(output)
    output.backward(upstream)

    local = hidden.detach().clone().requires_grad_(True)
    rotary = model.model.rotary_emb(local, torch.arange(24, device=device)[None])
    reference = local
    for layer in model.model.layers:
        reference = layer(reference, position_embeddings=rotary, attention_mask=None)
    reference.backward(upstream)
    torch.testing.assert_close(output, reference, atol=1e-4, rtol=0)
    torch.testing.assert_close(hidden.grad, local.grad, atol=1e-4, rtol=0)
