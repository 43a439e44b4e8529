"""The DHT key scheme. Every key that belongs to a run starts with the run id.

| key | subkey | value | written by |
| --- | --- | --- | --- |
| ``{run_id}_peers`` | peer id | time of the announcement (DHT time) | each peer, while it waits to start |
| ``{run_id}_progress`` | peer's public key | hivemind's ``LocalTrainingProgress`` | hivemind's progress tracker |
| ``{run_id}_grad_averager.*`` / ``{run_id}_state_averager.*`` | — | matchmaking and state-sharing records | hivemind's averagers |
"""

from __future__ import annotations


def presence_key(run_id: str) -> str:
    return f"{run_id}_peers"
