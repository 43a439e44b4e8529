"""Malicious peers, with the weighted mean and with robust aggregators: the honest peers' held-out loss.

What is measured
    ``--peers`` (default 4) ``run-peer`` processes on loopback train the demo's task (tiny model, full
    fine-tuning, the demo's optimizer; target 64 × peers of batches of 64, ``--steps`` global steps, one group of
    every peer). In an attacked run the last ``--malicious`` (default 1) of them are ``bench/poison_peer.py ATTACK
    1`` (every local step: ``sign_flip`` -10x, a ``random`` direction at 1000x the norm, ``inflate`` 1000x the
    claimed samples, ``label_flip`` training on flipped labels, ``stale`` gradients 10 steps old). Each run is done
    once with ``averaging.aggregator.kind: mean`` (its default ``weight_cap``; ``--uncapped`` adds hivemind's
    uncapped weighting) and once with each of ``--robust`` (default ``trimmed_mean``);
    the order rotates from attack to attack and run to run. Each slot keeps its libp2p identity from run to run
    (``--identity-path``), so it reads the same data order in every run and the runs differ by the attack, the
    rule and the rounds' timing alone. The honest peer ``a``'s last checkpoint is evaluated on the held-out set.
    Also from the clean runs: the median seconds of an averaging round under each aggregator.

How to read it
    One line per run: attack, aggregator, held-out loss, median round seconds.
    ``--runs`` repeats the whole set; then min / median / max of each ratio to the clean run with the mean. Last
    line: per robust aggregator ``worst_K_ratio`` (its worst median ratio over the attacks; issue 17: within 1.05
    of the clean run) and ``round_ratio_K`` (the median over runs of its clean run's median round seconds ÷ the
    mean's in the same run; goal at most 1.2; their min / median / max are printed above it),
    then ``worst_mean_ratio`` (the damage without a robust rule).

Run: ``.venv/bin/python bench/attacks.py`` (about 1.5 minutes per run of 4 peers on 2 CPU cores; 16 runs by
default). Issue 17's 3 of 8: ``--peers 8 --malicious 3 --trim 0.375`` (the default trim, 0.25, drops 2 of 8
values per coordinate, which leaves a third attacker in). The robust rules' spec says ``attackers`` as many as
``--malicious`` unless ``--attackers`` says otherwise: groups too small to outvote that many do not average.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import yaml
from poison_peer import ATTACKS
from workdir import checkpoints, median_min_max, run_in_workdir, runs_parser

from potluck.peer.training.exact_match import evaluate_spec
from potluck.protocols.runspec import load_run_spec
from potluck.tools.demo import DEMO_SPEC, DEMO_TASK
from potluck.tools.peer_processes import LocalSwarm
from potluck.tools.tiny.assets import build_assets

POISON_PEER = Path(__file__).resolve().parent / "poison_peer.py"
ROBUST = ("trimmed_mean", "median", "centered_clip")


def _attacks(text: str) -> list[str]:
    """Comma-separated attacks; "" for clean runs only (each aggregator's round time)."""
    attacks = [a for a in text.split(",") if a]
    if unknown := [a for a in attacks if a not in ATTACKS or a == "nan"]:
        raise argparse.ArgumentTypeError(
            f"{', '.join(unknown)}: not of {', '.join(a for a in ATTACKS if a != 'nan')}"
        )
    return attacks


def _robust_kinds(text: str) -> list[str]:
    kinds = text.split(",")
    if unknown := [k for k in kinds if k not in ROBUST]:
        raise argparse.ArgumentTypeError(f"{', '.join(unknown)}: not of {', '.join(ROBUST)}")
    return kinds


UNCAPPED = "mean_uncapped"
"""hivemind's own weighting: the mean with ``weight_cap: null`` (each part weighted by its sender's claim)."""


def write_spec(
    workdir: Path, aggregator: str, steps: int, peers: int, trim: float = 0.25, attackers: int = 1
) -> Path:
    if aggregator in (UNCAPPED, "mean"):
        rule = {"kind": "mean", **({"weight_cap": None} if aggregator == UNCAPPED else {})}
    else:
        rule = {
            "kind": aggregator,
            "attackers": attackers,
            **({"trim": trim} if aggregator == "trimmed_mean" else {}),
        }
    spec = {
        **DEMO_SPEC,
        "run_id": f"bench-attacks-{aggregator.replace('_', '-')}",
        "model": {"name_or_path": str(workdir / "tiny-model")},
        "data": {**DEMO_SPEC["data"], "path": str(workdir / "data" / "train.jsonl"),
                 "eval_path": str(workdir / "data" / "eval.jsonl")},
        "batch": {"target_batch_size": 64 * peers, "per_peer_batch_size": 64},
        "max_global_steps": steps,
        "averaging": {**DEMO_SPEC["averaging"], "target_group_size": peers, "aggregator": rule},
        "checkpoint": {"save_every": steps, "keep": 1},
    }  # fmt: skip
    path = workdir / f"{aggregator}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def one_run(
    spec_path: Path, folder: Path, attack: str | None, timeout: float, peers: int = 4, malicious: int = 1
) -> dict[str, float]:
    identities = spec_path.parent / "identities"  # one per slot, kept from run to run
    identities.mkdir(exist_ok=True)
    with LocalSwarm(spec_path, folder / "logs") as swarm:
        for i in range(peers):
            name = "a" if i == 0 else f"p{i}"
            args = ["--save-dir", str(folder / name), "--min-peers", str(peers),
                    "--identity-path", str(identities / f"slot{i}.key")]  # fmt: skip
            bad = attack is not None and i >= peers - malicious
            entry = (str(POISON_PEER), attack, "1") if bad else ("-m", "potluck.peer.launch")
            peer = swarm.start_peer(
                f"attacker{i}" if bad else name, args, initial_peers=[] if i == 0 else None, entry=entry
            )
            swarm.wait_for_address(peer)
        honest = swarm.peers[0]
        code = honest.process.wait(timeout=timeout)
        if code != 0:
            raise RuntimeError(f"peer a exited {code}:\n{honest.log()[-3000:]}")
        rounds = [e["seconds"] for e in honest.events("averaging_round") if e["outcome"] == "succeeded"]
    found = checkpoints(folder / "a")
    loss = evaluate_spec(load_run_spec(spec_path), checkpoint=found[max(found)]).loss
    return {"loss": loss, "round_s": statistics.median(rounds) if rounds else float("nan")}


