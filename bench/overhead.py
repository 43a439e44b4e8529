"""Per-step overhead of training through the swarm machinery instead of a plain torch loop.

What is measured
    Wall-clock time of one local training step (forward, backward, optimizer) in two loops that run
    side by side in this process on the same model weights, the same batches and the same batch size:

    - **swarm**: a 1-peer swarm. A real hivemind DHT (``potluck.hivemind_ext.dht.start_dht`` on loopback) and
      ``potluck.peer.averaging.gradient.GradientAveraging`` drive the step exactly as ``peer/training/loop.py`` does:
      ``loss.backward(); strategy.step(batch_size); strategy.zero_grad()``.
    - **plain**: ``loss.backward(); opt.step(); sched.step(); opt.zero_grad()`` with ``torch.optim.AdamW``
      and the LR schedule that ``GradientAveraging`` builds from the same spec (stepping once per
      ``target_batch_size`` samples, like the swarm, when that spans several batches).

    ``target_batch_size == per_peer_batch_size`` (except in the ``accum4`` case), so every local step
    is a global step: the optimizer's whole per-epoch path (progress report, averaging bookkeeping,
    offloaded optimizer step) runs on every step, which is the worst case for overhead. A swarm of
    one never averages with anybody, so network time is *not* part of these figures; they are the
    fixed cost of the machinery.

How it is measured
    Both loops use ``torch.set_num_threads(1)``. After a warm-up of each, timed blocks alternate between
    the two (the order flips every round, ABBA, so slow drift of the machine hits both alike). The
    figure per loop is the median over rounds of the block's mean step time; ``ratio`` is swarm
    median / plain median.

    hivemind keeps working after ``step()`` returns: left to itself, in a swarm of one, every step
    pre-schedules a matchmaking round in the gradient averager's process and then cancels it (nobody
    else is there; GradientAveraging skips that, the ``presched`` variant restores it), and in some
    runs the cancelled rounds keep the DHT and the averager busy for about 0.5 s per step afterwards,
    so a swarm block can leave its child processes busy for many seconds (column ``tail s``; 0.5
    means no tail, the shortest possible wait). Before every block the bench waits
    until the children are idle (at most ``--settle-limit`` seconds), so each loop pays only for
    background work that it causes itself while it runs; otherwise the plain loop would be slowed by
    the swarm's leftovers. ``bg cpu`` is the CPU time the children (DHT, averagers, libp2p daemon)
    spent per swarm step during a block: on a machine with few cores it competes with training. The
    bench also measures the CPU that processes outside it use during each block: a
    round (one block of each loop) during which they used more than 0.25 of a core is repeated (at
    most ``--blocks`` extra rounds) and left out of the figures; if too few rounds were undisturbed,
    the bench uses them all and warns that the timings are unreliable.

Cases (one table row each; ``--cases all`` runs all of them, the default set takes a few minutes)
    ``full``        full fine-tuning of the bundled tiny model (0.3 M parameters), batch 64: headline;
    ``lora``        the same model with a LoRA adapter (r=8 on q_proj/v_proj) from the spec;
    ``b256``        full fine-tuning with per-peer (= target) batch 256: 4x the compute per fixed cost;
    ``accum4``      full fine-tuning, batch 64, target_batch_size 256: a global step every 4th local
                    step, as in a run whose target is larger than one peer's batch;
    ``wide``        an 8x larger model (hidden 256, 4 layers; 2.4 M parameters), batch 64 (not default);
    ``presched``    (not default) GradientAveraging with hivemind's own pre-scheduling of a matchmaking
                    round while the peer is alone, which GradientAveraging skips (shows what it saves);
    ``no_offload``, ``delay_opt`` (not default): GradientAveraging with ``offload_optimizer=False``
                    or ``delay_optimizer_step=True`` instead of the shipped value. Variants swap the
                    hivemind optimizer class that GradientAveraging builds for a subclass that changes
                    that one thing; they are for choosing options, not the headline.
    ``reuse_grad_buffers=True`` is not measured: hivemind then forbids ``zero_grad()``, which the
    trainer calls after every step. ``delay_state_averaging`` only matters when state is averaged
    with other peers, which never happens in a swarm of one.

How to read it
    ``overhead_ratio`` on the last line is the headline: GradientAveraging as shipped, full
    fine-tuning, tiny model, batch 64. 1.00 means no overhead; the target is <= 1.10. The other rows
    show how the fixed cost amortises with more compute per step and what the hivemind options change.
    Timings on a 2-core machine are noisy: compare the range of round ratios, not the third decimal.

Run: ``.venv/bin/python bench/overhead.py`` (a few minutes on 2 CPU cores; ``--help`` for options).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import psutil
import torch
from hivemind.dht import DHT
from hivemind.optim import Optimizer

from potluck.hivemind_ext.dht import start_dht
from potluck.peer.averaging import gradient as averaging
from potluck.peer.averaging.gradient import GradientAveraging, lr_lambda
from potluck.peer.averaging.strategy import AveragingStrategy
from potluck.peer.cli import configure_logging
from potluck.peer.training.data import PeerDataStream
from potluck.peer.training.model import build_model, load_tokenizer, trainable_parameters
from potluck.peer.training.stages import make_stage
from potluck.protocols.runspec import RunSpec, parse_run_spec
from potluck.tools.tiny.assets import build_assets
from potluck.tools.tiny.model import TinyModelConfig, build_tiny_model
from potluck.tools.tiny.task import ALPHABET, ArithmeticTask

LORA = {"kind": "lora", "r": 8, "alpha": 16.0, "target_modules": ["q_proj", "v_proj"]}
FOREIGN_LOAD_LIMIT = 0.25
"""Cores of load from other processes above which a timed round is repeated (a shared machine)."""
MIN_CLEAN_ROUNDS = 3
"""Fewer undisturbed rounds than this and a case's figures use every round (and say so)."""
WIDE_MODEL = TinyModelConfig(
    hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=512
)


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    batch: int = 64
    accumulate: int = 1
    """Local steps per global step: target_batch_size = accumulate x batch (1: every step is global)."""
    adapter: dict[str, Any] | None = None
    model: str = "tiny-model"
    variant: str | None = None
    """None: GradientAveraging as shipped; otherwise a key of VARIANTS."""
    steps_scale: float = 1.0
    """Fraction of --steps per block, so that slower cases take about as long as the others."""
    default: bool = True
    """Run without --cases; the others only on request, to keep the default run within 5 minutes."""


