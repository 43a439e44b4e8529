"""Does a 2-peer swarm train as well as one process that does the same work?

What is measured
    Two ``run-peer`` processes (``potluck.tools.peer_processes.LocalSwarm`` on loopback, ``--min-peers 2``
    so they start together, one thread each) fine-tune the bundled tiny model on the bundled
    arithmetic task for ``--steps`` global steps (target_batch_size 128, per_peer_batch_size 64,
    lr 3e-3 with 10 warm-up steps, matchmaking_time 0.5 s: the demo's first settings). Then a single
    process with a plain torch loop (AdamW and LR schedule as the swarm's, no hivemind) trains the same model
    from the same initial weights. Both final models are evaluated on the held-out problems with
    ``potluck.peer.training.exact_match.evaluate`` (per-token loss on the completions, exact-match accuracy).

What "same global batch" and "same samples" mean here
    A swarm can overshoot ``target_batch_size``: a peer starts the global step once the samples it
    knows of reach the target, and it learns of the other peers' samples through the DHT, at most every
    0.5 s. hivemind alone lets each peer reach the target on its own samples when local steps are
    fast (an effective global batch of about peers x target: 251 for 2 peers and target 128, measured
    before Potluck's tracker); ``hivemind_ext/tracker.py`` extrapolates the others' samples between fetches,
    which leaves a smaller overshoot (the first steps, before the peers know each other's rates, and
    timing noise). After N global steps the peers have trained on S >= N x 128 samples, and the
    swarm's effective global batch is S / N.

    ``samples`` (S) is the sum of the ``M samples`` that each peer prints on its last line
    (``run-peer: ... global step N, K local steps, M samples ...``): every local batch a peer trained
    on, i.e. the compute the swarm spent, including any batch it later had to drop.

    The headline baseline (``single``) trains with the spec's global batch, 128, on the same S samples,
    so it takes about S / 128 optimizer steps: more than the swarm's N. This compares equal work at
    the batch size the run asked for, and charges the overshoot to the swarm (samples past the target
    make a step's batch larger instead of adding steps). ``loss_ratio = swarm_loss / single_loss``.

    A second baseline (``step-matched``) takes exactly N steps with batch round(S / N): the same
    updates on the same samples as the swarm. Its ratio isolates the averaging itself (should be
    about 1 if averaging is correct); the gap between the two ratios is the price of the overshoot.

    Data order differs between runs (each peer shuffles with a seed derived from its random peer id),
    so the baselines are run with ``--seeds`` data orders and the swarm ``--swarm-runs`` times;
    ``single_loss`` and ``swarm_loss`` (peer 1's) are means over them, with their ranges. At this point
    of training one data order differs from another by up to 25 % (the model is learning to add), so a
    single swarm run against one or two orders says little: use 3 of each for a figure.

How to read it
    The last line holds ``loss_ratio`` (target <= 1.05: the swarm ends within 5 % of the single
    process's held-out loss), ``swarm_loss`` (peer 1's final checkpoint), ``single_loss``, ``samples``
    (S), ``global_steps`` (N), ``effective_batch`` (S / N) and ``step_matched_loss_ratio``.
    ``weights_max_diff`` is the largest difference between the two peers' final weights: about 0 when
    every averaging round succeeded, larger when rounds failed and peers drifted. ``failed_rounds``
    counts the averaging rounds that failed (from each peer's ``--results`` summary); ``alone_steps`` the global steps a peer took on its
    own gradients because it knew of no other peer (state averaging then keeps the weights equal, so
    a swarm whose peers miss each other shows equal weights and the loss of a smaller batch).

Run: ``.venv/bin/python bench/convergence.py`` (a few minutes on 2 CPU cores; ``--help`` for options).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from workdir import run_in_workdir

from potluck.peer.averaging.gradient import lr_lambda
from potluck.peer.training.checkpoint import latest_checkpoint
from potluck.peer.training.data import PeerDataStream
from potluck.peer.training.exact_match import EvalResult, evaluate, evaluate_spec
from potluck.peer.training.model import build_model, load_tokenizer, trainable_parameters
from potluck.peer.training.stages import make_stage
from potluck.protocols.runspec import RunSpec, load_run_spec
from potluck.tools.peer_processes import LocalSwarm, PeerProcess
from potluck.tools.tiny.assets import build_assets

PEERS = 2
# NOTE: the demo's settings when the first figures were recorded (tools/demo.py has since moved to
# batches of 128/256), spelled out so that the recorded figures stay comparable.
SPEC = {
    "run_id": "bench-convergence",
    "model": {"name_or_path": "./tiny-model"},
    "data": {"path": "./data/train.jsonl", "eval_path": "./data/eval.jsonl", "max_length": 16},
    "optimizer": {"lr": 0.003, "warmup_steps": 10},
    "batch": {"target_batch_size": 128, "per_peer_batch_size": 64},
    "averaging": {"matchmaking_time": 0.5, "averaging_timeout": 15},
    "seed": 0,
}


@dataclass(frozen=True)
class PeerSummary:
    name: str
    global_step: int
    local_steps: int
    samples: int
    failed_rounds: int
    """Averaging rounds that failed (the peer then stepped on its own gradients)."""
    alone_steps: int
    """Global steps the peer took on its own gradients because it knew of no other peer."""
    bytes_sent: int
    compute_utilisation: float
    """Share of its time spent computing (NaN if it never stepped)."""


@dataclass(frozen=True)
class Baseline:
    label: str
    steps: int
    batch: int
    results: list[EvalResult]

    @property
    def samples(self) -> int:
        return self.steps * self.batch

    @property
    def loss(self) -> float:
        return statistics.mean(r.loss for r in self.results)

    @property
    def accuracy(self) -> float:
        return statistics.mean(r.accuracy for r in self.results)


def write_spec(workdir: Path, global_steps: int) -> Path:
    spec = dict(
        SPEC,
        max_global_steps=global_steps,
        # one checkpoint, at the end: the one evaluated
        checkpoint={"save_every": global_steps, "keep": 1},
    )
    path = workdir / "run.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def summarize_peer(peer: PeerProcess) -> PeerSummary:
    """From the summary line of the peer's ``--results`` file."""
    summary = peer.summary()
    if summary is None:
        raise RuntimeError(f"peer {peer.name} wrote no summary:\n{peer.log()[-3000:]}")
    utilisation = summary.compute_utilisation
    return PeerSummary(
        peer.name, summary.global_step, summary.local_steps, summary.samples, summary.rounds.failed,
        summary.rounds.alone, summary.bytes_sent, float("nan") if utilisation is None else utilisation,
    )  # fmt: skip


