"""``run-peer`` as a faulty or hostile shard server: ``python tests/refusing_peer.py [run-peer flags...]``.

For tests/test_refusing_servers.py (``LocalSwarm.start_peer(entry=REFUSING_PEER)``). Its span or expert server
answers every forward, backward and inference call with ``bad_request``, and announces a throughput no honest server
reaches, so clients try it first (what a server that means to stop clients would do). The refusal is injected here,
by replacing the servicers' handlers before run-peer's own ``main`` runs, so that the server has no test-only branch.
"""

from __future__ import annotations

import sys
from pathlib import Path

REFUSING_PEER = (str(Path(__file__).resolve()),)
"""What ``LocalSwarm.start_peer(entry=...)`` runs instead of ``-m potluck.peer.launch``."""
REFUSAL = "refused by tests/refusing_peer.py"


def main(argv: list[str]) -> int:
    from potluck.peer import launch
    from potluck.peer.roles import expert_server, shard_server
    from potluck.peer.shard.server.expert_service import ExpertServicer
    from potluck.peer.shard.server.handling import BadRequest
    from potluck.peer.shard.server.service import ShardServicer

    async def refuse(*args, **kwargs):
        raise BadRequest(REFUSAL)

    for servicer in (ShardServicer, ExpertServicer):
        servicer._forward = servicer._backward = refuse
    ShardServicer._inference = refuse
    shard_server.measure_throughput = lambda *args, **kwargs: 1e9
    expert_server.measure_expert_throughput = lambda *args, **kwargs: 1e9
    return launch.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
