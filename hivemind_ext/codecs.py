"""hivemind's 8-bit codecs, made to decode under NumPy 2.

hivemind 1.1.12 reads the codebook size of ``Uniform8BitQuantization`` and ``Quantile8BitQuantization``
with ``int(np.frombuffer(..., count=1))``: NumPy 2 refuses to turn a 1-element array into a scalar, so
every 8-bit tensor fails to *decode* (encoding works), and an all-reduce with ``compression: uint8`` or
``quantile_8bit`` fails on the receiving side. :func:`install` registers decoders that read the size
correctly in hivemind's codec registry; it must run before averagers start (their processes inherit it).

It also gives every forked process a fresh thread pool for the quantile codec: hivemind runs
``np.quantile`` on a module-level ``ThreadPoolExecutor``; a process forked after the parent used it (each
averager is forked, and DiLoCo compresses once in the parent to count bytes) inherits the pool's count
of idle threads but no thread, and its first quantile compression waits forever (a DiLoCo peer hung in
its first all-reduce with ``quantile_8bit`` in ``bench/strategies.py``).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from hivemind.compression import Quantile8BitQuantization, Uniform8BitQuantization
from hivemind.compression import quantization as hivemind_quantization
from hivemind.compression import serialization as hivemind_serialization
from hivemind.proto import runtime_pb2

UPSTREAM = {
    "hivemind.compression.quantization.Quantization.extract": "c522c9b6fd9ddaa2",  # copied with the codebook size read as [0]
    "hivemind.compression.quantization.Quantile8BitQuantization.quantize": "975cd0bc33b68170",  # runs on the module-level EXECUTOR we renew after fork
    "hivemind.compression.serialization.deserialize_torch_tensor": "74f1eed9fb9b7de3",  # looks decoders up in _BASE_COMPRESSION_TYPES
}
"""The upstream pieces this module depends on, pinned (see ``upstream.py``)."""


class _Decodes8BitUnderNumpy2:
    """``Quantization.extract`` of hivemind 1.1.12 with the codebook size read as ``[0]``."""

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        buffer = serialized_tensor.buffer
        codebook_size = int(np.frombuffer(buffer, count=1, dtype=np.int64)[0])
        codebook = np.frombuffer(buffer, offset=8, count=codebook_size, dtype=self.codebook_dtype)
        quantized = np.frombuffer(buffer, offset=8 + codebook.nbytes, dtype=self.indices_dtype)
        quantized = torch.as_tensor(quantized, dtype=torch.int64).reshape(tuple(serialized_tensor.size))
        codebook = torch.as_tensor(codebook).to(dtype=getattr(torch, serialized_tensor.dtype))
        return codebook[quantized].requires_grad_(serialized_tensor.requires_grad)


class Uniform8Bit(_Decodes8BitUnderNumpy2, Uniform8BitQuantization):
    pass


class Quantile8Bit(_Decodes8BitUnderNumpy2, Quantile8BitQuantization):
    pass


def _fresh_quantile_pool() -> None:
    hivemind_quantization.EXECUTOR = ThreadPoolExecutor(
        max_workers=hivemind_quantization.EXECUTOR._max_workers
    )


_fork_hook_registered = False


def install() -> None:
    """Decode 8-bit tensors with the fixed codecs in this process (and in processes forked from it)."""
    global _fork_hook_registered
    if not _fork_hook_registered:
        os.register_at_fork(after_in_child=_fresh_quantile_pool)
        _fork_hook_registered = True
    # NOTE: hivemind looks decoders up in this module-level registry by compression type name; there
    # is no public hook. Remove this once hivemind reads the size with ``[0]`` (or NumPy is < 2).
    registry = hivemind_serialization._BASE_COMPRESSION_TYPES
    registry["UNIFORM_8BIT"] = Uniform8Bit()
    registry["QUANTILE_8BIT"] = Quantile8Bit()