CASES = [
    Case("full", "full FT, batch 64 (headline)"),
    Case("lora", "LoRA r=8, batch 64", adapter=LORA),
    Case("b256", "full FT, batch 256", batch=256, steps_scale=0.3),
    Case("accum4", "full FT, batch 64, target 256", accumulate=4),
    Case("wide", "full FT, 8x model, batch 64", model="wide-model", steps_scale=0.3, default=False),
    Case("presched", "variant: pre-scheduling alone", variant="presched", default=False),
    Case("no_offload", "variant: offload_optimizer=False", variant="no_offload", default=False),
    Case("delay_opt", "variant: delay_optimizer_step=True", variant="delay_opt", default=False),
]


class _NullListener:
    """GradientAveraging reports averaging rounds to metrics; the bench does not need them."""

    def averaging_round(self, *args, **kwargs) -> None:
        pass

    def state_download(self, succeeded: bool, seconds: float, discarded: int = 0, unvouched: int = 0) -> None:
        pass


class _PreschedulingWhenAlone:
    """Mixin: hivemind pre-schedules a matchmaking round whenever the next epoch is due within
    ``matchmaking_time`` -- in a swarm of one with target == per-peer batch that is every step -- and
    then cancels it because nobody else is there. GradientAveraging skips that while the tracker sees
    no other peer; this restores hivemind's behaviour, to show what skipping it saves."""

    def _maybe_schedule_gradient_averaging(self) -> None:
        Optimizer._maybe_schedule_gradient_averaging(self)


