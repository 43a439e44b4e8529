"""``potluck chat MODEL_DIR``: talk to a trained checkpoint, to see what a stage changed.

``MODEL_DIR`` is a checkpoint folder, a ``--save-dir`` (its newest checkpoint is used) or any causal-LM folder.
Prompts are sent as raw text, laid out as the stages train them (BOS + prompt); ``--chat-template`` wraps each
one in the tokenizer's chat template instead. ``--prompt`` (repeatable) answers and exits, for scripts and tests.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

from potluck.peer.training.stages.data import encode_prompt, left_pad
from potluck.peer.training.stages.models import load_frozen_causal_lm, resolve_weights
from potluck.peer.training.stages.rollout import generate_rollouts


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

    def answer(self, prompt: str) -> str:
        text = [{"role": "user", "content": prompt}] if self.chat_template else prompt
        ids, mask = left_pad([encode_prompt(text, self.tokenizer)], self.tokenizer.pad_token_id)
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
    parser.add_argument("--chat-template", action="store_true", help="wrap prompts in the chat template")
    args = parser.parse_args(argv)
    try:
        chat = Chat(args.model_dir, args.max_new_tokens, args.temperature, args.chat_template)
    except (OSError, ValueError) as e:
        print(f"potluck chat: {e}", file=sys.stderr)
        return 2
    if args.prompt:
        for prompt in args.prompt:
            print(f"{prompt}{chat.answer(prompt)}", flush=True)
        return 0
    print(f"potluck chat: {chat.path} (empty line or Ctrl-D to quit)", file=sys.stderr)
    while True:
        try:
            prompt = input("> ")
        except EOFError:
            break
        if not prompt.strip():
            break
        print(chat.answer(prompt), flush=True)
    return 0
