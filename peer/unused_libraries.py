"""Keep bitsandbytes out of a peer whose run quantises nothing: 0.8 s of its launch to first step.

peft imports bitsandbytes wherever it is installed (the ``quant`` extra, and ``dev``), and bitsandbytes imports
torch's compiler stack with it, for a library only quantised weights use (``bench/startup.py``: 0.81 s of a first
peer's 4.8 s to its first step on a 2-core machine). So ``run-peer`` reads its ``--run-spec`` before it imports the
rest of the peer and, where nothing in the run is quantised, marks bitsandbytes as absent (``sys.modules`` holds
``None`` for it): peft and transformers then see what a volunteer without the ``quant`` extra has, and never import
it.

"Nothing quantised" means: ``model.quantization`` is ``none``, and every model the spec names (``model``,
``init_from``, ``reference.path``, ``teacher.path``, a reward model in ``rl.reward``) is a local folder whose
``config.json`` has no ``quantization_config`` (a checkpoint saved quantised needs bitsandbytes to load). Where
that cannot be told here (no ``--run-spec``: the run comes from a coordinator or the DHT; a hub id or a run id; an
adapter folder; a bad file, which ``run-peer`` reports itself a moment later) nothing is left out.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

LEFT_OUT = "bitsandbytes"


def leave_out_unused_libraries(argv: Sequence[str]) -> bool:
    """Before the peer's imports: leave bitsandbytes out of this process where ``argv``'s ``--run-spec`` names a
    spec that quantises nothing. Returns whether it did; imports only the run spec's parser."""
    if sys.modules.get(LEFT_OUT) is not None:  # already imported: nothing to save
        return False
    if not quantises_nothing(argv):
        return False
    sys.modules[LEFT_OUT] = None  # type: ignore[assignment]  (find_spec → None; ``import`` → ImportError)
    return True


def quantises_nothing(argv: Sequence[str]) -> bool:
    """Whether ``argv``'s ``--run-spec`` can be told, from its file and the ``config.json`` of the models it
    names, to quantise nothing (False where it cannot be told). Changes nothing."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--run-spec")
    known, _ = parser.parse_known_args(list(argv))
    if known.run_spec is None:
        return False
    from potluck.protocols.runspec import EXACT_ANSWER, RunSpecError, load_run_spec

    try:
        spec = load_run_spec(known.run_spec)
    except RunSpecError:  # run-peer names the fault itself, after its usual checks
        return False
    named = [spec.model.name_or_path, spec.init_from, spec.reference.path, spec.teacher and spec.teacher.path]
    named.append(spec.rl.reward if spec.rl.reward != EXACT_ANSWER else None)
    return not spec.model.quantized and all(_plainly_unquantised(path) for path in named if path)


def _plainly_unquantised(path: str) -> bool:
    """``path`` is a local model folder saved without quantisation (False where that cannot be told)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # a hub id, a run id, an adapter folder, no such folder
        return False
    return isinstance(config, dict) and "quantization_config" not in config
