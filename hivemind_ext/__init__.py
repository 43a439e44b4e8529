"""Everything Potluck changes in hivemind, in one place (see docs/architecture.md, "hivemind_ext").

Each module says in its docstring what upstream lacks and pins the upstream pieces it copies,
subclasses or patches in ``UPSTREAM`` (see ``upstream.py``; ``tests/test_hivemind_drift.py``
fails when one changes). Outside this folder Potluck uses only hivemind's public names
(``tests/test_layout.py`` enforces it).
"""

from __future__ import annotations

import hivemind

SUPPORTED_HIVEMIND = "1.1.12"
"""The hivemind release whose internals this folder copies and patches."""

if hivemind.__version__ != SUPPORTED_HIVEMIND:
    raise ImportError(
        f"Potluck needs hivemind=={SUPPORTED_HIVEMIND}, found {hivemind.__version__}: potluck/hivemind_ext "
        f"adapts that release's internals (pip install hivemind=={SUPPORTED_HIVEMIND})"
    )
