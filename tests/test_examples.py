"""The example specs shipped in the repository stay valid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from potluck.protocols.runspec import load_run_spec

pytestmark = pytest.mark.unit

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_spec_loads(path):
    spec = load_run_spec(path)
    assert spec.run_id


def test_demo_spec_is_valid():
    from potluck.protocols.runspec import parse_run_spec
    from potluck.tools.demo import DEMO_SPEC

    assert (
        parse_run_spec(DEMO_SPEC).batch.target_batch_size
        >= parse_run_spec(DEMO_SPEC).batch.per_peer_batch_size
    )


def test_demo_pads_operands_and_holds_out_the_same_problems():
    from potluck.tools.demo import DEMO_TASK
    from potluck.tools.tiny.task import ArithmeticTask

    assert DEMO_TASK.example(7, 38) == {"prompt": "07+38=", "completion": "45"}
    assert DEMO_TASK.problems(held_out=True) == ArithmeticTask().problems(held_out=True)


def test_demo_ends_with_three_held_out_problems_before_and_after(tmp_path, capsys):
    from potluck.peer.training.exact_match import EvalResult
    from potluck.tools.demo import EXAMPLES_TITLE, print_examples

    rows = [{"prompt": f"0{i}+10=", "completion": str(10 + i)} for i in range(6)]
    eval_path = tmp_path / "eval.jsonl"
    eval_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = EvalResult(loss=3.0, accuracy=0.0, examples=6, answers=("",) * 6)
    after = EvalResult(loss=0.1, accuracy=0.5, examples=6, answers=("10", "11", "12", "0", "0", "0"))
    print_examples(str(eval_path), before, after)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == EXAMPLES_TITLE
    shown = [line.split() for line in lines[2:]]
    assert shown == [
        ["01+10=", "11", "(none)", "11", "right"],
        ["03+10=", "13", "(none)", "0", "wrong"],
        ["05+10=", "15", "(none)", "0", "wrong"],
    ]
