"""A deterministic arithmetic task with a held-out split, in TRL's prompt/completion format.

Problems are ``a+b=`` with the sum as completion. Which problems are held out is decided by a hash of
the problem, so the split is the same on every machine and train and eval never share a problem.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ALPHABET = "0123456789+="


@dataclass(frozen=True)
class ArithmeticTask:
    max_operand: int = 49
    """Operands are drawn from 0..max_operand: 49 gives 2,500 distinct problems, which the tiny model
    learns to a clearly measurable accuracy in a few hundred global steps on a CPU."""
    eval_fraction: float = 0.1
    """Share of distinct problems held out for evaluation."""
    operand_digits: int = 1
    """Write operands zero-padded to this many digits: 2 gives ``07+38=``. Then each digit sits at the
    same distance from ``=`` in every problem, and the tiny model (rotary positions only) learns the
    units digit far sooner: at lr 3e-3, held-out accuracy after 150 steps was 49-83 % with 2 and 6-41 %
    with 1 (``7+38=``, which needed about 400 steps for 80-90 %; single process, 3 data
    orders). The answer is never padded; which problems are held out does not change."""

    def is_held_out(self, a: int, b: int) -> bool:
        digest = hashlib.sha256(f"{a}+{b}".encode()).digest()
        return int.from_bytes(digest[:4], "big") / 2**32 < self.eval_fraction

    def prompt(self, a: int, b: int) -> str:
        return f"{a:0{self.operand_digits}d}+{b:0{self.operand_digits}d}="

    def example(self, a: int, b: int) -> dict[str, str]:
        return {"prompt": self.prompt(a, b), "completion": str(a + b)}

    def problems(self, held_out: bool) -> list[tuple[int, int]]:
        span = range(self.max_operand + 1)
        return [(a, b) for a in span for b in span if self.is_held_out(a, b) == held_out]

    def sample_stream(self, seed: int) -> Iterator[dict[str, str]]:
        """An endless stream of training examples, deterministic given ``seed``."""
        rng = random.Random(seed)
        train = self.problems(held_out=False)
        while True:
            yield self.example(*rng.choice(train))

    def write(self, out_dir: Path, train_size: int = 20_000, seed: int = 0) -> tuple[Path, Path]:
        """Write ``train.jsonl`` (sampled with replacement) and ``eval.jsonl`` (every held-out problem)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        train_path, eval_path = out_dir / "train.jsonl", out_dir / "eval.jsonl"
        stream = self.sample_stream(seed)
        with train_path.open("w") as f:
            for _ in range(train_size):
                f.write(json.dumps(next(stream)) + "\n")
        with eval_path.open("w") as f:
            for a, b in self.problems(held_out=True):
                f.write(json.dumps(self.example(a, b)) + "\n")
        return train_path, eval_path

    def corpus(self) -> Iterator[str]:
        """Text to train the tokenizer on."""
        for a, b in self.problems(held_out=False)[:2000]:
            example = self.example(a, b)
            yield example["prompt"] + example["completion"]
