"""TRL's dataset formats become the right tokens and labels; each peer walks the data in its own order."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from potluck.peer.training.data import (
    IGNORE_INDEX,
    DatasetFormatError,
    PeerDataStream,
    detect_format,
    peer_seed,
    tokenize_example,
)
from potluck.protocols.runspec import DataSpec

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
