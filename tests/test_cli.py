"""``run-peer`` fails fast and readably on bad input, before it joins any swarm."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from potluck.peer.launch import INTERRUPTED
from tests.helpers import address_of_a_peer_not_started, wait_until


def run_peer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "potluck.peer.launch", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpu_without_cuda_is_a_one_line_error(make_spec):
    result = run_peer("--run-spec", str(make_spec()), "--gpu", "0")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--gpu 0" in lines[0] and "CUDA is not available" in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_index_past_the_machines_devices_is_a_one_line_error(make_spec):
    missing = torch.cuda.device_count()
    result = run_peer("--run-spec", str(make_spec()), "--gpu", str(missing))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"--gpu {missing}" in lines[0] and f"0..{missing - 1}" in lines[0]


def test_bad_spec_exits_with_the_field_named(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(
        "run_id: x\nmodel: {name_or_path: m}\ndata: {path: d}\nbatch: {target_batch_size: 1, per_peer_batch_size: 4}\n"
    )
    result = run_peer("--run-spec", str(spec))
    assert result.returncode == 2
    assert "batch.target_batch_size" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_data_file_is_a_clear_error(make_spec, tmp_path):
    spec = make_spec(data={"path": str(tmp_path / "nowhere.jsonl")})
    result = run_peer("--run-spec", str(spec), "--host-maddrs", "/ip4/127.0.0.1/tcp/0")
    assert result.returncode == 2
    assert "nowhere.jsonl" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_lists_the_documented_flags():
    result = run_peer("--help")
    assert result.returncode == 0
    for flag in ("--run-spec", "--initial-peers", "--gpu", "--host-maddrs", "--announce-maddrs", "--identity-path",
                 "--metrics-port", "--save-dir", "--max-steps", "--results"):  # fmt: skip
        assert flag in result.stdout


def test_a_save_dir_that_cannot_be_created_is_a_clear_error_before_joining(make_spec, tmp_path):
    (tmp_path / "a-file").write_text("")
    result = run_peer("--run-spec", str(make_spec()), "--save-dir", str(tmp_path / "a-file" / "checkpoints"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"run-peer: --save-dir {tmp_path / 'a-file' / 'checkpoints'}: cannot create it (Not a directory)"
    ]


def test_initial_peers_that_never_answer_are_a_clear_error(make_spec, tmp_path):
    nobody, _, _ = address_of_a_peer_not_started(tmp_path)
    result = run_peer(
        "--run-spec", str(make_spec()), "--initial-peers", nobody, "--join-timeout", "2",
        "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "none of the initial peers answered" in result.stderr and nobody in result.stderr
    assert "Traceback" not in result.stderr


def test_ctrl_c_while_starting_is_one_line(make_spec):
    """Ctrl-C during the seconds of imports and start-up printed a KeyboardInterrupt traceback from
    whichever import was running (and inside torch's native code, aborted the process)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "potluck.peer.launch", "--run-spec", str(make_spec())],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        maps = Path(f"/proc/{process.pid}/maps")
        # torch's library is being loaded: run-peer's handler is in place and it is far from training
        wait_until(lambda: process.poll() is not None or "libtorch" in maps.read_text(), 60, "torch's import")
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=10)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == INTERRUPTED, stderr
    assert "Traceback" not in stderr, stderr


def test_a_finished_peer_exits_although_a_worker_thread_still_waits():
    """The interpreter's exit waits on non-daemon threads and on finalizers: a hivemind worker thread
    blocked on an abandoned averaging round held a peer that had written its summary for up to the
    round's timeout. A thread that never ends stands for it here; the process leaves at once, with the
    role's exit code and its output flushed."""
    script = textwrap.dedent("""
        import sys, threading
        from potluck.peer.launch import exit_now
        threading.Thread(target=threading.Event().wait, name="blocked-on-a-round").start()
        print("summary written", file=sys.stderr, end="")
        exit_now(3)
    """)
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (3, "summary written")
    assert time.monotonic() - started < 30  # the import of the package; the exit itself takes no time
