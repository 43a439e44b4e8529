"""A peer whose run quantises nothing never imports bitsandbytes (``peer/unused_libraries.py``); one that does,
and one whose spec cannot be read yet, still can.

Each case is a fresh process doing what ``run-peer`` does: leave out what the ``--run-spec`` does not need, then
import the whole peer, then ask peft and transformers whether bitsandbytes is there."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from potluck.peer.unused_libraries import quantises_nothing

pytestmark = pytest.mark.integration
pytest.importorskip("bitsandbytes")  # installed with the dev extra; without it there is nothing to leave out

PEER = """
import json, sys
from potluck.peer.unused_libraries import leave_out_unused_libraries
left_out = leave_out_unused_libraries(sys.argv[1:])
import potluck.peer.cli  # everything run-peer imports
from peft.import_utils import is_bnb_available
from transformers.utils import is_bitsandbytes_available
print(json.dumps({
    "left_out": left_out,
    "imported": sys.modules.get("bitsandbytes") is not None,
    "peft_sees_it": is_bnb_available(),
    "transformers_sees_it": is_bitsandbytes_available(),
}))
"""


def _peer_imports(*argv: str) -> dict[str, bool]:
    done = subprocess.run(
        [sys.executable, "-c", PEER, *argv], capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _model_folder(tmp_path, name: str, **config) -> str:
    """A model folder as far as this check reads it: its ``config.json``."""
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", **config}))
    return str(folder)


def _spec(tmp_path, name_or_path: str | None = None, quantization: str = "none", **sections) -> str:
    path = tmp_path / "run.yaml"
    spec = {
        "run_id": "imports",
        "model": {
            "name_or_path": name_or_path or _model_folder(tmp_path, "tiny-model"),
            "quantization": quantization,
        },
        "adapter": {"kind": "lora"},
        "data": {"path": "train.jsonl"},
        "batch": {"target_batch_size": 8, "per_peer_batch_size": 8},
        **sections,
    }
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_a_run_that_quantises_nothing_leaves_bitsandbytes_out(tmp_path):
    found = _peer_imports("--run-spec", _spec(tmp_path), "--max-steps", "3")
    assert found == {
        "left_out": True,
        "imported": False,
        "peft_sees_it": False,
        "transformers_sees_it": False,
    }


def test_a_quantised_run_keeps_bitsandbytes_for_peft_and_transformers(tmp_path):
    quantised = _peer_imports("--run-spec", _spec(tmp_path, quantization="4bit"))
    assert quantised["left_out"] is False and quantised["peft_sees_it"] and quantised["transformers_sees_it"]


def test_a_spec_or_model_that_is_quantised_or_cannot_be_read_here_is_not_taken_for_unquantised(tmp_path):
    """The same decision the process above acts on, asked in this process for each case it must not leave
    bitsandbytes out in (a process each cost 5 s of the suite)."""
    assert quantises_nothing(
        ("--run-spec", _spec(tmp_path), "--max-steps", "3")
    )  # the case above, as a control
    saved_quantised = _model_folder(tmp_path, "teacher-4bit", quantization_config={"load_in_4bit": True})
    for argv in (
        ("--run-spec", _spec(tmp_path, quantization="4bit")),
        ("--coordinator", "127.0.0.1:1"),  # the spec comes later
        ("--coordinator", "127.0.0.1:1", "--run", _spec(tmp_path)),  # not --run-spec by abbreviation
        ("--run-spec", str(tmp_path / "missing.yaml")),
        ("--run-spec", _spec(tmp_path, name_or_path="HuggingFaceTB/SmolLM2-135M")),  # a hub id: not read here
        ("--run-spec", _spec(tmp_path, stage="distill", teacher={"path": saved_quantised})),
    ):
        assert not quantises_nothing(argv), argv