def run_swarm(spec_path: Path, workdir: Path, timeout: float) -> list[PeerSummary]:
    """Train with PEERS run-peer processes until they reach the spec's last global step."""
    with LocalSwarm(spec_path, workdir / "logs") as swarm:
        for i in range(1, PEERS + 1):
            args = ["--save-dir", str(workdir / f"peer{i}"), "--min-peers", str(PEERS)]
            swarm.wait_for_address(swarm.start_peer(f"peer{i}", args))
        deadline = time.monotonic() + timeout
        last_report = time.monotonic()
        while any(p.running for p in swarm.peers) and time.monotonic() < deadline:
            time.sleep(1.0)
            if time.monotonic() - last_report > 15:  # show signs of life without relaying every line
                last_report = time.monotonic()
                steps = [line for line in swarm.peers[0].log().splitlines() if line.startswith("step ")]
                print(f"   [peer1] {steps[-1] if steps else 'starting'}", file=sys.stderr, flush=True)
        codes = swarm.wait_all(timeout=max(1.0, deadline - time.monotonic()))
        if any(codes):
            logs = "\n".join(
                f"--- {p.name} (exit {p.process.returncode}):\n{p.log()[-2000:]}" for p in swarm.peers
            )
            raise RuntimeError(f"a peer failed:\n{logs}")
        return [summarize_peer(p) for p in swarm.peers]


