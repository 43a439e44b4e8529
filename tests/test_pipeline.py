"""``potluck pipeline``: stages chained by ``init_from``, each a 2-peer swarm, with a per-stage summary table; and
every stage's data is checked before the first stage starts."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
import yaml

from potluck.peer.training.checkpoint import latest_checkpoint
from potluck.peer.training.data import DatasetFormatError
from potluck.protocols.coordinator_client import CoordinatorClient
from potluck.protocols.runspec import RunSpecError
from potluck.tools.cli import main as potluck_main
from potluck.tools.pipeline import load_pipeline


def stage(tiny_assets, run_id: str, stage_name: str, data: str, steps: int, **extra) -> dict:
    folder = tiny_assets["train"].parent
    files = {"sft": (tiny_assets["train"], tiny_assets["eval"]),
             "preferences": (folder / "preferences_train.jsonl", folder / "preferences_eval.jsonl"),
             "prompts": (folder / "prompts_train.jsonl", folder / "prompts_eval.jsonl")}[data]  # fmt: skip
    return {
        "run_id": run_id,
        "stage": stage_name,
        "model": {"name_or_path": str(tiny_assets["model"])},
        "data": {"path": str(files[0]), "eval_path": str(files[1]), "max_length": 16},
        "optimizer": {"lr": 0.003},
        "batch": {"target_batch_size": 32, "per_peer_batch_size": 16},
        "max_global_steps": steps,
        "averaging": {"matchmaking_time": 0.5, "averaging_timeout": 15},
        "checkpoint": {"save_every": 1000, "keep": 1},
        **extra,
    }


def write_pipeline(tmp_path, stages: list[dict]):
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"peers": 2, "workdir": "./out", "stages": stages}))
    return path


def test_a_stage_with_the_wrong_columns_fails_before_any_stage_runs(tiny_assets, tmp_path, capsys):
    stages = [
        stage(tiny_assets, "sft", "sft", "sft", 2),
        stage(tiny_assets, "dpo", "dpo", "sft", 2, init_from="sft"),  # SFT data for a DPO stage
    ]
    path = write_pipeline(tmp_path, stages)
    with pytest.raises(
        DatasetFormatError, match=r"missing column\(s\) \['chosen', 'rejected'\].*stage 'dpo'"
    ):
        load_pipeline(path).check()
    assert potluck_main(["pipeline", str(path)]) == 2
    assert "prompt, chosen, rejected" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing was started


def test_init_from_must_name_an_earlier_stage(tiny_assets, tmp_path):
    path = write_pipeline(tmp_path, [stage(tiny_assets, "rm", "rm", "preferences", 2, init_from="later")])
    with pytest.raises(RunSpecError, match="init_from: 'later' is neither an earlier stage"):
        load_pipeline(path).check()


@pytest.mark.slow
@pytest.mark.timeout(600)  # three 2-peer swarms one after another; 2-core CI machines are often shared
def test_sft_rm_ppo_pipeline_through_the_coordinator_chains_checkpoints_and_prints_the_table(
    tiny_assets, tmp_path, local_swarm, coordinator
):
    """One pipeline run covers both ways of running one: through a coordinator, which publishes each stage
    and finishes it, and chained on this machine's checkpoints either way (without ``--coordinator`` the
    peers only get ``--run-spec`` files instead, as every other swarm test starts them)."""
    coord = coordinator()
    stages = [
        stage(tiny_assets, "p-sft", "sft", "sft", 3),
        stage(tiny_assets, "p-rm", "rm", "preferences", 2, init_from="p-sft"),
        stage(tiny_assets, "p-ppo", "ppo", "prompts", 2, init_from="p-sft",
              rl={"reward": "p-rm", "max_new_tokens": 4}),
    ]  # fmt: skip
    pipeline = load_pipeline(write_pipeline(tmp_path, stages), coordinator=coord.address)
    swarms = []
    pipeline.swarm_factory = lambda spec_path, workdir: swarms.append(local_swarm(spec_path)) or swarms[-1]
    out = io.StringIO()
    outcomes = pipeline.run(out)

    table = out.getvalue()
    assert [o.spec.run_id for o in outcomes] == ["p-sft", "p-rm", "p-ppo"]
    for name, run_id, steps in (("sft", "p-sft", 3), ("rm", "p-rm", 2), ("ppo", "p-ppo", 2)):
        assert re.search(rf"^{name} +{run_id} +{steps} +\d+s  ", table, re.MULTILINE), table
    for figure in ("exact_match", "pairwise_accuracy", "mean_reward", "kl"):
        assert re.search(rf"  {figure} +-?\d+\.\d+ +-?\d+\.\d+$", table, re.MULTILINE), table
    for i in (1, 2):
        for o in outcomes:
            checkpoint = latest_checkpoint(tmp_path / "out" / o.spec.run_id / f"peer{i}", o.spec.run_id)
            assert checkpoint is not None and checkpoint.global_step == o.spec.max_global_steps
    # the run ids the PPO stage named were its peers' SFT starting point and RM reward: peer 1's final checkpoints
    assert outcomes[2].spec.init_from == str(outcomes[0].weights)
    assert outcomes[2].spec.rl.reward == str(outcomes[1].weights)
    assert outcomes[2].after["kl"] >= 0.0 and f"final weights: {outcomes[2].weights}" in table

    # through the coordinator: every stage was published there, its peers got it from there (no spec
    # file), and the pipeline marked it finished
    for peer in (p for swarm in swarms for p in swarm.peers):
        assert "through the coordinator at" in peer.log() and "--run-spec" not in peer.process.args
    with CoordinatorClient(coord.address) as client:
        runs = {r.run_id: r for r in client.list_runs()}
    assert {run_id: runs[run_id].status for run_id in ("p-sft", "p-rm", "p-ppo")} == dict.fromkeys(
        ("p-sft", "p-rm", "p-ppo"), "finished"
    )
    assert f"published at the coordinator {coord.address}" in table


def test_the_example_pipeline_parses():
    pipeline = load_pipeline(Path(__file__).parent.parent / "examples" / "pipeline" / "rlhf.yaml")
    assert [s.stage for s in pipeline.specs] == ["sft", "rm", "ppo"]
    assert pipeline.specs[2].init_from == "tiny-sft" and pipeline.specs[2].rl.reward == "tiny-rm"
