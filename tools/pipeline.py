"""``potluck pipeline PIPELINE.yaml``: stages chained by ``init_from``, each run as a local swarm.

A pipeline file lists run specs (inline mappings, or paths to spec files) in order, e.g. SFT → RM → PPO::

    peers: 2                 # peers per stage (each its own run-peer process)
    workdir: ./pipeline-out  # logs, specs and every peer's --save-dir (shared by all stages)
    stages:
      - {run_id: sft, stage: sft, ...}
      - {run_id: rm, stage: rm, init_from: sft, ...}
      - {run_id: ppo, stage: ppo, init_from: sft, rl: {reward: rm}, ...}

Every spec and every stage's data is validated before the first stage starts (a dataset without the columns its
stage needs fails here, naming them). Peer ``i`` of a stage keeps its checkpoints in ``workdir/<run_id>/peer<i>``;
a later stage's ``init_from: <run_id>`` (or ``reference.path``, ``teacher.path``, ``rl.reward``) naming an earlier
stage is replaced, in the spec its peers get, by peer 1's final checkpoint of that stage, so every peer starts from
the same weights. (NOTE: separate folders because checkpoint folders are named by global step only: two runs
sharing a ``--save-dir`` overwrite each other's checkpoints of equal steps.) After each stage the pipeline evaluates the stage's starting weights and its result
on the held-out data (``peer/training/stages/evaluation.py``) and, at the end, prints one table row per stage.

With ``--coordinator HOST:PORT`` each stage is published at the coordinator first (its dashboard then shows the
stage's progress, and ``potluck run list`` its status), the stage's peers join it through the coordinator (which
hands out the spec and bootstrap addresses, as for any volunteer) and the stage is marked ``finished`` there when
its peers are done. The coordinator is never on the data path: checkpoints stay in the peers' folders. (NOTE: the
published spec names earlier stages' checkpoints by their paths on this machine, so volunteers on other machines
can join a stage only where those paths exist.)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from potluck.peer.training.checkpoint import latest_checkpoint
from potluck.peer.training.stages.data import check_stage_data
from potluck.peer.training.stages.evaluation import evaluate_stage
from potluck.peer.training.stages.models import resolve_weights
from potluck.protocols.coordinator_access import CoordinatorAccess, read_pem_certificates
from potluck.protocols.coordinator_client import CoordinatorClient
from potluck.protocols.runspec import RunSpec, RunSpecError, _Strict, load_run_spec, parse_run_spec
from potluck.tools.peer_processes import LocalSwarm


class PipelineSpec(_Strict):
    stages: list[dict[str, Any] | str] = Field(min_length=1)
    """Run specs in order: inline mappings, or paths of spec files (relative to the pipeline file)."""
    peers: int = Field(2, ge=1)
    """Peers per stage, each a ``run-peer`` process on this machine."""
    workdir: str = "./pipeline-out"
    """Where specs, logs and the peers' checkpoints go (relative to the pipeline file)."""
    stage_timeout: float = Field(3600, gt=0)
    """Seconds a stage may take before its peers are stopped and the pipeline fails."""


@dataclass
class StageOutcome:
    spec: RunSpec
    seconds: float
    global_step: int
    before: dict[str, float]
    after: dict[str, float]
    weights: Path