def train_single(spec: RunSpec, steps: int, batch_size: int, seed: int) -> EvalResult:
    """A plain torch loop: the swarm's model, optimizer and LR schedule, without hivemind."""
    tokenizer = load_tokenizer(spec.model)
    model = build_model(spec, torch.device("cpu"))  # the tiny model's saved weights: the peers' start
    params = trainable_parameters(model)
    opt = spec.optimizer
    optimizer = torch.optim.AdamW(params, lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay)
    # the swarm steps its scheduler once per global step over max_global_steps; the baseline's
    # schedule spans its own steps instead (the same for the constant schedule used here)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(opt.warmup_steps, opt.schedule, steps))
    stage = make_stage(spec.stage)
    batches = PeerDataStream(spec.data, tokenizer, batch_size).batches(seed)
    for _ in range(steps):
        loss = stage.loss(model, next(batches))
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return evaluate(model, tokenizer, spec.data.eval_path, max_length=spec.data.max_length)


def weights_max_diff(spec: RunSpec, first: Path, second: Path) -> float:
    a = build_model(spec, torch.device("cpu"), weights_from=str(first)).state_dict()
    b = build_model(spec, torch.device("cpu"), weights_from=str(second)).state_dict()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def print_table(before: EvalResult, runs: list[SwarmRun], baselines: list[Baseline]) -> None:
    header = (
        f"{'model':<34}{'steps':>7}{'batch':>8}{'samples':>9}{'held-out loss [range]':>28}{'accuracy':>10}"
    )
    print(header)
    print("-" * len(header))
    print(f"{'before training':<34}{'':>7}{'':>8}{0:>9}{before.loss:>28.4f}{before.accuracy:>10.1%}")
    for r, run in enumerate(runs, 1):
        steps = run.peers[0].global_step
        for peer, result in zip(run.peers, run.results, strict=True):
            label = f"swarm {r}, {peer.name} ({len(run.peers)} peers)"
            print(
                f"{label:<34}{steps:>7}{run.samples / steps:>8.1f}{run.samples:>9}"
                f"{result.loss:>28.4f}{result.accuracy:>10.1%}"
            )
    for b in baselines:
        losses = [r.loss for r in b.results]
        spread = f"{b.loss:.4f} [{min(losses):.4f}-{max(losses):.4f}]"
        print(f"{b.label:<34}{b.steps:>7}{b.batch:>8}{b.samples:>9}{spread:>28}{b.accuracy:>10.1%}")
    print(
        "\nswarm batch: samples / global steps (the effective global batch, >= target_batch_size);"
        "\nsingle-process rows: mean over data orders, [min-max] of the held-out loss."
    )
    for r, run in enumerate(runs, 1):
        for p in run.peers:
            print(
                f"swarm {r}, {p.name}: {p.global_step} global steps, {p.local_steps} local steps, "
                f"{p.samples} samples, {p.failed_rounds} failed averaging round(s), "
                f"{p.alone_steps} global step(s) alone"
            )
        print(
            f"swarm {r} trained for {run.seconds:.0f}s; peers' final weights differ by at most {run.drift:.2e}"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=150, help="global steps the swarm trains for")
    p.add_argument("--seeds", type=int, default=3, help="data orders for each single-process baseline")
    p.add_argument(
        "--swarm-runs", type=int, default=1, help="swarm runs (each peer shuffles by its random peer id)"
    )
    p.add_argument("--timeout", type=float, default=900.0, help="seconds the swarm may take")
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep the assets, peer logs and checkpoints here (default: a temporary folder)",
    )
    return p.parse_args(argv)


