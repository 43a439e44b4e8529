"""What each stage reads from a dataset: the columns it needs, how a row is tokenised, how rows become a batch.

- ``sft`` / ``distill``: TRL's language-modeling formats (``peer/training/data.py``): tokens with labels on the completion.
- ``rm`` / ``dpo``: preference pairs ``prompt``/``chosen``/``rejected``. A batch stacks the chosen sequences on
  top of the rejected ones: rows ``0..B-1`` are chosen, ``B..2B-1`` the rejected of the same pairs. ``rm`` lays a
  sequence out as its reward model's tokenizer frames one (``reward_model_example``: decoder or encoder).
- ``grpo`` / ``ppo``: prompt-only rows (``prompt``, and ``answer`` for the ``exact_answer`` reward). A batch is the
  left-padded prompts, ready for ``generate``, plus the answers as strings (they never leave the peer).

A dataset that lacks a stage's columns fails when the data is loaded, before any model or swarm is started, with a
message that names the missing columns and the stage's expected format (``STAGE_DATA_FORMATS``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from potluck.peer.training.data import (
    IGNORE_INDEX,
    DatasetFormatError,
    TokenizedExample,
    collate,
    detect_format,
    encode_prompt,
    encode_turns,
    numbered_rows,
    turn_text,
)
from potluck.protocols.runspec import EXACT_ANSWER, STAGE_DATA_FORMATS, RunSpec

PREFERENCE_STAGES = ("rm", "dpo")
PROMPT_STAGES = ("grpo", "ppo")


def required_columns(spec: RunSpec) -> tuple[str, ...]:
    """Columns every row must have for ``spec.stage`` (empty: one of TRL's formats, checked by ``detect_format``)."""
    if spec.stage in PREFERENCE_STAGES:
        return ("prompt", "chosen", "rejected")
    if spec.stage in PROMPT_STAGES:
        return ("prompt", "answer") if spec.rl.reward == EXACT_ANSWER else ("prompt",)
    return ()


def check_columns(spec: RunSpec, row: dict[str, Any], source: str, data_format: str | None = None) -> None:
    """Raise :class:`DatasetFormatError` naming the columns ``row`` lacks for the run's stage (and, for the
    language-modeling stages, for ``data_format`` when given, else ``data.format``)."""
    needed = required_columns(spec)
    if not needed:
        try:
            detect_format(row, data_format or spec.data.format)
        except DatasetFormatError as e:
            raise DatasetFormatError(
                f"{source} does not fit stage {spec.stage!r}: {e}; expected {STAGE_DATA_FORMATS[spec.stage]}"
            ) from None
        return
    missing = [c for c in needed if c not in row]
    if missing:
        why = " (rl.reward is exact_answer)" if "answer" in missing else ""
        raise DatasetFormatError(
            f"{source} is missing column(s) {missing} needed by stage {spec.stage!r}{why}; row has {sorted(row)}; "
            f"expected {STAGE_DATA_FORMATS[spec.stage]}"
        )


def check_stage_data(spec: RunSpec) -> None:
    """Check every row of the training and held-out data against the stage (cheap: no tokenizer, no model): each
    line of a JSONL file is a JSON object with the stage's columns, in the format the first row was taken for.
    Errors name the field, the file and the line (a bad line was a ``JSONDecodeError`` without either, a row that
    lacked a column a ``KeyError`` while the data was tokenised)."""
    for field, path in (("data.path", spec.data.path), ("data.eval_path", spec.data.eval_path)):
        if path is None:
            continue
        try:
            rows = numbered_rows(path, spec.data.split)
        except DatasetFormatError as e:
            raise DatasetFormatError(f"{field} {e}") from None
        except FileNotFoundError:
            raise FileNotFoundError(f"{field} {path!r}: no such file") from None
        if not rows:
            raise DatasetFormatError(f"{field} {path!r} has no rows")
        first_format = None
        for line, row in rows:
            check_columns(spec, row, f"{field} {path!r}" + (f" line {line}" if line else ""), first_format)
            if first_format is None and not required_columns(spec):
                first_format = detect_format(row, spec.data.format)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def prompt_text(prompt: Any, tokenizer) -> str:
    """A prompt column as text (what a reward function sees): a string as is, a conversation through the chat
    template with the assistant's turn opened. Its tokens are :func:`encode_prompt`'s."""
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return str(prompt)


def reward_model_example(
    prompt: Any, completion: Any, tokenizer, max_length: int | None = None
) -> TokenizedExample:
    """A prompt and its completion as a reward model reads them, in the reward model's own tokens (it need not
    share the policy's tokenizer). transformers' ``*ForSequenceClassification`` score a decoder at the last
    non-padding token and an encoder at its pooled first token, so:

    - a decoder's tokenizer (it has an EOS): laid out as SFT lays out a row (``encode_turns``: one BOS, prompt,
      completion, EOS); scored at the EOS;
    - an encoder's (BERT-style, no EOS): its own framing, ``[CLS] prompt completion [SEP]``; scored at ``[CLS]``.

    The labels mark the completion's tokens (the score needs none; they tell a truncated-away completion)."""
    if tokenizer.eos_token_id is not None:
        return encode_turns(prompt, completion, tokenizer, max_length)
    prompt = prompt_text(prompt, tokenizer)
    ids = tokenizer(
        prompt + turn_text(completion), truncation=max_length is not None, max_length=max_length
    ).input_ids
    before = len(tokenizer(prompt).input_ids) - 1  # [CLS] and the prompt (not its [SEP])
    return TokenizedExample(ids, [IGNORE_INDEX] * before + ids[before:], before)


@dataclass(frozen=True)
class PreferenceExample:
    chosen: TokenizedExample
    rejected: TokenizedExample

    @property
    def has_labels(self) -> bool:
        """Both sides keep a completion token after truncation (else the pair's log-ratios are empty)."""
        return self.chosen.has_labels and self.rejected.has_labels

    @property
    def prompt_tokens(self) -> int:
        return self.chosen.prompt_tokens


@dataclass(frozen=True)
class PromptExample:
    prompt: str
    prompt_ids: list[int]
    answer: str | None
    has_labels: bool = True
    """Prompt-only rows have no labels to lose: the completion is generated."""
    prompt_tokens: int = 0


def left_pad(sequences: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists (so every row's next token is at the same position, as ``generate`` wants)."""
    width = max(len(s) for s in sequences)
    input_ids = torch.tensor([[pad_token_id] * (width - len(s)) + s for s in sequences], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences], dtype=torch.long)
    return input_ids, mask


@dataclass(frozen=True)
class StageData:
    """How one stage turns rows into batches; given to ``PeerDataStream``."""

    check: Callable[[dict[str, Any], str], None]
    encode: Callable[[dict[str, Any]], Any]
    collate: Callable[[list[Any]], dict[str, Any]]


def stage_data(spec: RunSpec, tokenizer) -> StageData | None:
    """The data handling of ``spec.stage``; ``None`` for the language-modeling stages (``PeerDataStream``'s own)."""
    pad_id = _pad_id(tokenizer)
    max_length = spec.data.max_length

    def check(row: dict[str, Any], source: str) -> None:
        check_columns(spec, row, source)

    if spec.stage in PREFERENCE_STAGES:

        def encode_pair(row: dict[str, Any]) -> PreferenceExample:
            def side(completion: Any) -> TokenizedExample:
                text = completion if isinstance(completion, list) else str(completion)
                if spec.stage == "rm":  # a score per sequence, in the reward model's framing
                    return reward_model_example(row["prompt"], text, tokenizer, max_length)
                # DPO's log-probs of the completion, laid out exactly as SFT's prompt/completion rows
                return encode_turns(row["prompt"], text, tokenizer, max_length)

            return PreferenceExample(chosen=side(row["chosen"]), rejected=side(row["rejected"]))

        def collate_pairs(examples: list[PreferenceExample]) -> dict[str, Any]:
            return collate([e.chosen for e in examples] + [e.rejected for e in examples], pad_id)

        return StageData(check, encode_pair, collate_pairs)

    if spec.stage in PROMPT_STAGES:

        def encode_prompt_row(row: dict[str, Any]) -> PromptExample:
            answer = row.get("answer")
            ids = encode_prompt(row["prompt"], tokenizer)[:max_length]
            return PromptExample(
                prompt_text(row["prompt"], tokenizer), ids, None if answer is None else str(answer)
            )

        def collate_prompts(examples: list[PromptExample]) -> dict[str, Any]:
            prompt_ids, prompt_mask = left_pad([e.prompt_ids for e in examples], pad_id)
            return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
                    "prompts": [e.prompt for e in examples], "answers": [e.answer for e in examples]}  # fmt: skip

        return StageData(check, encode_prompt_row, collate_prompts)

    return None  # sft, distill: SFT's formats and collation; the column check is detect_format's


def completion_mask(labels: torch.Tensor) -> torch.Tensor:
    """1 on the positions whose *next* token is a completion token: where the logits that predict it sit."""
    mask = torch.zeros_like(labels)
    mask[:, :-1] = (labels[:, 1:] != IGNORE_INDEX).long()
    return mask
