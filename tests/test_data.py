"""TRL's dataset formats become the right tokens and labels (one BOS, the chat template applied once, rows that
``max_length`` leaves nothing to train on dropped or refused); each peer walks the data in its own order."""

from __future__ import annotations

import json
import logging

import pytest
from transformers import AutoTokenizer

from potluck.peer.cli import main as run_peer_main
from potluck.peer.results import read_events
from potluck.peer.training.data import (
    IGNORE_INDEX,
    DatasetFormatError,
    PeerDataStream,
    detect_format,
    peer_seed,
    tokenize_example,
)
from potluck.peer.training.stages.data import stage_data
from potluck.protocols.runspec import DataSpec, load_run_spec

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tokenizer(tiny_assets):
    return AutoTokenizer.from_pretrained(tiny_assets["model"])


def test_prompt_completion_trains_on_completion_only(tokenizer):
    example = tokenize_example({"prompt": "12+3=", "completion": "15"}, "prompt_completion", tokenizer, 64)
    prompt_len = 1 + len(tokenizer("12+3=", add_special_tokens=False).input_ids)  # BOS + prompt
    assert example.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert tokenizer.decode(example.labels[prompt_len:], skip_special_tokens=True) == "15"
    assert example.labels[-1] == tokenizer.eos_token_id
    assert example.input_ids[prompt_len:] == example.labels[prompt_len:]


def test_messages_train_on_the_last_assistant_turn(tokenizer):
    row = {"messages": [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"}]}
    example = tokenize_example(row, "messages", tokenizer, 64)
    trained = [t for t in example.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(trained, skip_special_tokens=True) == "3"
    assert "1+2=" in tokenizer.decode(example.input_ids)


def test_text_trains_on_every_token(tokenizer):
    example = tokenize_example({"text": "1+1=2"}, "text", tokenizer, 64)
    assert IGNORE_INDEX not in example.labels[1:]


def test_truncation(tokenizer):
    example = tokenize_example({"text": "1" * 100}, "text", tokenizer, 16)
    assert len(example.input_ids) == len(example.labels) == 16


def test_format_detection_and_errors():
    assert detect_format({"prompt": "a", "completion": "b"}, "auto") == "prompt_completion"
    assert detect_format({"messages": []}, "auto") == "messages"
    assert detect_format({"text": "x"}, "auto") == "text"
    with pytest.raises(DatasetFormatError, match=r"cannot tell the data format from columns \['question'\]"):
        detect_format({"question": "a"}, "auto")
    with pytest.raises(DatasetFormatError, match=r"missing \['completion'\]"):
        detect_format({"prompt": "a"}, "prompt_completion")


def _first_batches(stream, seed, n=3):
    batches = stream.batches(seed)
    return [next(batches)["input_ids"].tolist() for _ in range(n)]


def test_peers_see_different_samples_deterministically(tiny_assets, tokenizer):
    stream = PeerDataStream(DataSpec(path=str(tiny_assets["train"]), max_length=16), tokenizer, batch_size=8)
    alice, bob = peer_seed(0, "peer-a"), peer_seed(0, "peer-b")
    assert _first_batches(stream, alice) == _first_batches(stream, alice)
    assert _first_batches(stream, alice) != _first_batches(stream, bob)
    assert peer_seed(1, "peer-a") != alice


def test_stream_covers_the_dataset_before_repeating(tmp_path, tokenizer):
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps({"text": str(i)}) + "\n" for i in range(10)))
    stream = PeerDataStream(DataSpec(path=str(path), max_length=8), tokenizer, batch_size=5)
    batches = stream.batches(seed=1)
    first_pass = next(batches)["input_ids"].tolist() + next(batches)["input_ids"].tolist()
    texts = {tokenizer.decode(row, skip_special_tokens=True) for row in first_pass}
    assert texts == {str(i) for i in range(10)}


def test_smaller_batches_take_the_same_rows_in_the_same_order(tmp_path, tokenizer):
    # a peer whose share of a global step is less than its batch (hivemind_ext/tracker.py) asks for
    # fewer rows; the rows it did not take come next, so its walk through the data is unchanged
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps({"text": str(i)}) + "\n" for i in range(10)))
    stream = PeerDataStream(DataSpec(path=str(path), max_length=8), tokenizer, batch_size=5)

    def texts(batches):
        return [
            tokenizer.decode(row, skip_special_tokens=True)
            for b in batches
            for row in b["input_ids"].tolist()
        ]

    whole = stream.batches(seed=3)
    parts = stream.batches(seed=3)
    assert texts([next(whole) for _ in range(3)]) == texts([parts.take(n) for n in (2, 3, 1, 4, 5)])
    assert len(parts.take(99)["input_ids"]) == 5  # never more than the spec's batch


def test_empty_and_missing_data_are_clear_errors(tmp_path, tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DatasetFormatError, match="has no rows"):
        PeerDataStream(DataSpec(path=str(empty)), tokenizer, 4)
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        PeerDataStream(DataSpec(path=str(tmp_path / "absent.jsonl")), tokenizer, 4)


# -- one BOS, the chat template applied once (issue #18) ----------------------------------------------------------

QUESTION = [{"role": "user", "content": "1+2="}]
ANSWER = [{"role": "assistant", "content": "3"}]


@pytest.fixture(scope="module")
def bos_template_tokenizer(bos_template_model):
    """A Llama-3-style tokenizer: its chat template starts with ``{{ bos_token }}``."""
    tokenizer = AutoTokenizer.from_pretrained(bos_template_model)
    assert tokenizer.chat_template.startswith("{{ bos_token }}")
    return tokenizer


