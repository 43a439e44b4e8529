"""The layers every averager of a peer stacks on hivemind's, in their one working order.

The state averager (``optimizer.py``), the gradient averager (``optimizer.py``) and a span's LoRA replicas
(``peer/shard/server/adapters.py``) stack these last, after what is their own; DiLoCo's outer averager
(``peer/averaging/diloco.py``) puts its kept groups and timed rounds in between, so it lists them itself.
"""

from __future__ import annotations

from potluck.hivemind_ext.access import GatedAveraging
from potluck.hivemind_ext.allreduce import SameAverages
from potluck.hivemind_ext.ctrl_c import KeepsCtrlC
from potluck.hivemind_ext.followers import PatientFollowers
from potluck.hivemind_ext.rounds import CheckedRounds


class PeerRounds(PatientFollowers, GatedAveraging, CheckedRounds, SameAverages, KeepsCtrlC):
    """A follower that waits for its late leader (``followers.py``), admitted peers only (``access.py``),
    rounds that say how much of the average arrived (``rounds.py``), the same average to the bit on every
    member (``allreduce.py``), and Ctrl-C left as it was (``ctrl_c.py``)."""
