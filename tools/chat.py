"""``potluck chat MODEL_DIR``: talk to a trained checkpoint, to see what a stage changed.

``MODEL_DIR`` is a checkpoint folder, a ``--save-dir`` (its newest checkpoint is used) or any causal-LM folder.
Prompts are sent as raw text, laid out as the stages train them (one BOS + prompt); ``--chat-template`` sends
each one as a user turn through the tokenizer's chat template instead (the template's own BOS, none added).
``potluck generate`` takes the same prompt options (:func:`add_prompt_options`). ``--prompt`` (repeatable)
answers and exits, for scripts and tests.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

from potluck.peer.training.data import encode_prompt, user_prompt
from potluck.peer.training.stages.data import left_pad
from potluck.peer.training.stages.models import load_frozen_causal_lm, resolve_weights
from potluck.peer.training.stages.rollout import generate_rollouts


def add_prompt_options(parser: argparse.ArgumentParser) -> None:
    """How a prompt reaches the model: the options ``potluck chat`` and ``potluck generate`` share."""
    parser.add_argument(
        "--chat-template",
        action="store_true",
        help="send the prompt as a user turn through the tokenizer's chat template (instruct models)",
    )
    parser.add_argument(
        "--show-prompt",
        action="store_true",
        help="print each prompt's tokens as the model gets them (BOS and chat markup shown) to stderr",
    )


def show_prompt(command: str, prompt: str) -> None:
    print(f"{command}: prompt tokens {prompt!r}", file=sys.stderr)


class Chat:
    def __init__(
        self, model_dir: Path, max_new_tokens: int = 32, temperature: float = 0.0, chat_template=False
    ):
        path = resolve_weights(str(model_dir), None, "MODEL_DIR")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = load_frozen_causal_lm(path, torch.device("cpu"))
        self.path = path
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature or None  # 0: greedy
        self.chat_template = chat_template

    def prompt_ids(self, prompt: str) -> list[int]:
        return encode_prompt(user_prompt(prompt, self.chat_template), self.tokenizer)

    def answer(self, prompt: str, show: bool = False) -> str:
        prompt_ids = self.prompt_ids(prompt)
        if show:
            show_prompt("potluck chat", self.tokenizer.decode(prompt_ids))
        ids, mask = left_pad([prompt_ids], self.tokenizer.pad_token_id)
        rollouts = generate_rollouts(
            self.model, self.tokenizer, ids, mask, self.max_new_tokens, self.temperature
        )
        return rollouts.completions[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="potluck chat", description=__doc__)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument(
        "--prompt", action="append", default=[], help="answer this prompt and exit (repeatable)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    add_prompt_options(parser)
    args = parser.parse_args(argv)
    try:
        chat = Chat(args.model_dir, args.max_new_tokens, args.temperature, args.chat_template)
    except (OSError, ValueError) as e:
        print(f"potluck chat: {e}", file=sys.stderr)
        return 2
    if args.prompt:
        for prompt in args.prompt:
            print(f"{prompt}{chat.answer(prompt, args.show_prompt)}", flush=True)
        return 0
    print(f"potluck chat: {chat.path} (empty line or Ctrl-D to quit)", file=sys.stderr)
    while True:
        try:
            prompt = input("> ")
        except EOFError:
            break
        if not prompt.strip():
            break
        print(chat.answer(prompt, args.show_prompt), flush=True)
    return 0
