"""Preference pairs and prompt-only data for the RLHF stages, derived from the arithmetic task.

- ``preferences_{train,eval}.jsonl``: ``prompt``/``chosen``/``rejected`` with the right sum as chosen and a wrong
  one as rejected (``rm``, ``dpo``).
- ``prompts_{train,eval}.jsonl``: ``prompt``/``answer`` for rollouts and the verifiable ``exact_answer`` reward
  (``grpo``, ``ppo``).

The held-out files use exactly the task's held-out problems, so no stage is evaluated on a problem it (or SFT)
trained on. Everything is deterministic given the seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from potluck.tools.tiny.task import ArithmeticTask


def wrong_sum(a: int, b: int, rng: random.Random) -> int:
    """A wrong answer: half of them near misses (off by 1 to 10, the errors a half-trained model makes), half
    arbitrary numbers in the task's range (a reward model can tell many of those from the sum by magnitude)."""
    right = a + b
    while True:
        guess = (
            rng.randint(0, 2 * 49) if rng.random() < 0.5 else right + rng.choice([-1, 1]) * rng.randint(1, 10)
        )
        if guess >= 0 and guess != right:
            return guess


def _write(path: Path, rows) -> Path:
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def write_rlhf_data(
    task: ArithmeticTask, out_dir: Path, train_pairs: int = 5000, seed: int = 0
) -> dict[str, Path]:
    """Write the four files to ``out_dir``; return their paths by name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    train, held_out = task.problems(held_out=False), task.problems(held_out=True)

    def pair(a: int, b: int) -> dict[str, str]:
        return {"prompt": task.prompt(a, b), "chosen": str(a + b), "rejected": str(wrong_sum(a, b, rng))}

    def prompt(a: int, b: int) -> dict[str, str]:
        return {"prompt": task.prompt(a, b), "answer": str(a + b)}

    return {
        "preferences_train": _write(out_dir / "preferences_train.jsonl",
                                    (pair(*rng.choice(train)) for _ in range(train_pairs))),
        "preferences_eval": _write(out_dir / "preferences_eval.jsonl", (pair(a, b) for a, b in held_out)),
        "prompts_train": _write(out_dir / "prompts_train.jsonl", (prompt(a, b) for a, b in train)),
        "prompts_eval": _write(out_dir / "prompts_eval.jsonl", (prompt(a, b) for a, b in held_out)),
    }  # fmt: skip
