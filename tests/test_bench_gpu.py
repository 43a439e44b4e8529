"""``bench/gpu.py --dry``: the GPU benchmark's trials of both sides run end to end on the CPU, so it still works
when a GPU is lent. Its figures mean nothing here. Its pair of ``run-peer``s (``--pair-steps``) is left out:
40 s of the suite for two peers that ``tests/test_swarm.py`` already runs the same way (``--gpu`` on a lent
GPU, ``test_two_peers_end_equal_and_loss_falls[gpu]``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_the_gpu_bench_runs_dry_on_the_cpu(tmp_path):
    done = subprocess.run(
        [sys.executable, str(BENCH), "--dry", "--runs", "1", "--pair-steps", "0", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    last = dict(pair.split("=", 1) for pair in done.stdout.strip().splitlines()[-1].split())
    assert float(last["tokens_ratio"]) > 0 and last["pair_equal"] == "skipped", done.stdout
    assert last["device"] == "cpu_(dry_run)"
