"""A swarm peer's LoRA SFT on a GPU against a plain peft training loop on the same GPU: tokens/s and peak memory.

What is measured
    **trials**: the same model (a Llama of about 0.5 B parameters with a 32k vocabulary, built here from its
    config class, in bfloat16), the same LoRA adapter (r=16 on q/k/v/o), the same batches (``--batch`` rows of
    ``--length`` tokens, every row full) on one CUDA device, in two loops:

    - **plain**: a peft model and ``torch.optim.AdamW``: ``loss.backward(); opt.step(); opt.zero_grad()``;
    - **swarm**: a 1-peer swarm: a real hivemind DHT on loopback and ``GradientAveraging`` driving the step
      exactly as ``peer/training/loop.py`` does (its optimizer state offloaded to the host, as shipped).

    Each trial is a process of its own (``--trial plain|swarm``), so each side's peak memory is its own:
    ``torch.cuda.max_memory_allocated`` over the timed steps (weights, adapter, optimizer state,
    activations). A trial warms up, then times ``--steps`` steps with the device synchronised: tokens/s is
    the non-padding tokens over that wall time. The order rotates (plain, swarm, swarm, plain, ...) over
    ``--runs`` trials of each side; the ratios are swarm / plain of each pair of neighbouring trials.

    **pair**: two ``run-peer --gpu 0`` on the same GPU train ``--pair-steps`` global steps of the same run
    together (target batch = both peers' batches); printed: each peer's tokens/s from its global-step events
    after the first step, its peak GPU memory (``summary.peak_gpu_memory_bytes``), and whether their
    adapters end bit-equal.

How to read it
    One line per trial, then min / median / max of each side and of the ratios, and last
    ``tokens_ratio=MEDIAN min= max= memory_ratio=MEDIAN min= max= pair_equal=… device=…`` (issue 21's goals:
    tokens ratio >= 0.95, memory ratio <= 1.1).

``--dry`` runs all of it on the CPU with a tiny model and a few steps (``tests/test_bench_gpu.py``): it keeps
the bench from rotting; its figures mean nothing.

Run (on a machine with a CUDA device): ``.venv/bin/python bench/gpu.py --runs 3`` (a few minutes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file
from workdir import checkpoints, median_min_max, run_in_workdir, runs_parser

from potluck.tools.peer_processes import LocalSwarm
from potluck.tools.tiny.task import ALPHABET, ArithmeticTask

SCRIPT = Path(__file__).resolve()
LORA = {"kind": "lora", "r": 16, "alpha": 32.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
GPU_MODEL = {
    "vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 5632, "num_hidden_layers": 24,
    "num_attention_heads": 16, "num_key_value_heads": 4, "max_position_embeddings": 2048,
}  # fmt: skip
"""About 0.54 B parameters: Llama-shaped, as a ~0.5 B instruct checkpoint is."""
DRY_MODEL = {
    "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
}  # fmt: skip


def build_assets(folder: Path, dry: bool, length: int) -> tuple[Path, Path]:
    """The model (config class -> save_pretrained, with the tiny task's tokenizer; ids past the tokenizer's
    vocabulary are simply never used) and a text file whose every row fills ``length`` tokens."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from potluck.tools.tiny.model import train_tokenizer

    model_dir, data = folder / "model", folder / "train.jsonl"
    if not (model_dir / "config.json").exists():
        tokenizer = train_tokenizer(ArithmeticTask().corpus(), ALPHABET)
        sizes = DRY_MODEL if dry else GPU_MODEL
        config = LlamaConfig(
            **sizes, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, dtype="bfloat16",
        )  # fmt: skip
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    if not data.exists():
        problems = [f"{a}+{b}={a + b}" for a, b in ArithmeticTask().problems(held_out=False)]
        text = "".join(problems)
        rows = [text[i : i + 2 * length] for i in range(0, len(text) - 2 * length, 2 * length)]
        data.write_text("".join(json.dumps({"text": row}) + "\n" for row in rows[:256]))
    return model_dir, data


def spec_for(
    model_dir: Path, data: Path, args: argparse.Namespace, run_id: str, target: int
) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "model": {"name_or_path": str(model_dir), "dtype": "float32" if args.dry else "bfloat16"},
        "adapter": LORA,
        "data": {"path": str(data), "format": "text", "max_length": args.length},
        "optimizer": {"lr": 1e-4},
        "batch": {"target_batch_size": target, "per_peer_batch_size": args.batch},
        "averaging": {"matchmaking_time": 1.0, "averaging_timeout": 20},
    }


