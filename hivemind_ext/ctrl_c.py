"""The process that starts an averager keeps its Ctrl-C.

hivemind's ``DecentralizedAverager.run_in_background`` sets SIGINT to ignored before it forks the
averager's process, so that the averager leaves Ctrl-C to its parent, and never sets it back: the
parent ignores Ctrl-C from then on, and so does every process it starts later (the disposition is
inherited across ``exec``, and Python keeps an inherited SIG_IGN). A peer installs its own handlers
after its averagers start, but any other process that holds an averager lost Ctrl-C: in a test run,
``potluck swarm up`` started after an in-process averager test ignored the Ctrl-C that was to stop it.

:class:`KeepsCtrlC` forks the averager with SIGINT ignored, as upstream does, and gives the parent its
handler back right after the fork. Every averager Potluck creates has it.
"""

from __future__ import annotations

import signal

from hivemind.averaging.averager import DecentralizedAverager

UPSTREAM = {
    "hivemind.averaging.averager.DecentralizedAverager.run_in_background": "028dd8b1e9b723d8",  # copied, with the handler restored
}
"""The upstream pieces this module depends on, pinned (see ``upstream.py``)."""


class KeepsCtrlC(DecentralizedAverager):
    def run_in_background(self, await_ready: bool = True, timeout: float | None = None) -> None:
        handler = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by the averager: its parent handles Ctrl-C
        try:
            self.start()
        finally:
            if handler is not None:  # None: set outside Python, nothing to give back
                signal.signal(signal.SIGINT, handler)
        if await_ready:
            self.wait_until_ready(timeout)
