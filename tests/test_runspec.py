"""A bad run spec fails at load with a message that names the field (and the allowed values)."""

from __future__ import annotations

import pytest
import yaml

from potluck.protocols.runspec import RunSpecError, load_run_spec, parse_run_spec

pytestmark = pytest.mark.unit

VALID = {
    "run_id": "demo",
    "model": {"name_or_path": "org/model"},
    "data": {"path": "data.jsonl"},
    "batch": {"target_batch_size": 128, "per_peer_batch_size": 16},
}


def with_changes(**changes):
    spec = {k: dict(v) if isinstance(v, dict) else v for k, v in VALID.items()}
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = spec
        for parent in parents:
            node = node.setdefault(parent, {})
        if value is _DELETE:
            del node[leaf]
        else:
            node[leaf] = value
    return spec


_DELETE = object()


def problems_of(raw) -> str:
    with pytest.raises(RunSpecError) as caught:
        parse_run_spec(raw, "spec.yaml")
    return str(caught.value)


def test_valid_spec_has_defaults():
    spec = parse_run_spec(VALID)
    assert spec.adapter.kind == "none"
    assert spec.stage == "sft"
    assert spec.averaging.compression == "none"


@pytest.mark.parametrize("field", ["run_id", "model", "data", "batch"])
def test_missing_top_level_field_is_named(field):
    message = problems_of(with_changes(**{field: _DELETE}))
    assert f"{field}: required field is missing" in message


def test_missing_nested_field_is_named():
    message = problems_of(with_changes(batch__per_peer_batch_size=_DELETE))
    assert "batch.per_peer_batch_size: required field is missing" in message


@pytest.mark.parametrize(
    ("dotted", "value", "named"),
    [
        ("batch__target_batch_size", "lots", "batch.target_batch_size"),
        ("optimizer__lr", "fast", "optimizer.lr"),
        ("max_global_steps", [1, 2], "max_global_steps"),
        ("model", "just-a-string", "model"),
        ("expert_calls__capacity_factor", 0, "expert_calls.capacity_factor"),
        ("expert_calls__request_timeout", -1, "expert_calls.request_timeout"),
    ],
)
def test_wrong_type_is_named(dotted, value, named):
    message = problems_of(with_changes(**{dotted: value}))
    assert f"{named}:" in message


def test_unknown_adapter_names_field_and_allowed_values():
    message = problems_of(with_changes(adapter={"kind": "qlora"}))
    assert "adapter.kind" in message
    assert "'qlora'" in message
    for allowed in ("none", "lora", "ia3", "prefix", "p_tuning", "prompt_tuning"):
        assert allowed in message