# -- one trial: its own process ----------------------------------------------------------------------------


def trial(side: str, spec_path: Path, steps: int, warmup: int, variant: str | None) -> dict[str, float]:
    """Run ``side``'s loop in this process (see the module docstring); its figures."""
    from overhead import Case, make_strategy, plain_loop, swarm_loop

    from potluck.hivemind_ext.dht import start_dht
    from potluck.peer.cli import configure_logging
    from potluck.peer.training.data import PeerDataStream
    from potluck.peer.training.model import build_model, load_tokenizer
    from potluck.protocols.runspec import parse_run_spec

    configure_logging(verbose=False)
    spec = parse_run_spec(yaml.safe_load(spec_path.read_text()))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    stream = PeerDataStream(spec.data, load_tokenizer(spec.model), spec.batch.per_peer_batch_size).batches(
        seed=0
    )
    batches = [{k: v.to(device) for k, v in next(stream).items()} for _ in range(warmup + steps)]
    model = build_model(spec, device)
    dht = strategy = None
    if side == "swarm":
        dht = start_dht([], ["/ip4/127.0.0.1/tcp/0"], [], None)
        strategy = make_strategy(Case("gpu", "gpu", variant=variant), spec, dht, model)
        loop = swarm_loop(spec, model, strategy)
    else:
        loop = plain_loop(spec, model)
    try:
        loop.run_steps(batches[:warmup])
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        loop.run_steps(batches[warmup:])
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    finally:
        if strategy is not None:
            strategy.shutdown()
        if dht is not None:
            dht.shutdown()
    tokens = sum(int(b["attention_mask"].sum()) for b in batches[warmup:])
    return {
        "tokens_per_s": tokens / seconds,
        "step_ms": 1000 * seconds / steps,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
    }


