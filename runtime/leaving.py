"""A process asked to leave ends within seconds, also when what its orderly leave waits on is gone.

A signal asks a role to finish its step, save and leave in order (``peer/roles/trainer.py``,
``install_stop_handlers``). That order needs the peer's helper processes, and a signal sent to the whole
process group (``kill -TERM -- -PGID``; what systemd sends a service's processes by default) ends libp2p's
daemon with them: a lone peer waiting for its partners then sat in a DHT call that nothing would ever answer,
still running 15 minutes after the SIGTERM. :func:`leave_within` arms a deadline for the leave; past it the
process ends with one line naming where it was stuck. A checkpoint being written (:func:`saving`) is let
finish first: a stopped peer keeps what it trained.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LEAVE_SECONDS = 9.0
"""How long an orderly leave may take (issue 16: a signalled peer ends within 10 s, at every phase)."""

_PACKAGE = Path(__file__).resolve().parents[1]
_ENVIRONMENT = Path(sys.prefix).resolve()  # (a .venv may sit inside the package's folder)
_saving = threading.Lock()
_armed = threading.Event()


@contextmanager
def saving() -> Iterator[None]:
    """While this runs, a leave's deadline waits for it (a checkpoint is written once, whole, or not at all)."""
    with _saving:
        yield


def leave_within(seconds: float, code: int, what: str) -> None:
    """End this process with ``code`` if it still runs ``seconds`` from now (the first call arms it; later
    ones do nothing). ``what`` starts the line it prints (``run-peer``)."""
    if _armed.is_set():
        return
    _armed.set()
    main = threading.main_thread().ident

    def expire() -> None:
        time.sleep(seconds)
        with _saving:
            print(f"{what}: could not leave in order within {seconds:g} s (waiting in {stuck_at(main)}); "
                  f"exiting now", file=sys.stderr, flush=True)  # fmt: skip
            sys.stdout.flush()
            os._exit(code)

    threading.Thread(target=expire, name="potluck-leave-deadline", daemon=True).start()


def stuck_at(thread_id: int) -> str:
    """Where a thread is now: the innermost call of this package's code, and the library call it made there
    (``announce_and_count (hivemind_ext/tracker.py:485) calling store (hivemind/dht/dht.py)``)."""
    frame = sys._current_frames().get(thread_id)
    if frame is None:
        return "?"
    stack = traceback.extract_stack(frame)
    at = next((i for i in reversed(range(len(stack))) if _is_own(stack[i].filename)), None)
    if at is None:
        return f"{stack[-1].name} ({_library_path(stack[-1].filename)})"
    own = stack[at]
    where = f"{own.name} ({Path(own.filename).resolve().relative_to(_PACKAGE)}:{own.lineno})"
    if at + 1 == len(stack):
        return where
    called = stack[at + 1]
    return f"{where} calling {called.name} ({_library_path(called.filename)})"


def _is_own(filename: str) -> bool:
    path = Path(filename).resolve()
    return path.is_relative_to(_PACKAGE) and not path.is_relative_to(_ENVIRONMENT)


def _library_path(filename: str) -> str:
    """``hivemind/dht/dht.py`` of ``…/site-packages/hivemind/dht/dht.py``."""
    parts = Path(filename).parts
    return (
        str(Path(*parts[parts.index("site-packages") + 1 :]))
        if "site-packages" in parts
        else Path(filename).name
    )