VARIANTS: dict[str, tuple[type | None, dict[str, Any]]] = {
    "presched": (_PreschedulingWhenAlone, {}),
    "no_offload": (None, {"offload_optimizer": False}),
    # NOTE: a delayed optimizer step applies each update one step late (stale parameters in forward)
    "delay_opt": (None, {"delay_optimizer_step": True}),
}


def make_strategy(case: Case, spec: RunSpec, dht: DHT, model: torch.nn.Module) -> AveragingStrategy:
    """GradientAveraging as shipped, or for a variant case the same with one thing changed.

    A variant swaps the hivemind optimizer class that GradientAveraging instantiates for a subclass
    that overrides one keyword argument (or mixes in one method), so it follows whatever else
    peer/averaging/gradient.py sets without copying it here.
    """
    params = trainable_parameters(model)
    if case.variant is None:
        return GradientAveraging(spec, dht, params, listener=_NullListener())
    mixin, overrides = VARIANTS[case.variant]
    shipped = averaging.BoundedOptimizer
    bases = (mixin, shipped) if mixin is not None else (shipped,)

    def init(self: Optimizer, **kwargs: Any) -> None:
        shipped.__init__(self, **{**kwargs, **overrides})

    variant = type(f"Variant_{case.variant}", bases, {"__init__": init})
    with mock.patch.object(averaging, "BoundedOptimizer", variant):
        return GradientAveraging(spec, dht, params, listener=_NullListener())


def make_spec(assets: Path, case: Case) -> RunSpec:
    return parse_run_spec(
        {
            "run_id": f"bench-overhead-{case.key}",
            "model": {"name_or_path": str(assets / case.model)},
            "adapter": case.adapter or {"kind": "none"},
            "data": {"path": str(assets / "data" / "train.jsonl"), "max_length": 16},
            "optimizer": {"lr": 0.003},
            "batch": {"target_batch_size": case.accumulate * case.batch, "per_peer_batch_size": case.batch},
            "averaging": {"matchmaking_time": 0.5, "averaging_timeout": 15},
        }
    )


@dataclass(frozen=True)
class Loop:
    """One training loop under test: ``run_steps`` trains one step on each batch."""

    name: str
    run_steps: Callable[[list[dict[str, torch.Tensor]]], None]


def plain_loop(spec: RunSpec, model: torch.nn.Module) -> Loop:
    stage = make_stage(spec.stage)
    opt = spec.optimizer
    optimizer = torch.optim.AdamW(
        trainable_parameters(model), lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay
    )
    # the swarm steps its scheduler once per global step; doing the same keeps the work identical
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(opt.warmup_steps, opt.schedule, spec.max_global_steps)
    )

    # the swarm steps its optimizer once per target_batch_size samples: accumulate as many batches
    accumulate = spec.batch.target_batch_size // spec.batch.per_peer_batch_size
    local_steps = 0

    def run(batches: list[dict[str, torch.Tensor]]) -> None:
        nonlocal local_steps
        for batch in batches:
            loss = stage.loss(model, batch)
            (loss / accumulate).backward()
            local_steps += 1
            if local_steps % accumulate == 0:
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)

    return Loop("plain", run)


def swarm_loop(spec: RunSpec, model: torch.nn.Module, strategy: AveragingStrategy) -> Loop:
    stage = make_stage(spec.stage)

    def run(batches: list[dict[str, torch.Tensor]]) -> None:
        for batch in batches:
            loss = stage.loss(model, batch)
            loss.backward()
            strategy.step(stage.batch_size(batch))
            strategy.zero_grad()

    return Loop("swarm", run)


def children_cpu_seconds() -> float:
    """CPU seconds used so far by this process's children (DHT, averagers, libp2p daemons)."""
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            times = child.cpu_times()
            total += times.user + times.system
    return total


