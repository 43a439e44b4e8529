"""Choosing the compute device from ``--gpu``."""

from __future__ import annotations

import torch


class DeviceError(RuntimeError):
    """The requested device cannot be used; the message says why in one line."""


def resolve_device(gpu: int | None) -> torch.device:
    if gpu is None:
        return torch.device("cpu")
    if gpu < 0:
        raise DeviceError(f"--gpu takes a CUDA device index >= 0, got {gpu}")
    if not torch.cuda.is_available():
        build = f"torch {torch.__version__} " + (
            "has CUDA but no device or driver is visible" if torch.version.cuda else "is a CPU-only build"
        )
        raise DeviceError(
            f"--gpu {gpu} was given but CUDA is not available ({build}); leave out --gpu to train on the CPU"
        )
    count = torch.cuda.device_count()
    if gpu >= count:
        raise DeviceError(
            f"--gpu {gpu} was given but this machine has {count} CUDA device(s): 0..{count - 1}"
        )
    return torch.device("cuda", gpu)
