"""The training loop obeys the run's status through ``RunGate`` (``peer/training/pause.py``): no local step while
the run is paused, a stop request (a signal) ends the hold at once, ``finished`` ends the loop as such. One peer
and no swarm (``LocalSteps``); the swarm itself is in ``tests/test_run_status.py``."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from potluck.peer.results import PeerResults, read_events
from potluck.peer.training.data import PeerDataStream
from potluck.peer.training.loop import Trainer
from potluck.peer.training.metrics import PeerMetrics
from potluck.peer.training.pause import HOLD_CHECK_SECONDS, RunGate
from potluck.peer.training.progress import ProgressDisplay
from potluck.peer.training.stages.sft import SupervisedFineTuning
from potluck.protocols.runspec import DataSpec
from tests.helpers import wait_until
from tests.test_loop import LocalSteps, write_sums

pytestmark = pytest.mark.unit


class RecordedHolds(LocalSteps):
    def __init__(self, params):
        super().__init__(params)
        self.calls: list[str] = []

    def pause(self) -> None:
        self.calls.append(f"pause at {self.steps}")

    def resume(self) -> None:
        self.calls.append(f"resume at {self.steps}")

    def request_stop(self) -> None:
        self.calls.append(f"stop at {self.steps}")


class Status:
    """The run's status as a test sets it; ``paused_at``: the local step from which it reads ``paused``."""

    def __init__(self, strategy: LocalSteps, paused_at: int):
        self.strategy, self.paused_at = strategy, paused_at
        self.after_pause: str | None = None

    def __call__(self) -> str:
        if self.strategy.steps < self.paused_at:
            return "active"
        return self.after_pause or "paused"


def gated_trainer(tiny_assets, tmp_path, paused_at: int):
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets["model"])
    model = AutoModelForCausalLM.from_pretrained(tiny_assets["model"])
    strategy = RecordedHolds([p for p in model.parameters() if p.requires_grad])
    status, stop = Status(strategy, paused_at), threading.Event()
    results, metrics = PeerResults(tmp_path / "events.jsonl", "trainer"), PeerMetrics("run")
    path = write_sums(tmp_path / "rows.jsonl", 8)
    trainer = Trainer(model=model, stage=SupervisedFineTuning(), strategy=strategy,
                      batches=PeerDataStream(DataSpec(path=str(path)), tokenizer, 4).batches(0),
                      device=torch.device("cpu"), max_global_steps=50, metrics=metrics,
                      progress=ProgressDisplay(50, interval=60), stop=stop,
                      gate=RunGate("run", status, strategy, results, metrics, stop))  # fmt: skip
    return trainer, strategy, status, stop


def statuses(tmp_path) -> list[tuple[str, int]]:
    return [
        (e["status"], e["global_step"])
        for e in read_events(tmp_path / "events.jsonl")
        if e["event"] == "run_status"
    ]


def in_background(trainer: Trainer):
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(result=trainer.run()), daemon=True)
    thread.start()
    return thread, outcome


def test_a_paused_run_takes_no_step_until_active_and_a_finished_one_ends_the_loop(tiny_assets, tmp_path):
    trainer, strategy, status, stop = gated_trainer(tiny_assets, tmp_path, paused_at=2)
    thread, outcome = in_background(trainer)
    wait_until(lambda: statuses(tmp_path) == [("paused", 2)], 60, "the loop to hold")
    assert strategy.calls == ["pause at 2"] and strategy.steps == 2
    status.after_pause = "active"
    wait_until(lambda: strategy.steps >= 4, 60, "two more steps after the resume")
    held = [e for e in read_events(tmp_path / "events.jsonl") if e["event"] == "run_status"][1]
    assert held["status"] == "active" and held["global_step"] == 2 and held["paused_seconds"] > 0
    status.after_pause = "finished"
    thread.join(timeout=60)
    result = outcome["result"]
    assert result.run_finished and not result.stopped_by_signal
    assert statuses(tmp_path)[-1] == ("finished", result.global_step)
    # leaving: what it scheduled is released and what it waits for on the swarm gets seconds
    assert strategy.calls[:2] == ["pause at 2", "resume at 2"]
    assert strategy.calls[2:] == [f"pause at {result.global_step}", f"stop at {result.global_step}"]
    assert trainer.metrics.latest["local_steps"] == result.local_steps == result.global_step


def test_a_signal_ends_a_hold_at_once(tiny_assets, tmp_path):
    trainer, strategy, _status, stop = gated_trainer(tiny_assets, tmp_path, paused_at=1)
    thread, outcome = in_background(trainer)
    wait_until(lambda: statuses(tmp_path) == [("paused", 1)], 60, "the loop to hold")
    signalled = time.monotonic()
    stop.set()  # what run-peer's SIGTERM handler does
    thread.join(timeout=10)
    assert time.monotonic() - signalled < 4 * HOLD_CHECK_SECONDS + 1
    result = outcome["result"]
    assert result.stopped_by_signal and not result.run_finished and result.global_step == 1
    assert strategy.calls == ["pause at 1"]  # not resumed: it leaves from the hold