def foreign_cpu_seconds() -> float:
    """CPU seconds used on the whole machine by processes other than this one and its children."""
    machine = psutil.cpu_times()
    busy = machine.user + machine.nice + machine.system + getattr(machine, "irq", 0.0)
    busy += getattr(machine, "softirq", 0.0)
    own = psutil.Process().cpu_times()
    return busy - (own.user + own.system + children_cpu_seconds())


def wait_until_quiet(limit: float, window: float = 0.25, threshold: float = 0.1) -> float:
    """Wait until this process's children use less than ``threshold`` of a core over two consecutive
    ``window``-second windows (or ``limit`` seconds passed); return the seconds waited.

    Why: hivemind keeps working in its child processes after a swarm step returns (see the module
    docstring), and on a 2-core machine that work slows whichever loop runs next. Starting every
    block with idle children charges each loop only for the background work it causes itself.
    """
    started = time.monotonic()
    quiet_windows = 0
    before = children_cpu_seconds()
    while quiet_windows < 2 and time.monotonic() - started < limit:
        time.sleep(window)
        now = children_cpu_seconds()
        quiet_windows = quiet_windows + 1 if now - before < threshold * window else 0
        before = now
    return time.monotonic() - started


@dataclass(frozen=True)
class Block:
    step_ms: float
    bg_cpu_ms: float
    """CPU milliseconds per step that the children (DHT, averagers, libp2p) used during the block."""
    foreign_load: float
    """Cores' worth of CPU that processes outside the bench used during the block."""
    settle_s: float
    """Seconds waited for idle children before the block."""


def time_block(loop: Loop, batches: list[dict[str, torch.Tensor]], settle_limit: float) -> Block:
    settle = wait_until_quiet(settle_limit)
    children_before, foreign_before = children_cpu_seconds(), foreign_cpu_seconds()
    started = time.perf_counter()
    loop.run_steps(batches)
    elapsed = time.perf_counter() - started
    children, foreign = children_cpu_seconds() - children_before, foreign_cpu_seconds() - foreign_before
    return Block(
        step_ms=1000 * elapsed / len(batches),
        bg_cpu_ms=1000 * max(0.0, children) / len(batches),
        foreign_load=max(0.0, foreign) / elapsed,
        settle_s=settle,
    )


@dataclass(frozen=True)
class Round:
    swarm: Block
    plain: Block

    @property
    def clean(self) -> bool:
        return max(self.swarm.foreign_load, self.plain.foreign_load) <= FOREIGN_LOAD_LIMIT


@dataclass(frozen=True)
class CaseResult:
    case: Case
    steps_per_block: int
    trainable_params: int
    rounds: list[Round]
    """Every timed round; the figures use the clean ones (see ``used``)."""
    global_steps_per_local_step: float

    @property
    def used(self) -> list[Round]:
        """The rounds during which the rest of the machine was quiet, if there are enough of them;
        otherwise all rounds (and ``busy`` is True)."""
        clean = [r for r in self.rounds if r.clean]
        return clean if len(clean) >= MIN_CLEAN_ROUNDS else self.rounds

    @property
    def busy(self) -> bool:
        return any(not r.clean for r in self.used)

    @property
    def swarm_ms(self) -> float:
        return statistics.median(r.swarm.step_ms for r in self.used)

    @property
    def plain_ms(self) -> float:
        return statistics.median(r.plain.step_ms for r in self.used)

    @property
    def ratio(self) -> float:
        return self.swarm_ms / self.plain_ms

    @property
    def round_ratios(self) -> list[float]:
        return [r.swarm.step_ms / r.plain.step_ms for r in self.used]

    @property
    def swarm_bg_cpu_ms(self) -> float:
        return statistics.median(r.swarm.bg_cpu_ms for r in self.used)

    @property
    def tail_s(self) -> float:
        """Mean wait for idle children after a swarm block (before the plain block that follows it)."""
        after_swarm = [r.plain.settle_s for i, r in enumerate(self.rounds) if i % 2 == 0]
        return statistics.mean(after_swarm)


