"""Keep bitsandbytes from fetching code from the Hugging Face hub when it is imported.

On CPUs with AVX512-BF16, importing bitsandbytes (peft imports it in every process where it is installed: the
``quant`` extra) asks the hub for a CPU 4-bit kernel (``kernels-community/quantization-bitsandbytes``) and runs it
if it gets it; it falls back to its own kernel when it cannot. That is a download at run time, and code a volunteer
never chose to run (the reasons of ``peer/training/model.py``'s ``NO_HUB_KERNELS``); where the hub is unreachable
it is a failed lookup of about a second per process and a warning in every log. bitsandbytes offers no switch, so
:func:`import_bitsandbytes_offline` imports it once with the ``kernels`` package hidden: its own kernel, quietly.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys

_CPU_OPS_LOGGER = "bitsandbytes.backends.cpu.ops"


def import_bitsandbytes_offline() -> None:
    """Import bitsandbytes, if it is installed and not imported yet, without its hub kernel. Call it before
    anything imports peft."""
    if "bitsandbytes" in sys.modules or importlib.util.find_spec("bitsandbytes") is None:
        return
    hidden = sys.modules.get("kernels")
    sys.modules["kernels"] = None  # type: ignore[assignment]  (``from kernels import …`` raises ImportError)
    quiet = logging.getLogger(_CPU_OPS_LOGGER)
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its fallback's warning names a failure that is our choice
    try:
        with contextlib.suppress(
            Exception
        ):  # a broken bitsandbytes is peft's and check_quantization's to report
            import bitsandbytes  # noqa: F401
    finally:
        quiet.setLevel(level)
        if hidden is None:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = hidden