@pytest.mark.parametrize(
    ("adapter", "named"),
    [
        ({"kind": "ia3", "target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]},
         "adapter.feedforward_modules: must be among target_modules (['k_proj']); not there: ['down_proj']"),
        ({"kind": "ia3", "feedforward_modules": ["down_proj"]},
         "adapter.feedforward_modules: needs target_modules too"),
    ],
)  # fmt: skip
def test_ia3_feedforward_modules_outside_its_targets_are_named(adapter, named):
    assert named in problems_of(with_changes(adapter=adapter))


def test_adapter_without_kind_is_named():
    assert "adapter.kind: required field is missing" in problems_of(with_changes(adapter={"r": 4}))


def test_target_batch_smaller_than_peer_batch_is_named():
    message = problems_of(with_changes(batch__target_batch_size=8, batch__per_peer_batch_size=16))
    assert "batch.target_batch_size" in message
    assert "per_peer_batch_size (16)" in message


@pytest.mark.parametrize(
    ("dotted", "value", "named", "allowed"),
    [
        ("stage", "ppo-ish", "stage", "'sft'"),
        ("data__format", "csv", "data.format", "'prompt_completion'"),
        ("averaging__compression", "zip", "averaging.compression", "'uint8'"),
    ],
)
def test_bad_enum_value_lists_allowed_values(dotted, value, named, allowed):
    message = problems_of(with_changes(**{dotted: value}))
    assert f"{named}:" in message
    assert allowed in message


def test_unknown_field_is_rejected_by_name():
    assert "optimizer.learning_rate: unknown field" in problems_of(with_changes(optimizer__learning_rate=0.1))


def test_every_problem_is_reported_at_once():
    message = problems_of(with_changes(run_id="Bad Id!", optimizer__lr=-1, adapter={"kind": "nope"}))
    assert "run_id:" in message and "optimizer.lr:" in message and "adapter.kind" in message


def test_lora_fields_are_validated():
    assert "adapter.r:" in problems_of(with_changes(adapter={"kind": "lora", "r": 0}))


def test_load_resolves_relative_paths(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(with_changes(model={"name_or_path": "./model"}, data={"path": "./d.jsonl"}))
    )
    spec = load_run_spec(path)
    assert spec.model.name_or_path == str(tmp_path / "model")
    assert spec.data.path == str(tmp_path / "d.jsonl")


def test_hub_ids_are_left_alone(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(VALID))
    assert load_run_spec(path).model.name_or_path == "org/model"


def test_unreadable_and_invalid_files_are_errors(tmp_path):
    with pytest.raises(RunSpecError, match="cannot read"):
        load_run_spec(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("run_id: [unclosed")
    with pytest.raises(RunSpecError, match="not valid YAML"):
        load_run_spec(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(RunSpecError, match="expected a mapping"):
        load_run_spec(listed)


def test_diloco_strategy_has_diloco_defaults():
    averaging = parse_run_spec(with_changes(averaging={"strategy": "diloco"})).averaging
    assert (averaging.inner_steps, averaging.outer_lr, averaging.outer_momentum) == (50, 0.7, 0.9)
    assert averaging.nesterov and averaging.overlap_communication


def test_specs_round_trip_through_model_dump_for_both_strategies():
    for strategy in ("gradient", "diloco"):
        spec = parse_run_spec(with_changes(averaging={"strategy": strategy}))
        assert parse_run_spec(spec.model_dump(mode="json")) == spec


@pytest.mark.parametrize(
    ("averaging", "named", "says"),
    [
        ({"strategy": "local-sgd"}, "averaging.strategy", "'diloco'"),
        ({"strategy": "diloco", "inner_steps": 0}, "averaging.inner_steps", "greater than or equal to 1"),
        ({"strategy": "diloco", "outer_lr": 0}, "averaging.outer_lr", "greater than 0"),
        ({"strategy": "diloco", "outer_momentum": 1.0}, "averaging.outer_momentum", "less than 1"),
        ({"strategy": "diloco", "outer_momentum": 0}, "averaging.outer_momentum", "nesterov"),
        ({"inner_steps": 10}, "averaging.inner_steps", "only used with strategy 'diloco'"),
        ({"strategy": "gradient", "outer_lr": 0.5}, "averaging.outer_lr", "only used with strategy 'diloco'"),
    ],
)
def test_bad_diloco_settings_are_named(averaging, named, says):
    message = problems_of(with_changes(averaging=averaging))
    assert f"{named}:" in message and says in message, message


@pytest.mark.parametrize(
    ("aggregator", "named", "says"),
    [
        ({"kind": "krum"}, "averaging.aggregator.kind", "'centered_clip'"),
        ({"kind": "median", "trim": 0.1}, "averaging.aggregator.trim", "only used with kind 'trimmed_mean'"),
        ({"kind": "trimmed_mean", "trim": 0.5}, "averaging.aggregator.trim", "less than 0.5"),
        ({"clip_radius": 2.0}, "averaging.aggregator.clip_radius", "only used with kind 'centered_clip'"),
        ({"outlier_norm": 3.0}, "averaging.aggregator.outlier_norm", "(kind is 'mean')"),
        (
            {"kind": "median", "weight_cap": 2.0},
            "averaging.aggregator.weight_cap",
            "only used with kind 'mean'",
        ),
        ({"weight_cap": 1.0}, "averaging.aggregator.weight_cap", "greater than 1"),
        ({"attackers": 2}, "averaging.aggregator.attackers", "(kind is 'mean')"),
        ({"kind": "median", "attackers": 0}, "averaging.aggregator.attackers", "greater than or equal to 1"),
    ],
)
def test_bad_aggregator_settings_are_named(aggregator, named, says):
    message = problems_of(with_changes(averaging={"aggregator": aggregator}))
    assert f"{named}:" in message and says in message, message


def test_a_group_target_too_small_to_outvote_the_attackers_is_named():
    # groups of 3 drop one value at each end; 3 attackers of 8 need all 8 at trim 0.375
    aggregator = {"kind": "trimmed_mean", "trim": 0.375, "attackers": 3}
    message = problems_of(with_changes(averaging={"target_group_size": 7, "aggregator": aggregator}))
    assert "averaging.aggregator:" in message and "groups of 8 or more" in message, message
    assert parse_run_spec(with_changes(averaging={"target_group_size": 8, "aggregator": aggregator}))


@pytest.mark.parametrize(
    ("averaging", "named", "says"),
    [
        # a round abandoned while it still gathers its group never averages
        ({"matchmaking_time": 10, "averaging_timeout": 2}, "averaging.averaging_timeout", "twice matchmaking_time"),
        ({"matchmaking_time": 0.001}, "averaging.matchmaking_time", "greater than or equal to 0.1"),
        ({"matchmaking_time": 600}, "averaging.matchmaking_time", "less than or equal to 60"),
        ({"averaging_timeout": 0.5}, "averaging.averaging_timeout", "greater than or equal to 1"),
    ],
)  # fmt: skip
def test_averaging_timings_that_cannot_work_are_named(averaging, named, says):
    message = problems_of(with_changes(averaging=averaging))
    assert f"{named}:" in message and says in message, message


@pytest.mark.parametrize("matchmaking_time", [0.1, 0.5, 1.0, 6.0, 60.0])
def test_every_averager_requests_time_out_well_within_matchmaking(matchmaking_time):
    # hivemind's matchmaking can deadlock when a request may outlast it
    averaging = parse_run_spec(
        with_changes(averaging={"matchmaking_time": matchmaking_time, "averaging_timeout": 120})
    ).averaging
    assert 0 < averaging.request_timeout <= matchmaking_time / 2


def test_plain_outer_sgd_needs_no_momentum():
    spec = with_changes(averaging={"strategy": "diloco", "nesterov": False, "outer_momentum": 0})
    assert parse_run_spec(spec).averaging.outer_momentum == 0


# -- RLHF stages (issue 4) ------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "grpo", "ppo"])
def test_every_stage_is_accepted(stage):
    assert parse_run_spec(with_changes(stage=stage)).stage == stage


def test_distill_needs_a_teacher_and_only_distill_takes_one():
    assert "teacher: required for stage 'distill'" in problems_of(with_changes(stage="distill"))
    assert "teacher: only used by stage 'distill'" in problems_of(with_changes(teacher={"path": "t"}))
    spec = parse_run_spec(with_changes(stage="distill", teacher={"path": "t", "temperature": 3}))
    assert spec.teacher.temperature == 3


def test_reward_model_stage_refuses_adapters():
    message = problems_of(with_changes(stage="rm", adapter={"kind": "lora"}))
    assert "stage:" in message and "adapter.kind none" in message


@pytest.mark.parametrize(
    ("dotted", "value", "named"),
    [("rl__group_size", 1, "rl.group_size"), ("rl__kl_coef", -1, "rl.kl_coef"), ("dpo__beta", 0, "dpo.beta"),
     ("dpo__loss_type", "kto", "dpo.loss_type"), ("rl__temperature", 0, "rl.temperature"),
     ("rl__updates_per_rollout", 0, "rl.updates_per_rollout")],
)  # fmt: skip
def test_stage_sections_are_validated(dotted, value, named):
    assert f"{named}:" in problems_of(with_changes(**{dotted: value}))


def test_stage_references_resolve_relative_paths(tmp_path):
    path = tmp_path / "run.yaml"
    changes = {
        "stage": "ppo",
        "init_from": "./sft",
        "reference": {"path": "../ref"},
        "rl": {"reward": "./rm"},
    }
    path.write_text(yaml.safe_dump(with_changes(**changes)))
    spec = load_run_spec(path)
    assert spec.init_from == str(tmp_path / "sft")
    assert spec.reference.path == str((tmp_path / "../ref").resolve())
    assert spec.rl.reward == str(tmp_path / "rm")
    assert parse_run_spec(with_changes(stage="grpo", init_from="sft-run")).init_from == "sft-run"  # a run id


def test_quantization_is_off_by_default_and_a_kind_alone_is_enough():
    assert parse_run_spec(VALID).model.quantization.kind == "none"
    spec = parse_run_spec(with_changes(model__quantization="4bit", adapter={"kind": "lora"}))
    assert (spec.model.quantization.kind, spec.model.quantization.quant_type) == ("4bit", "nf4")
    assert spec.model.quantization.double_quant and spec.model.quantized
    assert parse_run_spec(spec.model_dump()) == spec  # as published and announced


@pytest.mark.parametrize(
    ("changes", "says"),
    [({"model__quantization": "4bit"}, "adapter: kind 'none' trains every weight, but model.quantization is '4bit'"),
     ({"model__quantization": {"kind": "8bit"}, "adapter": {"kind": "none"}}, "adapter: kind 'none' trains"),
     ({"model__quantization": "3bit", "adapter": {"kind": "lora"}}, "model.quantization.kind: Input should be"),
     ({"model__quantization": {"kind": "8bit", "quant_type": "fp4"}, "adapter": {"kind": "lora"}},
      "model.quantization.quant_type: only used with kind '4bit' (kind is '8bit')"),
     ({"model__quantization": {"kind": "4bit", "compute_dtype": "int8"}, "adapter": {"kind": "lora"}},
      "model.quantization.compute_dtype: Input should be"),
     ({"model__quantization": "8bit", "stage": "rm"}, "stage: stage 'rm' trains a whole sequence-classification "
      "model: set model.quantization none")],
)  # fmt: skip
def test_quantization_that_cannot_train_is_named(changes, says):
    """A quantised base is frozen: a full fine-tune (the default adapter too) or a reward model would have to train
    the quantised weights themselves."""
    assert says in problems_of(with_changes(**changes))