def take_batches(stream: Iterator[dict[str, torch.Tensor]], count: int) -> list[dict[str, torch.Tensor]]:
    return [next(stream) for _ in range(count)]


def measure(case: Case, assets: Path, dht: DHT, args: argparse.Namespace) -> CaseResult:
    spec = make_spec(assets, case)
    steps = max(5, round(args.steps * case.steps_scale))
    tokenizer = load_tokenizer(spec.model)
    # one block's batches, reused by both loops in every block: identical work on both sides
    stream = PeerDataStream(spec.data, tokenizer, spec.batch.per_peer_batch_size).batches(seed=0)
    batches = take_batches(stream, steps)
    warmup = take_batches(stream, max(3, steps // 5))

    # build_model seeds the adapter with spec.seed, so both models start from identical weights
    swarm_model = build_model(spec, torch.device("cpu"))
    plain_model = build_model(spec, torch.device("cpu"))
    strategy = make_strategy(case, spec, dht, swarm_model)
    rounds: list[Round] = []
    try:
        swarm, plain = swarm_loop(spec, swarm_model, strategy), plain_loop(spec, plain_model)
        for loop in (swarm, plain):
            loop.run_steps(warmup)
        first_global_step = strategy.global_step
        # rounds during which other processes loaded the machine are repeated, up to a limit
        while sum(r.clean for r in rounds) < args.blocks and len(rounds) < 2 * args.blocks:
            # ABBA order: swarm first in even rounds, plain first in odd ones
            if len(rounds) % 2 == 0:
                swarm_block = time_block(swarm, batches, args.settle_limit)
                plain_block = time_block(plain, batches, args.settle_limit)
            else:
                plain_block = time_block(plain, batches, args.settle_limit)
                swarm_block = time_block(swarm, batches, args.settle_limit)
            rounds.append(Round(swarm_block, plain_block))
        global_steps = strategy.global_step - first_global_step
    finally:
        strategy.shutdown()
    return CaseResult(
        case=case,
        steps_per_block=steps,
        trainable_params=sum(p.numel() for p in trainable_parameters(swarm_model)),
        rounds=rounds,
        global_steps_per_local_step=global_steps / (len(rounds) * steps),
    )


def print_table(results: list[CaseResult]) -> None:
    header = (
        f"{'case':<36}{'params':>10}{'steps':>7}{'rounds':>8}{'plain ms':>10}{'swarm ms':>10}{'ratio':>8}"
        f"{'round ratios':>14}{'bg cpu ms':>11}{'tail s':>8}{'glob/loc':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        spread = f"{min(r.round_ratios):.2f}-{max(r.round_ratios):.2f}"
        rounds = f"{len(r.used)}/{len(r.rounds)}"
        print(
            f"{r.case.label:<36}{r.trainable_params:>10,}{r.steps_per_block:>7}{rounds:>8}{r.plain_ms:>10.1f}"
            f"{r.swarm_ms:>10.1f}{r.ratio:>8.3f}{spread:>14}{r.swarm_bg_cpu_ms:>11.1f}{r.tail_s:>8.1f}"
            f"{r.global_steps_per_local_step:>10.2f}"
        )
    print(
        "\nsteps: per timed block; rounds: rounds used / timed (a round is one swarm and one plain block; "
        f"rounds during which\nother processes used > {FOREIGN_LOAD_LIMIT} cores are repeated and left out); "
        "ms: median over the rounds used of the mean step time;\nratio: swarm ms / plain ms; "
        "round ratios: range of swarm/plain over the rounds used;\nbg cpu: CPU ms per swarm step spent "
        "in child processes (DHT, averagers, libp2p); tail s: seconds they stayed busy after a\nswarm "
        "block ended; glob/loc: global steps per local step (1.00 = every local step was a global step)."
    )
    busy = [r.case.key for r in results if r.busy]
    if busy:
        print(
            f"\nWARNING: other processes loaded the machine (> {FOREIGN_LOAD_LIMIT} cores) during most rounds "
            f"of {busy}:\nthose timings are unreliable; rerun on an otherwise idle machine."
        )


def summary_line(results: list[CaseResult], failures: list[str]) -> str:
    pairs: dict[str, str] = {}
    for r in results:
        prefix = "" if r.case.key == "full" else f"{r.case.key}_"
        pairs[f"{prefix}overhead_ratio"] = f"{r.ratio:.3f}"
        pairs[f"{prefix}swarm_step_ms"] = f"{r.swarm_ms:.2f}"
        pairs[f"{prefix}plain_step_ms"] = f"{r.plain_ms:.2f}"
    pairs["busy_cases"] = ",".join(r.case.key for r in results if r.busy) or "none"
    pairs["failed_cases"] = ",".join(failures) or "none"
    return " ".join(f"{k}={v}" for k, v in pairs.items())


def build_bench_assets(out: Path, cases: list[Case]) -> None:
    build_assets(out)
    if any(c.model == "wide-model" for c in cases):
        task = ArithmeticTask()
        build_tiny_model(out / "wide-model", task.corpus(), ALPHABET, WIDE_MODEL)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    keys = [c.key for c in CASES]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--blocks",
        type=int,
        default=5,
        help="timed blocks per loop and case (rounds disturbed by other processes are repeated)",
    )
    p.add_argument("--steps", type=int, default=30, help="steps per block (scaled down for slow cases)")
    p.add_argument(
        "--settle-limit",
        type=float,
        default=60.0,
        help="at most this many seconds of waiting for background work to end before each block",
    )
    p.add_argument(
        "--case-timeout", type=float, default=300.0, help="give up on a case after this many seconds"
    )
    p.add_argument(
        "--cases",
        default=",".join(c.key for c in CASES if c.default),
        help=f"comma-separated subset of {keys}, or 'all' (default: %(default)s)",
    )
    args = p.parse_args(argv)
    if args.cases == "all":
        args.cases = ",".join(keys)
    unknown = set(args.cases.split(",")) - set(keys)
    if unknown:
        p.error(f"unknown cases {sorted(unknown)}; choose from {keys}")
    return args


class CaseTimeout(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise CaseTimeout in the main thread after ``seconds``: a hung case must not hang the bench."""

    def expire(signum: int, frame: object) -> None:
        raise CaseTimeout(f"no result within {seconds:.0f}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(max(1, round(seconds)))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cases = [c for c in CASES if c.key in args.cases.split(",")]
    # as run-peer does: keeps hivemind at WARNING in this process and the averagers it forks
    configure_logging(verbose=False)
    torch.set_num_threads(1)
    started = time.monotonic()
    results, failures = [], []
    with tempfile.TemporaryDirectory(prefix="potluck-bench-overhead-") as tmp:
        assets = Path(tmp)
        build_bench_assets(assets, cases)
        for case in cases:
            print(f"== {case.label}", file=sys.stderr, flush=True)
            # a fresh DHT per case: after an optimizer on it has shut down, the next optimizer's
            # averagers sometimes never become ready on the same DHT (see docs/benchmarks.md)
            dht = start_dht([], ["/ip4/127.0.0.1/tcp/0"], [], None)
            try:
                with deadline(args.case_timeout):
                    results.append(measure(case, assets, dht, args))
            except CaseTimeout as e:
                print(f"== {case.label}: {e}; skipped", file=sys.stderr, flush=True)
                failures.append(case.key)
            finally:
                dht.shutdown()
    print()
    print_table(results)
    if failures:
        print(f"\nFAILED (timed out): {failures}")
    print(f"\n{len(cases)} case(s) in {time.monotonic() - started:.0f}s on {psutil.cpu_count()} CPU core(s)")
    print(summary_line(results, failures), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
