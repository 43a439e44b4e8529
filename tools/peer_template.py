"""What the template process of ``tools/warm_peers.py`` imports before it forks peers: everything ``run-peer``
imports for a run that quantises nothing (bitsandbytes left out, as ``peer/unused_libraries.py`` leaves it out).
Imported only there: importing it anywhere else would hide bitsandbytes from that process."""

import sys

from potluck.peer.unused_libraries import LEFT_OUT

if sys.modules.get(LEFT_OUT) is None:
    sys.modules[LEFT_OUT] = None  # type: ignore[assignment]

import potluck.peer.cli  # noqa: E402,F401
import potluck.peer.launch  # noqa: E402,F401
