"""``run-peer``'s entry point: a Ctrl-C during the seconds of imports and start-up is one line, not a
traceback; then the command line itself (``cli.py``).

Importing torch, transformers and hivemind takes seconds, and a user who presses Ctrl-C then (a wrong
flag noticed, a typo in the spec path) got a KeyboardInterrupt traceback from whichever import was
running. The handler set here is replaced by the roles' own (``install_stop_handlers``) once the peer
can leave the swarm cleanly. SIGTERM before then ends the process at once, without a word (the
default action); its helper processes follow it (``hivemind_ext/lifeline.py``).

Once the role has returned (its summary, checkpoint and goodbye done), the process ends at once
(:func:`exit_now`).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import NoReturn

INTERRUPTED = "run-peer: interrupted (SIGINT) while starting; nothing was trained or saved"


def _interrupted_while_starting(signum, frame) -> None:
    # os._exit, not an exception: raised inside torch's native import code, SystemExit aborted the
    # process (SIGABRT, "terminate called after throwing ..."). Nothing is open yet that needs closing
    # (a DHT's helper processes follow their parent by their lifeline); no --results summary is written.
    print(INTERRUPTED, file=sys.stderr, flush=True)
    os._exit(130)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGINT, _interrupted_while_starting)
    from potluck.peer.unused_libraries import leave_out_unused_libraries

    leave_out_unused_libraries(sys.argv[1:] if argv is None else argv)
    from potluck.peer.cli import main as run_peer_main

    try:
        code = run_peer_main(argv)
    except SystemExit as e:  # a second signal ("again to force"): leave as at the end
        code = e.code if isinstance(e.code, int) else 1
    exit_now(code)


def exit_now(code: int) -> NoReturn:
    """End the process with ``code`` once the output is flushed, without the interpreter's teardown.

    By now the role has saved, written its summary and shut its DHT and averagers down. What the
    teardown would still do is wait: on every non-daemon thread (hivemind's optimizer thread waited on
    an abandoned averaging round up to ``averaging_timeout``), then on whatever the finalizers of
    hivemind's, torch's and the daemon's objects wait on. A peer sent SIGTERM wrote its summary within
    3 s and took 8 s more to end (load 10 on 2 cores). The helper processes that are left follow the
    peer by their lifeline (``hivemind_ext/lifeline.py``)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
