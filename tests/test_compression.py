"""Round-trip error of each codec that averaging can use, on tensors like the ones it averages.

The bounds asserted here are the ones documented for ``averaging.compression``:

- ``fp16``: each element within ``2**-11 * |x| + 2**-25`` (half precision rounding; tiny values flush).
- ``scaled_fp16``: each row is centred and scaled by its std before the cast, so the error is relative to
  the *centred* value: ``2**-11 * |x - mean_row| + 2**-24 * std_row`` (plus float32 rounding).
- ``uint8``: 256 bins over mean +- 3 std: each element inside that range is within one bin
  (``6 * std / 256``, under 2.4 % of the std); outliers clip to the edge bins. Relative RMS error about
  1-2 % on weight-like and pseudo-gradient tensors, up to ~20 % on heavy-tailed raw gradients.
- ``quantile_8bit``: 256 bins at the tensor's quantiles: relative RMS error about 1-3 %, ~10 % on raw
  gradients (wide tail bins).

"Relative RMS" is ``||decoded - x|| / ||x - mean(x)||`` over all tensors of a kind.
"""

from __future__ import annotations

import math

import pytest
import torch
from hivemind.compression import CompressionInfo, deserialize_torch_tensor
from hivemind.compression import quantization as hivemind_quantization

from potluck.hivemind_ext import codecs
from potluck.peer.averaging.gradient import COMPRESSIONS
from potluck.peer.training.data import PeerDataStream
from potluck.peer.training.model import build_model, load_tokenizer, trainable_parameters
from potluck.peer.training.stages import make_stage
from potluck.protocols.runspec import parse_run_spec
from tests.helpers import wait_until

pytestmark = pytest.mark.unit

HALF = 2.0**-11


@pytest.fixture(scope="module")
def tensors(tiny_assets) -> dict[str, list[torch.Tensor]]:
    """Gradients of one batch and the pseudo-gradient of 10 AdamW steps of the tiny model, and
    gaussian weight-like matrices."""
    torch.manual_seed(0)
    spec = parse_run_spec(
        {
            "run_id": "codecs",
            "model": {"name_or_path": str(tiny_assets["model"])},
            "data": {"path": str(tiny_assets["train"]), "max_length": 16},
            "batch": {"target_batch_size": 64, "per_peer_batch_size": 64},
        }
    )
    model = build_model(spec, torch.device("cpu"))
    params = trainable_parameters(model)
    stage = make_stage("sft")
    batches = PeerDataStream(spec.data, load_tokenizer(spec.model), 64).batches(0)
    stage.loss(model, next(batches)).backward()
    gradients = [p.grad.clone() for p in params]
    start = [p.detach().clone() for p in params]
    inner = torch.optim.AdamW(params, lr=3e-3)
    for _ in range(10):
        inner.zero_grad()
        stage.loss(model, next(batches)).backward()
        inner.step()
    pseudo = [s - p.detach() for s, p in zip(start, params, strict=True)]
    weights = [torch.randn(512, 512) * 0.02, torch.randn(256, 1024) * 0.05 + 0.01]
    return {"gradient": _varying(gradients), "pseudo_gradient": _varying(pseudo), "weights": weights}


