"""``run-peer``'s entry point: a Ctrl-C during the seconds of imports and start-up is one line, not a
traceback; then the command line itself (``cli.py``).

Importing torch, transformers and hivemind takes seconds, and a user who presses Ctrl-C then (a wrong
flag noticed, a typo in the spec path) got a KeyboardInterrupt traceback from whichever import was
running. The handler set here is replaced by the roles' own (``install_stop_handlers``) once the peer
can leave the swarm cleanly. SIGTERM before then ends the process at once, without a word (the
default action); its helper processes follow it (``hivemind_ext/lifeline.py``).

Once the role has returned (its summary, checkpoint and goodbye done), the process ends within
``EXIT_GRACE_SECONDS`` even if a background thread of a library still waits on something.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

INTERRUPTED = "run-peer: interrupted (SIGINT) while starting; nothing was trained or saved"
EXIT_GRACE_SECONDS = 3.0
"""How long a finished peer waits for background threads before it exits without them."""


def _interrupted_while_starting(signum, frame) -> None:
    # os._exit, not an exception: raised inside torch's native import code, SystemExit aborted the
    # process (SIGABRT, "terminate called after throwing ..."). Nothing is open yet that needs closing
    # (a DHT's helper processes follow their parent by their lifeline); no --results summary is written.
    print(INTERRUPTED, file=sys.stderr, flush=True)
    os._exit(130)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGINT, _interrupted_while_starting)
    from potluck.peer.cli import main as run_peer_main

    return _with_exit_watchdog(run_peer_main(argv))


def _with_exit_watchdog(code: int) -> int:
    """``code``, and a watchdog: if the interpreter has not exited ``EXIT_GRACE_SECONDS`` later, one line
    naming the threads it waits on, then ``os._exit(code)``.

    The interpreter's exit joins every non-daemon thread, and a library's worker thread (hivemind runs
    its optimizer updates in a thread pool) can be blocked on an averaging round until its timeout:
    everything is saved by then, and a volunteer's Ctrl-C must not take half a minute. The watchdog is a
    daemon thread, so a normal exit ends it."""

    def force_exit() -> None:
        time.sleep(EXIT_GRACE_SECONDS)
        waiting = [t.name for t in threading.enumerate() if not t.daemon and t is not threading.main_thread()]
        print(f"run-peer: exiting without waiting for thread(s) still running: {', '.join(waiting) or '-'}",
              file=sys.stderr, flush=True)  # fmt: skip
        os._exit(code)

    threading.Thread(target=force_exit, name="potluck-exit-watchdog", daemon=True).start()
    return code


if __name__ == "__main__":
    sys.exit(main())