def write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.mark.parametrize(
    "row",
    [
        {"messages": QUESTION + ANSWER},
        {"prompt": QUESTION, "completion": ANSWER},  # TRL's conversational prompt/completion
        {"prompt": "1+2=", "completion": "3"},
        {"prompt": "<s>1+2=", "completion": "3"},  # text a template already rendered, BOS included
        {"text": "1+2=3"},
        {"text": "<s>user: 1+2=</s>assistant: 3</s>"},  # a conversation a template rendered into text
    ],
    ids=[
        "messages",
        "conversational-prompt-completion",
        "prompt-completion",
        "prompt-with-bos",
        "text",
        "rendered-text",
    ],  # fmt: skip
)
def test_sft_data_holds_exactly_one_bos_at_the_start(tmp_path, bos_template_tokenizer, row):
    tokenizer = bos_template_tokenizer
    stream = PeerDataStream(DataSpec(path=write_rows(tmp_path / "d.jsonl", [row])), tokenizer, batch_size=1)
    (example,) = stream.examples
    assert example.input_ids[0] == tokenizer.bos_token_id
    assert example.input_ids.count(tokenizer.bos_token_id) == 1, tokenizer.decode(example.input_ids)
    trained = [t for t in example.labels if t != IGNORE_INDEX]
    assert trained[-1] == tokenizer.eos_token_id != trained[-2]  # one EOS ends the completion, not two


def test_a_conversation_is_laid_out_by_its_template_once(bos_template_tokenizer):
    example = tokenize_example({"messages": QUESTION + ANSWER}, "messages", bos_template_tokenizer, 64)
    # exactly what the template renders for the whole conversation: nothing added, nothing doubled
    whole = bos_template_tokenizer.apply_chat_template(QUESTION + ANSWER, tokenize=False)
    assert bos_template_tokenizer.decode(example.input_ids) == whole == "<s>user: 1+2=</s>assistant: 3</s>"
    trained = [t for t in example.labels if t != IGNORE_INDEX]
    assert bos_template_tokenizer.decode(trained) == "3</s>"  # the loss covers the answer and its end of turn


def test_preference_pairs_hold_one_bos_on_each_side(make_spec, bos_template_model, tmp_path):
    rows = [
        {"prompt": QUESTION, "chosen": "3", "rejected": "4"},
        {"prompt": "1+2=", "chosen": "3", "rejected": "4"},
    ]
    spec = load_run_spec(make_spec(stage="dpo", model={"name_or_path": str(bos_template_model)},
                                   data={"path": write_rows(tmp_path / "pairs.jsonl", rows), "eval_path": None, "max_length": 64}))  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(bos_template_model)
    stream = PeerDataStream(spec.data, tokenizer, 2, stage_data(spec, tokenizer))
    assert len(stream.examples) == 2
    for pair in stream.examples:
        for side in (pair.chosen, pair.rejected):
            assert (
                side.input_ids.count(tokenizer.bos_token_id) == 1
                and side.input_ids[0] == tokenizer.bos_token_id
            )


def test_a_template_without_bos_gets_none_added(tokenizer):
    # TRL's rule: after the template, add_special_tokens=False; the bundled template does not render a BOS
    example = tokenize_example({"messages": QUESTION + ANSWER}, "messages", tokenizer, 64)
    assert tokenizer.bos_token_id not in example.input_ids
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(
        QUESTION + ANSWER, tokenize=False
    )


# -- max_length shorter than the prompts ----------------------------------------------------------------------------


def rows_with_long_prompts(long: int, total: int = 10) -> list[dict]:
    """``total`` rows of which ``long`` have a prompt past ``max_length`` 16 (every completion token cut off)."""
    return [{"prompt": ("1+" * 12 if i < long else "") + "1+1=", "completion": "2"} for i in range(total)]


def test_rows_truncated_to_no_label_are_dropped_and_counted(tmp_path, tokenizer, caplog):
    path = write_rows(tmp_path / "d.jsonl", rows_with_long_prompts(3))
    stream = PeerDataStream(DataSpec(path=path, max_length=16), tokenizer, batch_size=4)
    assert (len(stream.examples), stream.dropped) == (7, 3)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "data.max_length=16" in warning and "3 of 10 rows" in warning and "\n" not in warning
    batches = stream.batches(seed=0)
    for _ in range(5):  # every batch has tokens to train on: its loss is a number, not NaN
        assert ((next(batches)["labels"] != IGNORE_INDEX).sum(dim=1) > 0).all()


def test_data_mostly_truncated_to_no_label_is_refused(tmp_path, tokenizer):
    path = write_rows(tmp_path / "d.jsonl", rows_with_long_prompts(6))
    with pytest.raises(DatasetFormatError, match=r"data.max_length=16 truncates away every completion token of 6 "
                                                 r"of 10 rows .* above the longest prompt \(29 tokens\)"):  # fmt: skip
        PeerDataStream(DataSpec(path=path, max_length=16), tokenizer, batch_size=4)


def test_run_peer_refuses_such_data_in_one_line_before_joining(make_spec, tmp_path, capsys):
    path = write_rows(tmp_path / "d.jsonl", rows_with_long_prompts(6))
    results = tmp_path / "peer.events.jsonl"
    code = run_peer_main(["--run-spec", str(make_spec(data={"path": path})), "--results", str(results)])
    assert code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(
        "run-peer: data.max_length=16 truncates away every completion token of 6 of 10 rows"
    )
    events = read_events(results)
    assert [e["event"] for e in events] == ["summary"]  # no DHT started, nothing joined
    assert events[-1]["exit_reason"].startswith("error: DatasetFormatError: data.max_length=16")
