"""``bench/vs_torchft.py`` without torchft: it imports, says in one line which extra it needs, and its timing
measures give the figures its docstring defines (``make test`` never installs torchft)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def vs_torchft(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setitem(sys.modules, "torchft", None)  # import torchft raises ImportError, installed or not
    return importlib.import_module("vs_torchft")


def test_without_torchft_it_names_the_extra_in_one_line(vs_torchft, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["vs_torchft.py", "--runs", "1"])
    assert vs_torchft.main() == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vs-torchft" in err and "make bench-vs-torchft" in err


def test_step_round_and_training_as_defined(vs_torchft):
    def iteration(start, seconds, outer=False):
        return {"start": start, "end": start + seconds, "outer": outer}

    # replica a: steps of 0.1 s, then a round iteration of 0.6 s (0.5 s beyond a step); b: 0.2 s and 1.2 s
    a = [iteration(10.0, 0.1), iteration(10.1, 0.1), iteration(10.2, 0.1), iteration(10.3, 0.6, True)]
    b = [iteration(10.5, 0.2), iteration(10.7, 0.2), iteration(10.9, 1.2, True)]
    found = vs_torchft.timing_measures([a, b])
    assert found["step"] == pytest.approx(0.15)  # the median of the replicas' medians
    assert found["round"] == pytest.approx(0.75)  # the median of 0.5 and 1.0
    assert found["training"] == pytest.approx(12.1 - 10.0)  # earliest first step to latest last outer step
