"""Load a page in headless Chromium, as a person's browser would, and collect what it left behind.

One Chromium run gives the DOM after the page's scripts ran (``--dump-dom``), a screenshot, and the
page's console messages (``--enable-logging=stderr`` writes them as ``CONSOLE`` lines). Virtual time
(``--virtual-time-budget``) lets timers and polling run for that many milliseconds of page time without
the test waiting on the wall clock for them.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

# Everything that would reach outside 127.0.0.1 or depend on a desktop session is off.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # we run as root in CI, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
)

# Chromium writes a page's console message as, e.g. (older builds say "CONSOLE(3)"):
#   [pid:tid:date/time:INFO:CONSOLE:3] "Uncaught Error: boom", source: http://127.0.0.1:8000/ (3)
_CONSOLE_LINE = re.compile(
    r':CONSOLE[:(]?\d*\)?\] "(?P<message>.*)", source: (?P<source>\S*) \((?P<line>\d+)\)'
)


@dataclass(frozen=True)
class PageCapture:
    dom: str
    """The serialised DOM once the virtual-time budget ran out."""
    console: list[str]
    """The page's console messages, as ``message (source:line)``. Chromium logs every level as INFO,
    so errors cannot be told from plain logs here."""
    stderr: str


def find_chromium() -> str | None:
    """Debian's ``chromium`` (the Makefile installs it for CI), or ``None``."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def capture_page(
    url: str,
    profile_dir: Path,
    screenshot: Path | None = None,
    virtual_time_ms: int = 10_000,
    window_size: tuple[int, int] = (1280, 900),
    timeout_s: float = 120.0,
) -> PageCapture:
    """Run Chromium on ``url`` once; raise ``RuntimeError`` if it fails or outlives ``timeout_s``.

    ``profile_dir`` must be fresh per call (Chromium locks it). Chromium and all its helper processes
    (zygote, renderer, GPU) run in their own process group, which is killed whatever happens.
    """
    chromium = find_chromium()
    if chromium is None:
        raise RuntimeError("chromium is not installed")
    command = [
        chromium,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile_dir}",
        f"--virtual-time-budget={virtual_time_ms}",
        f"--window-size={window_size[0]},{window_size[1]}",
    ]
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        command.append(f"--screenshot={screenshot}")
    command += ["--dump-dom", url]

    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        stdout, stderr = process.communicate()
        raise RuntimeError(
            f"chromium did not finish within {timeout_s} s; stderr tail:\n{stderr[-3000:]}"
        ) from None
    finally:
        _kill_group(process)
    if process.returncode != 0:
        raise RuntimeError(f"chromium exited with {process.returncode}; stderr tail:\n{stderr[-3000:]}")
    console = [
        f"{m['message']} ({m['source']}:{m['line']})"
        for m in map(_CONSOLE_LINE.search, stderr.splitlines())
        if m
    ]
    return PageCapture(dom=stdout, console=console, stderr=stderr)


def _kill_group(process: subprocess.Popen) -> None:
    # The browser process may have exited while helpers it forked linger; the group reaches them all.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
