"""Keep bitsandbytes from fetching code from the Hugging Face hub when it is imported.

On CPUs with AVX512-BF16, importing bitsandbytes (peft imports it where it is installed, when it wraps a model: the
``quant`` extra) asks the hub for a CPU 4-bit kernel (``kernels-community/quantization-bitsandbytes``) and runs it
if it gets it; it falls back to its own kernel when it cannot. That is a download at run time, and code a volunteer
never chose to run (the reasons of ``peer/training/model.py``'s ``NO_HUB_KERNELS``); where the hub is unreachable
it is a failed lookup of about a second per process and a warning in every log. bitsandbytes offers no switch, so
:func:`refuse_hub_kernels` hooks the import of the one module that asks: while it runs, the ``kernels`` package is
hidden, and bitsandbytes quietly uses its own kernel. Installing the hook imports nothing (``run-peer`` must stay
interruptible while torch loads: ``peer/launch.py``).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys

ASKS_THE_HUB = "bitsandbytes.backends.cpu.ops"


class _HiddenKernels(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        hidden = sys.modules.get("kernels")
        sys.modules["kernels"] = None  # type: ignore[assignment]  (``from kernels import …`` raises ImportError)
        quiet = logging.getLogger(
            ASKS_THE_HUB
        )  # the module's own logger: its fallback's warning is our choice
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            self.loader.exec_module(module)
        finally:
            quiet.setLevel(level)
            if hidden is None:
                del sys.modules["kernels"]
            else:
                sys.modules["kernels"] = hidden


class _RefuseHubKernels(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != ASKS_THE_HUB:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _HiddenKernels(spec.loader)
        return spec


def refuse_hub_kernels() -> None:
    """From now on in this process, bitsandbytes imports without asking the hub for a kernel (idempotent)."""
    if not any(isinstance(finder, _RefuseHubKernels) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RefuseHubKernels())
