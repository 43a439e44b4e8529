"""A bad run spec fails at load with a message that names the field (and the allowed values)."""

from __future__ import annotations

import pytest
import yaml

from potluck.protocols.runspec import RunSpecError, load_run_spec, parse_run_spec

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
    ],
)
def test_wrong_type_is_named(dotted, value, named):
    message = problems_of(with_changes(**{dotted: value}))
    assert f"{named}:" in message


def test_unknown_adapter_names_field_and_allowed_values():
    message = problems_of(with_changes(adapter={"kind": "qlora"}))
    assert "adapter.kind" in message
    assert "'qlora'" in message
    for allowed in ("none", "lora", "prefix", "p_tuning", "prompt_tuning"):
        assert allowed in message


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