def _varying(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Leave out constant tensors: no codec has an error to bound on them (uint8 has no scale)."""
    return [t for t in tensors if t.numel() > 1 and float(t.std()) > 0]


def round_trip(codec: str, tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Decoded tensor and wire size, through hivemind's own serialisation (as the all-reduce does)."""
    codecs.install()
    compressed = COMPRESSIONS[codec]().compress(tensor, CompressionInfo.from_tensor(tensor))
    return deserialize_torch_tensor(compressed), compressed.ByteSize()


def relative_rms(codec: str, tensors: list[torch.Tensor]) -> float:
    error = centred = 0.0
    for t in tensors:
        decoded, _ = round_trip(codec, t)
        error += float(((decoded - t) ** 2).sum())
        centred += float(((t - t.mean()) ** 2).sum())
    return math.sqrt(error / centred)


KINDS = ("gradient", "pseudo_gradient", "weights")


def test_none_is_exact(tensors):
    for kind in KINDS:
        for t in tensors[kind]:
            assert torch.equal(round_trip("none", t)[0], t)


@pytest.mark.parametrize("kind", KINDS)
def test_fp16_error_is_half_precision_rounding(tensors, kind):
    for t in tensors[kind]:
        decoded, _ = round_trip("fp16", t)
        assert ((decoded - t).abs() <= HALF * t.abs() + 2.0**-25).all()


@pytest.mark.parametrize("kind", KINDS)
def test_scaled_fp16_error_is_relative_to_the_centred_row(tensors, kind):
    for t in tensors[kind]:
        decoded, _ = round_trip("scaled_fp16", t)
        centred = t - t.mean(dim=-1, keepdim=True)
        row_std = (centred.norm(dim=-1, keepdim=True) / math.sqrt(t.shape[-1])).clamp_min(1.2e-7)
        bound = HALF * centred.abs() + 2.0**-24 * row_std + 2.0**-23 * t.abs()
        assert ((decoded - t).abs() <= bound).all()


@pytest.mark.parametrize("kind", KINDS)
def test_uint8_is_within_one_bin_inside_three_sigma(tensors, kind):
    for t in tensors[kind]:
        decoded, _ = round_trip("uint8", t)
        std = float((t - t.mean()).norm()) / math.sqrt(t.numel() - 1)
        bin_width = 6 * std / 256
        # the edge bins also hold the clipped outliers, so their average is pulled outward
        inside = (t - t.mean()).abs() <= 3 * std - 2 * bin_width
        assert ((decoded - t).abs()[inside] <= bin_width).all()


@pytest.mark.parametrize(
    ("codec", "kind", "bound"),
    [
        ("fp16", "gradient", 3e-4),
        ("scaled_fp16", "gradient", 3e-4),
        ("uint8", "weights", 0.025),
        ("uint8", "pseudo_gradient", 0.025),
        ("uint8", "gradient", 0.25),
        ("quantile_8bit", "weights", 0.04),
        ("quantile_8bit", "pseudo_gradient", 0.03),
        ("quantile_8bit", "gradient", 0.15),
    ],
)
def test_relative_rms_error_is_bounded(tensors, codec, kind, bound):
    assert relative_rms(codec, tensors[kind]) <= bound


@pytest.mark.parametrize(
    ("codec", "ratio"), [("fp16", 0.51), ("scaled_fp16", 0.51), ("uint8", 0.26), ("quantile_8bit", 0.26)]
)
def test_codecs_shrink_the_payload(tensors, codec, ratio):
    big = tensors["weights"][0]
    assert round_trip(codec, big)[1] <= ratio * round_trip("none", big)[1]


def _compress_with_the_quantile_codec() -> None:
    tensor = torch.randn(1000)
    COMPRESSIONS["quantile_8bit"]().compress(tensor, CompressionInfo.from_tensor(tensor))


@pytest.mark.integration  # starts a process
def test_a_process_forked_after_quantile_compression_can_compress_too():
    """Averagers are forked from the peer's process; the quantile codec's thread pool must work there
    even when the parent used it first (without a fresh pool the child waits forever)."""
    import multiprocessing

    codecs.install()
    torch.set_num_threads(1)  # like the peers
    _compress_with_the_quantile_codec()
    pool = hivemind_quantization.EXECUTOR
    # the race the peer lost: the pool's thread is idle when the averager forks
    wait_until(lambda: pool._idle_semaphore._value > 0, timeout=10, what="the pool's thread to go idle")
    child = multiprocessing.get_context("fork").Process(target=_compress_with_the_quantile_codec)
    child.start()
    child.join(timeout=30)
    if child.exitcode is None:
        child.kill()
    assert child.exitcode == 0, "the forked process hung in the quantile codec"
