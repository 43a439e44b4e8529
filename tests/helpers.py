"""Helpers shared by the multi-process tests: wait on a condition, read Prometheus text."""

from __future__ import annotations

import re
import time
import urllib.request


def wait_until(condition, timeout: float, what: str, interval: float = 0.3):
    """Poll ``condition`` until it returns something truthy (returned) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)  # the poll period of a deadline-bounded wait, not a guess at timing
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def metric(text: str, name: str) -> float | None:
    """The value of the first series of ``name`` in Prometheus exposition ``text``."""
    match = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None
