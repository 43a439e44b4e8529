"""``potluck demo --moe`` as a user runs it: two expert servers and a client on the tiny mixture of experts learn the
demo task, and the before/after table says so."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow]


def test_demo_moe_trains_through_expert_servers_and_prints_before_and_after(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "potluck.tools.cli", "demo", "--moe", "--max-steps", "100", "--workdir",
         str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]  # 0: the held-out accuracy rose
    (before, after) = map(float, re.search(r"loss \(per token\)\s+([\d.]+)\s+([\d.]+)", output).groups())
    assert after < before / 2, output[-2000:]
    assert "trains through 2 expert servers" in output
    assert "'dropped': 0" in output and "'failures': 0" in output  # every expert answered
    assert "Warning" not in output