@dataclass
class Pipeline:
    specs: list[RunSpec]
    workdir: Path
    peers: int = 2
    stage_timeout: float = 3600
    swarm_factory: Callable[[Path, Path], LocalSwarm] = LocalSwarm
    """Makes the swarm of a stage from (spec file, log folder); tests pass one that tracks the processes."""
    coordinator: str | None = None
    """``HOST:PORT`` of a coordinator to publish each stage at and join it through; ``None``: local only."""
    coordinator_tls_ca: Path | None = None
    """The coordinator's certificate (it runs TLS): the pipeline and its peers trust it."""
    operator_token: str | None = None
    """The coordinator's operator token, to publish and finish each stage."""
    outcomes: list[StageOutcome] = field(default_factory=list)

    def coordinator_access(self) -> CoordinatorAccess:
        tls_ca = (
            read_pem_certificates(self.coordinator_tls_ca, "--tls-ca") if self.coordinator_tls_ca else None
        )
        return CoordinatorAccess(tls_ca, self.operator_token)

    def save_dir(self, run_id: str, peer: int) -> Path:
        return self.workdir / run_id / f"peer{peer}"

    def with_finished_stages(self, spec: RunSpec) -> RunSpec:
        """``spec`` with references to earlier stages' run ids replaced by their final checkpoints."""
        done = {o.spec.run_id: str(o.weights) for o in self.outcomes}

        def resolved(ref: str | None) -> str | None:
            return done.get(ref, ref) if ref is not None else None

        update = {
            "init_from": resolved(spec.init_from),
            "reference": spec.reference.model_copy(update={"path": resolved(spec.reference.path)}),
            "rl": spec.rl.model_copy(update={"reward": resolved(spec.rl.reward)}),
        }
        if spec.teacher is not None:
            update["teacher"] = spec.teacher.model_copy(update={"path": resolved(spec.teacher.path)})
        return spec.model_copy(update=update)

    def check(self) -> None:
        """Everything that can be checked before training: run ids, ``init_from`` chains, every stage's data."""
        seen: set[str] = set()
        for spec in self.specs:
            if spec.run_id in seen:
                raise RunSpecError(spec.run_id, [f"run_id: {spec.run_id!r} appears twice in the pipeline"])
            for name, ref in _references(spec):
                if ref not in seen and not Path(ref).exists() and "/" not in ref:
                    raise RunSpecError(
                        spec.run_id,
                        [f"{name}: {ref!r} is neither an earlier stage's run id nor an existing folder"],
                    )
            check_stage_data(spec)
            seen.add(spec.run_id)

    def run(self, out=sys.stdout) -> list[StageOutcome]:
        self.check()
        self.workdir.mkdir(parents=True, exist_ok=True)
        for spec in self.specs:
            print(f"== stage {spec.stage} (run {spec.run_id!r})", file=out, flush=True)
            self.outcomes.append(self.run_stage(spec, out))
        print_summary(self.outcomes, out)
        return self.outcomes

    def run_stage(self, spec: RunSpec, out) -> StageOutcome:
        spec = self.with_finished_stages(spec)
        start_weights = resolve_weights(spec.init_from or spec.model.name_or_path, None, "init_from")
        before = evaluate_stage(spec, start_weights) if spec.data.eval_path else {}
        spec_path = self.workdir / f"{spec.run_id}.yaml"
        spec_path.write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
        started = time.monotonic()
        if self.coordinator is not None:
            with CoordinatorClient(self.coordinator, access=self.coordinator_access()) as client:
                client.publish(spec.model_dump_json())
            print(f"   published at the coordinator {self.coordinator}", file=out, flush=True)
        with self.swarm_factory(spec_path, self.workdir / "logs" / spec.run_id) as swarm:
            for i in range(1, self.peers + 1):
                args = ["--save-dir", str(self.save_dir(spec.run_id, i)), "--min-peers", str(self.peers)]
                if self.coordinator is None:
                    peer = swarm.start_peer(f"peer{i}", args)
                else:  # as a volunteer would: the coordinator hands out the spec and the swarm's addresses
                    args += ["--coordinator", self.coordinator, "--run", spec.run_id]
                    if self.coordinator_tls_ca is not None:
                        args += ["--coordinator-tls-ca", str(self.coordinator_tls_ca)]
                    peer = swarm.start_peer(f"peer{i}", args, initial_peers=[], use_spec=False)
                if i == 1 and self.peers > 1:
                    swarm.wait_for_address(peer)
            codes = swarm.wait_all(self.stage_timeout)
            failed = [p for p, code in zip(swarm.peers, codes, strict=True) if code != 0]
            if failed:
                raise RuntimeError(
                    f"stage {spec.run_id!r}: {failed[0].name} exited with {failed[0].process.returncode}:\n"
                    f"{failed[0].log()[-3000:]}"
                )
            for line in swarm.peers[0].log().splitlines():
                if line.startswith("run-peer:") and (
                    "metrics of the last batch" in line or "reached" in line
                ):
                    print(f"   {line}", file=out, flush=True)
        seconds = time.monotonic() - started
        if self.coordinator is not None:
            with CoordinatorClient(self.coordinator, access=self.coordinator_access()) as client:
                client.set_status(spec.run_id, "finished")
        checkpoint = latest_checkpoint(self.save_dir(spec.run_id, 1), spec.run_id)
        after = evaluate_stage(spec, str(checkpoint.path)) if spec.data.eval_path else {}
        return StageOutcome(spec, seconds, checkpoint.global_step, before, after, checkpoint.path)


def _references(spec: RunSpec) -> list[tuple[str, str]]:
    refs = [("init_from", spec.init_from), ("reference.path", spec.reference.path)]
    if spec.stage in ("grpo", "ppo") and spec.rl.reward != "exact_answer":
        refs.append(("rl.reward", spec.rl.reward))
    if spec.teacher is not None:
        refs.append(("teacher.path", spec.teacher.path))
    return [(name, ref) for name, ref in refs if ref is not None]


def print_summary(outcomes: list[StageOutcome], out=sys.stdout) -> None:
    print(file=out)
    header = (
        f"{'stage':<8}{'run':<16}{'steps':>6}{'time':>8}  {'held-out figure':<22}{'before':>9}{'after':>9}"
    )
    print(header, file=out)
    print("-" * len(header), file=out)
    for o in outcomes:
        first = True
        for name in o.after or {"-": float("nan")}:
            lead = (
                f"{o.spec.stage:<8}{o.spec.run_id:<16}{o.global_step:>6}{o.seconds:>7.0f}s"
                if first
                else " " * 38
            )
            before, after = o.before.get(name, float("nan")), o.after.get(name, float("nan"))
            print(f"{lead}  {name:<22}{before:>9.3f}{after:>9.3f}", file=out)
            first = False
    print(f"\nfinal weights: {outcomes[-1].weights}" if outcomes else "", file=out, flush=True)


def load_pipeline(
    path: Path,
    coordinator: str | None = None,
    access: CoordinatorAccess | None = None,
    tls_ca: Path | None = None,
) -> Pipeline:
    """Parse and validate the pipeline file and every stage's run spec (relative paths against the file);
    ``coordinator``: run the stages through it (module docstring), trusting ``tls_ca`` if it runs TLS,
    with the operator token in ``access``."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise RunSpecError(str(path), [f"cannot read the file: {e.strerror}"]) from None
    try:
        pipeline = PipelineSpec.model_validate(raw)
    except ValidationError as e:
        problems = [f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
        raise RunSpecError(str(path), problems) from None
    base = path.parent
    specs = []
    for i, stage in enumerate(pipeline.stages):
        if isinstance(stage, str):
            specs.append(load_run_spec(base / stage))
        else:
            specs.append(parse_run_spec(stage, f"{path} stages[{i}]").resolve_paths(base))
    workdir = Path(pipeline.workdir)
    workdir = workdir if workdir.is_absolute() else (base / workdir).resolve()
    token = access.operator_token if access is not None else None
    return Pipeline(
        specs, workdir, pipeline.peers, pipeline.stage_timeout, coordinator=coordinator,
        coordinator_tls_ca=tls_ca.resolve() if tls_ca else None, operator_token=token,
    )  # fmt: skip
