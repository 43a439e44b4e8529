"""Keep bitsandbytes out of a peer whose run does not quantise: about 1.4 s of its startup.

peft imports bitsandbytes wherever it is installed (the ``quant`` extra, and ``dev``), and bitsandbytes imports
torch's compiler stack with it: 1.45 s of a ``run-peer``'s 4–5 s of imports on a 2-core machine, for a library
only ``model.quantization`` uses. So ``run-peer`` reads its ``--run-spec`` before it imports the rest of the peer
and, where the spec quantises nothing, marks bitsandbytes as absent (``sys.modules`` holds ``None`` for it): peft
and transformers then see what a volunteer without the ``quant`` extra has, and never import it.

Where the spec cannot be read here (no ``--run-spec``: the run comes from a coordinator or the DHT; a bad file,
which ``run-peer`` reports itself a moment later) nothing is left out. Measured by ``bench/startup.py``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

LEFT_OUT = "bitsandbytes"


def leave_out_unused_libraries(argv: Sequence[str]) -> bool:
    """Before the peer's imports: leave bitsandbytes out of this process where ``argv``'s ``--run-spec`` names a
    spec that quantises nothing. Returns whether it did; imports only the run spec's parser."""
    if sys.modules.get(LEFT_OUT) is not None:  # already imported: nothing to save
        return False
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--run-spec")
    known, _ = parser.parse_known_args(list(argv))
    if known.run_spec is None:
        return False
    from potluck.protocols.runspec import RunSpecError, load_run_spec

    try:
        spec = load_run_spec(known.run_spec)
    except RunSpecError:  # run-peer names the fault itself, after its usual checks
        return False
    if spec.model.quantized:
        return False
    sys.modules[LEFT_OUT] = None  # type: ignore[assignment]  (find_spec → None; ``import`` → ImportError)
    return True