def run_trial(side: str, spec_path: Path, args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, str(SCRIPT), "--trial", side, "--spec", str(spec_path)]
    command += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    command += ["--variant", args.variant] if args.variant else []
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.trial_timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{side} trial exited {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


# -- two run-peers on one GPU -------------------------------------------------------------------------------


def pair(spec_path: Path, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    device = [] if args.dry else ["--gpu", "0"]
    with LocalSwarm(spec_path, folder / "logs") as swarm:
        for name in ("a", "b"):
            peer = swarm.start_peer(name, ["--save-dir", str(folder / name), "--min-peers", "2", *device])
            swarm.wait_for_address(peer)
        codes = swarm.wait_all(timeout=args.trial_timeout)
        if any(codes):
            failed = next(p for p, code in zip(swarm.peers, codes, strict=True) if code)
            raise RuntimeError(f"pair exit codes {codes}; {failed.name}:\n{failed.log()[-3000:]}")
        peers = {p.name: (p.events("global_step"), p.summary()) for p in swarm.peers}
    found = [checkpoints(folder / name) for name in ("a", "b")]
    last = max(set(found[0]) & set(found[1]))
    result: dict[str, Any] = {"equal": adapters_equal([f[last] for f in found]), "global_steps": last}
    for name, (steps, summary) in peers.items():
        # tokens per sample: every row of the bench's data fills max_length (plus BOS, cut to max_length)
        samples = steps[-1]["samples"] - steps[0]["samples"] if len(steps) > 1 else 0
        seconds = steps[-1]["time"] - steps[0]["time"] if len(steps) > 1 else float("nan")
        result[f"{name}_tokens_per_s"] = samples * args.length / seconds
        peak = summary.peak_gpu_memory_bytes if summary else None
        result[f"{name}_peak_memory_gib"] = (peak or 0) / 2**30
    return result


def adapters_equal(paths: list[Path]) -> bool:
    """Whether every safetensors file of the checkpoints at ``paths`` holds the same tensors, to the bit."""
    names = sorted(p.name for p in paths[0].glob("*.safetensors"))
    for name in names:
        first, *others = (load_file(p / name) for p in paths)
        if not all(
            first.keys() == o.keys() and all(torch.equal(first[k], o[k]) for k in first) for o in others
        ):
            return False
    return bool(names)


# -- the bench ------------------------------------------------------------------------------------------------


def run(workdir: Path, args: argparse.Namespace) -> int:
    if not args.dry and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here; --dry runs it on the CPU (its figures mean nothing)")
        return 2
    model_dir, data = build_assets(workdir, args.dry, args.length)
    spec_path = workdir / "trial.yaml"
    spec_path.write_text(
        yaml.safe_dump(spec_for(model_dir, data, args, "bench-gpu", args.accumulate * args.batch))
    )
    device = "cpu (dry run)" if args.dry else torch.cuda.get_device_name(0)
    print(
        f"device: {device}; batch {args.batch} x {args.length} tokens, a global step every {args.accumulate} "
        f"local step(s); {args.steps} timed steps",
        flush=True,
    )

    figures: dict[str, list[dict[str, float]]] = {"plain": [], "swarm": []}
    order = ["plain", "swarm"]
    for r in range(args.runs):
        for side in order if r % 2 == 0 else order[::-1]:
            found = run_trial(side, spec_path, args)
            figures[side].append(found)
            print(
                f"run {r + 1} {side:>5}: {found['tokens_per_s']:10.0f} tokens/s  {found['step_ms']:8.1f} ms/step"
                f"  peak {found['peak_memory_gib']:6.2f} GiB",
                flush=True,
            )
    tokens = [
        s["tokens_per_s"] / p["tokens_per_s"] for s, p in zip(figures["swarm"], figures["plain"], strict=True)
    ]
    memory = [
        s["peak_memory_gib"] / p["peak_memory_gib"] if p["peak_memory_gib"] else float("nan")
        for s, p in zip(figures["swarm"], figures["plain"], strict=True)
    ]
    for side, found in figures.items():
        print(f"{side}: " + median_min_max("tokens_per_s", [f["tokens_per_s"] for f in found], 0), flush=True)

    found: dict[str, Any] = {"equal": "skipped"}
    if args.pair_steps > 0:
        pair_spec = workdir / "pair.yaml"
        spec = spec_for(model_dir, data, args, "bench-gpu-pair", 2 * args.batch)
        pair_spec.write_text(yaml.safe_dump({**spec, "max_global_steps": args.pair_steps}))
        found = pair(pair_spec, workdir / "pair", args)
        print(
            "pair: "
            + " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in found.items())
        )
    print(
        f"{median_min_max('tokens_ratio', tokens)} {median_min_max('memory_ratio', memory)} "
        f"pair_equal={found['equal']} plain_tokens_per_s={statistics.median(f['tokens_per_s'] for f in figures['plain']):.0f} "
        f"device={device.replace(' ', '_')}",
        flush=True,
    )
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = runs_parser(__doc__, runs=3)
    p.add_argument("--dry", action="store_true", help="on the CPU with a tiny model: checks the bench runs")
    p.add_argument("--batch", type=int, default=None, help="rows per step (default 8; dry 2)")
    p.add_argument("--length", type=int, default=None, help="tokens per row (default 512; dry 32)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per trial (default 30; dry 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; dry 1)")
    p.add_argument(
        "--accumulate", type=int, default=1, help="local steps per global step in the trials (target / batch)"
    )
    p.add_argument(
        "--pair-steps",
        type=int,
        default=None,
        help="global steps of the pair (default 20; dry 2; 0: no pair)",
    )
    p.add_argument(
        "--trial-timeout", type=float, default=600.0, help="seconds one trial or the pair may take"
    )
    p.add_argument(
        "--variant",
        choices=["no_offload", "delay_opt"],
        help="the swarm side with one hivemind option changed",
    )
    p.add_argument("--trial", choices=["plain", "swarm"], help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    defaults = {
        "batch": (8, 2),
        "length": (512, 32),
        "steps": (30, 2),
        "warmup": (5, 1),
        "pair_steps": (20, 2),
    }
    for name, (full, dry) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, dry if args.dry else full)
    return args


if __name__ == "__main__":
    arguments = parse_args(None)
    if arguments.trial is not None:
        print(
            json.dumps(
                trial(arguments.trial, arguments.spec, arguments.steps, arguments.warmup, arguments.variant)
            ),
            flush=True,
        )
        sys.exit(0)
    sys.exit(run_in_workdir(run, arguments, "gpu"))