def run(workdir: Path, args: argparse.Namespace) -> int:
    build_assets(workdir, task=DEMO_TASK)
    kinds = ["mean", *([UNCAPPED] if args.uncapped else []), *args.robust]
    specs = {
        kind: write_spec(workdir, kind, args.steps, args.peers, args.trim, args.attackers) for kind in kinds
    }
    attacks = ["clean", *args.attacks]
    results: dict[tuple[str, str], list[dict[str, float]]] = {(a, k): [] for a in attacks for k in specs}
    for r in range(args.runs):
        for i, attack in enumerate(attacks):
            shift = (i + r) % len(kinds)
            for kind in (
                kinds[shift:] + kinds[:shift]
            ):  # the order rotates from attack to attack and run to run
                folder = workdir / f"run{r + 1}" / f"{attack}-{kind}"
                bad = None if attack == "clean" else attack
                found = one_run(specs[kind], folder, bad, args.timeout, args.peers, args.malicious)
                results[attack, kind].append(found)
                print(
                    f"run {r + 1} {attack:>10} {kind:>14}: held-out loss {found['loss']:.4f}"
                    f"  round {found['round_s']:.2f} s",
                    flush=True,
                )
    clean = statistics.median(f["loss"] for f in results["clean", "mean"])
    ratios = {key: [f["loss"] / clean for f in found] for key, found in results.items()}
    print("\nheld-out loss / the clean run's with the mean (median over runs, min, max):")
    for key, values in ratios.items():
        print(f"{key[0]:>10} {key[1]:>14}: {median_min_max('ratio', values)}")
    # each clean run's median round seconds / the mean's in the same run
    round_ratios = {
        k: [
            f["round_s"] / m["round_s"]
            for f, m in zip(results["clean", k], results["clean", "mean"], strict=True)
        ]
        for k in kinds[1:]
    }
    print("\nclean runs' median round seconds / the mean's in the same run (median over runs, min, max):")
    for k, per_run in round_ratios.items():
        print(f"{k:>14}: {median_min_max('round_ratio', per_run, digits=2)}")
    worst = {k: max(statistics.median(ratios[a, k]) for a in attacks) for k in args.robust}
    mean = [statistics.median(ratios[a, "mean"]) for a in args.attacks]
    print(
        " ".join(f"worst_{k}_ratio={v:.3f}" for k, v in worst.items())
        + "".join(f" round_ratio_{k}={statistics.median(v):.2f}" for k, v in round_ratios.items())
        + f" worst_mean_ratio={max(mean, default=float('nan')):.3f} peers={args.peers} malicious={args.malicious}"
        f" trim={args.trim} attackers={args.attackers}"
        f" steps={args.steps} runs={args.runs} attacks={','.join(args.attacks)}"
    )
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = runs_parser(__doc__, runs=2)
    p.add_argument("--steps", type=int, default=40, help="global steps per run")
    p.add_argument(
        "--robust",
        type=_robust_kinds,
        default=["trimmed_mean"],
        help=f"comma-separated robust aggregators, each against the mean, of {', '.join(ROBUST)}",
    )
    p.add_argument(
        "--trim",
        type=float,
        default=0.25,
        help="trimmed_mean's fraction dropped off each side per coordinate (it drops floor(trim x peers) values,"
        " so it bounds at most that many attackers: 0.375 for 3 of 8)",
    )
    p.add_argument("--peers", type=int, default=4, help="peers per run (default 4)")
    p.add_argument("--malicious", type=int, default=1, help="of them attackers (default 1; issue 17: 3 of 8)")
    p.add_argument(
        "--attackers",
        type=int,
        default=None,
        help="the robust rules' averaging.aggregator.attackers, the attackers one group must outvote (default: as"
        " many as --malicious; 1 is the spec's default, under which groups of 3 average)",
    )
    p.add_argument(
        "--attacks",
        type=_attacks,
        default=["sign_flip", "random", "inflate"],
        help=f"comma-separated, of {', '.join(a for a in ATTACKS if a != 'nan')}",
    )
    p.add_argument(
        "--uncapped",
        action="store_true",
        help=f"also run {UNCAPPED}: the mean as hivemind weights it (weight_cap null), a baseline of round time",
    )
    p.add_argument("--timeout", type=float, default=900.0, help="seconds one run may take")
    args = p.parse_args(argv)
    if args.attackers is None:
        args.attackers = args.malicious
    return args


if __name__ == "__main__":
    sys.exit(run_in_workdir(run, parse_args(None), "attacks"))
