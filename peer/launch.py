"""``run-peer``'s entry point: a Ctrl-C during the seconds of imports and start-up is one line, not a
traceback; then the command line itself (``cli.py``).

Importing torch, transformers and hivemind takes seconds, and a user who presses Ctrl-C then (a wrong
flag noticed, a typo in the spec path) got a KeyboardInterrupt traceback from whichever import was
running. The handler set here is replaced by the roles' own (``install_stop_handlers``) once the peer
can leave the swarm cleanly. SIGTERM before then ends the process at once, without a word (the
default action); its helper processes follow it (``hivemind_ext/lifeline.py``).
"""

from __future__ import annotations

import os
import signal
import sys

INTERRUPTED = "run-peer: interrupted (SIGINT) while starting; nothing was trained or saved"


def _interrupted_while_starting(signum, frame) -> None:
    # os._exit, not an exception: raised inside torch's native import code, SystemExit aborted the
    # process (SIGABRT, "terminate called after throwing ..."). Nothing is open yet that needs closing
    # (a DHT's helper processes follow their parent by their lifeline); no --results summary is written.
    print(INTERRUPTED, file=sys.stderr, flush=True)
    os._exit(130)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGINT, _interrupted_while_starting)
    from potluck.peer.cli import main as run_peer_main

    return run_peer_main(argv)


if __name__ == "__main__":
    sys.exit(main())