@dataclass(frozen=True)
class SwarmRun:
    peers: list[PeerSummary]
    results: list[EvalResult]
    """Each peer's final checkpoint, evaluated."""
    drift: float
    seconds: float

    @property
    def samples(self) -> int:
        return sum(p.samples for p in self.peers)


def train_swarm(spec_path: Path, spec: RunSpec, folder: Path, args: argparse.Namespace) -> SwarmRun:
    started = time.monotonic()
    peers = run_swarm(spec_path, folder, args.timeout)
    seconds = time.monotonic() - started
    checkpoints = [latest_checkpoint(folder / f"peer{i}", spec.run_id) for i in range(1, PEERS + 1)]
    if any(c is None or c.global_step != args.steps for c in checkpoints):
        raise RuntimeError(f"expected final checkpoints at step {args.steps}, found {checkpoints}")
    results = [evaluate_spec(spec, checkpoint=c.path) for c in checkpoints]
    return SwarmRun(peers, results, weights_max_diff(spec, checkpoints[0].path, checkpoints[1].path), seconds)


def run(workdir: Path, args: argparse.Namespace) -> int:
    build_assets(workdir)
    spec_path = write_spec(workdir, args.steps)
    spec = load_run_spec(spec_path)
    before = evaluate_spec(spec, checkpoint=None)

    runs = []
    for r in range(args.swarm_runs):
        folder = workdir / f"swarm{r}"
        shutil.rmtree(folder, ignore_errors=True)  # peers would resume from old checkpoints
        print(f"== swarm {r + 1}/{args.swarm_runs}: {PEERS} peers, {args.steps} global steps "
              f"(logs: {folder / 'logs'})", file=sys.stderr)  # fmt: skip
        runs.append(train_swarm(spec_path, spec, folder, args))

    samples = round(statistics.mean(r.samples for r in runs))
    target = spec.batch.target_batch_size
    torch.set_num_threads(2)  # the baselines are not timed: use the machine
    print(f"== single process: {samples} samples, {args.seeds} data order(s) each", file=sys.stderr)
    seeds = range(args.seeds)
    single_steps = round(samples / target)
    single = Baseline(
        f"single, batch {target}",
        single_steps,
        target,
        [train_single(spec, single_steps, target, s) for s in seeds],
    )
    matched_batch = round(samples / args.steps)
    matched = Baseline(
        "single, step-matched",
        args.steps,
        matched_batch,
        [train_single(spec, args.steps, matched_batch, s) for s in seeds],
    )

    print()
    print_table(before, runs, [single, matched])
    swarm_losses = [r.results[0].loss for r in runs]
    swarm_loss = statistics.mean(swarm_losses)
    pairs = {
        "loss_ratio": f"{swarm_loss / single.loss:.3f}",
        "swarm_loss": f"{swarm_loss:.4f}",
        "swarm_loss_range": f"{min(swarm_losses):.4f}-{max(swarm_losses):.4f}",
        "single_loss": f"{single.loss:.4f}",
        "single_loss_range": f"{min(x.loss for x in single.results):.4f}-{max(x.loss for x in single.results):.4f}",
        "swarm_runs": str(len(runs)),
        "samples": str(samples),
        "global_steps": str(args.steps),
        "effective_batch": f"{samples / args.steps:.1f}",
        "single_steps": str(single_steps),
        "step_matched_loss_ratio": f"{swarm_loss / matched.loss:.3f}",
        "swarm_accuracy": f"{statistics.mean(r.results[0].accuracy for r in runs):.3f}",
        "single_accuracy": f"{single.accuracy:.3f}",
        "weights_max_diff": f"{max(r.drift for r in runs):.2e}",
        "failed_rounds": str(sum(p.failed_rounds for r in runs for p in r.peers)),
        "alone_steps": str(sum(p.alone_steps for r in runs for p in r.peers)),
    }
    print(" ".join(f"{k}={v}" for k, v in pairs.items()), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_in_workdir(run, parse_args(argv), "convergence")


if __name__ == "__main__":
    sys.exit(main())
