"""Bad input to ``run-peer``, ``potluck generate`` and ``potluck chat`` is one line naming the culprit, exit status 2,
before any model loads (issue #18): a binary run spec, a malformed data line, a bad multiaddr, a model folder that
does not exist, a hub id missing from the cache while offline, a model its stage or adapter cannot train.

The commands run in this process (the unit tier forbids starting a process, a DHT or a daemon, so an error that came
only from the DHT would fail the test), on a spec whose model folder holds only a ``config.json``: it passes the
up-front checks, but loading it fails with another message, so a test that gets the expected line also shows that
nothing tried to load the model first.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey
from huggingface_hub import constants

from potluck.peer.cli import main as run_peer_main
from potluck.peer.results import read_summary
from potluck.peer.training.data import DatasetFormatError
from potluck.peer.training.stages.data import check_stage_data
from potluck.protocols.access import issue_token
from potluck.protocols.records import public_key_tag
from potluck.protocols.runspec import RunSpecError, load_run_spec
from potluck.tools.cli import main as potluck_main
from tests.helpers import peer_id_of

pytestmark = pytest.mark.unit

PEER_ID = "12D3KooWBvJQqkDvEdFWu6EZ4HyH8DqZsEyPDHNYzZBrGjjAP8vy"


def run_peer(*args: str) -> int:
    return run_peer_main([*args, "--host-maddrs", "/ip4/127.0.0.1/tcp/0"])


def generate(*args: str) -> int:
    return potluck_main(["generate", *args, "--prompt", "1+1=", "--max-new-tokens", "2"])


def the_one_line(capsys, code: int) -> str:
    """What the user sees: exit status 2 and exactly one line on stderr, no traceback."""
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def unloadable_model(tiny_assets, tmp_path) -> Path:
    """A model folder that passes the checks (it has a config.json) but fails to load (no tokenizer, no weights)."""
    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(tiny_assets["model"] / "config.json", folder)
    return folder


@pytest.fixture
def spec_of(make_spec, unloadable_model):
    """A spec of the tiny task on the unloadable model, with overrides."""
    return lambda **overrides: make_spec(**{"model": {"name_or_path": str(unloadable_model)}, **overrides})


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """``HF_HUB_OFFLINE=1`` with an empty cache, as huggingface_hub and transformers read them (at import, so the
    test sets what the variables set)."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def cache_as_hub_model(model_dir: Path, cache: Path, repo_id: str) -> None:
    """Lay ``model_dir`` out as the hub cache holds a downloaded ``repo_id`` (copied: nothing is downloaded)."""
    repo, commit = cache / f"models--{repo_id.replace('/', '--')}", "0123456789abcdef" * 2 + "01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(model_dir, repo / "snapshots" / commit)


# ------------------------------------------------------------------------------------------------- run spec


@pytest.mark.parametrize("command", [run_peer, generate], ids=["run-peer", "generate"])
def test_a_binary_run_spec_names_the_file(command, tmp_path, capsys):
    spec = tmp_path / "run.yaml"
    spec.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xf9")
    line = the_one_line(capsys, command("--run-spec", str(spec)))
    assert line.endswith(f"invalid run spec {spec}: not a YAML text file: byte 0x89 at offset 0 is not UTF-8")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "run_id: x\nmodel: {name_or_path: m\n",
            "expected ',' or '}', but got '<stream end>' at line 3, column 1",
        ),
        ("run_id: x\ncreated: 2001-13-45\n", "month must be in 1..12"),  # PyYAML's ValueError
    ],
    ids=["syntax", "bad-date"],
)
def test_broken_yaml_is_one_line_with_its_position(text, problem, tmp_path):
    spec = tmp_path / "run.yaml"
    spec.write_text(text)
    with pytest.raises(RunSpecError) as caught:
        load_run_spec(spec)
    assert str(caught.value) == f"invalid run spec {spec}: not valid YAML: {problem}"


# --------------------------------------------------------------------------------------------------- data


def test_a_malformed_data_line_names_the_file_and_line(spec_of, tiny_assets, tmp_path, capsys):
    rows = tiny_assets["train"].read_text().splitlines()[:4]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join([rows[0], rows[1], "", '{"prompt": "1+1=", "completion": ', *rows[2:]]) + "\n")
    results = tmp_path / "peer.events.jsonl"
    code = run_peer("--run-spec", str(spec_of(data={"path": str(data)})), "--results", str(results))
    line = the_one_line(capsys, code)
    assert line == f"run-peer: data.path {str(data)!r} line 4: not valid JSON (Expecting value at column 34)"
    assert "line 4" in read_summary(results).exit_reason  # the summary says why too


def test_a_missing_data_file_names_the_field(spec_of, tmp_path, capsys):
    missing = tmp_path / "nowhere.jsonl"
    line = the_one_line(capsys, run_peer("--run-spec", str(spec_of(data={"path": str(missing)}))))
    assert line == f"run-peer: data.path {str(missing)!r}: no such file"


def test_a_row_that_is_not_an_object_or_lacks_a_column_is_found_up_front(make_spec, tiny_assets, tmp_path):
    """Every row is checked, not only the first: a later one used to fail as a KeyError while tokenising."""
    rows = tiny_assets["train"].read_text().splitlines()[:3]
    data = tmp_path / "train.jsonl"
    spec = load_run_spec(make_spec(data={"path": str(data), "eval_path": None}))
    data.write_text("\n".join([*rows, "[1, 2]"]) + "\n")
    with pytest.raises(DatasetFormatError, match=r"line 4: expected a JSON object of columns, got list"):
        check_stage_data(spec)
    data.write_text("\n".join([*rows, json.dumps({"prompt": "1+1="})]) + "\n")
    with pytest.raises(
        DatasetFormatError, match=r"line 4 does not fit stage 'sft'.*missing \['completion'\]"
    ):
        check_stage_data(spec)


# ------------------------------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("garbage", "not a multiaddr: Must begin with /"),
        ("/ip4/127.0.0.1/tcp/31337", "no /p2p/<peer id> at the end"),
        ("/ip4/127.0.0.1/tcp/31337/p2p/notapeerid", "'notapeerid' is not a peer id"),
        (f"/ip4/300.0.0.1/tcp/31337/p2p/{PEER_ID}", "not a multiaddr: base address '300.0.0.1' is not IPv4"),
    ],
)
def test_a_bad_initial_peer_is_named_before_the_model_or_dht_starts(address, problem, spec_of, capsys):
    line = the_one_line(capsys, run_peer("--run-spec", str(spec_of()), "--initial-peers", address))
    assert line.startswith(f"run-peer: --initial-peers {address}: {problem}")


def test_an_announced_address_needs_its_port(spec_of, capsys):
    code = run_peer("--run-spec", str(spec_of()), "--announce-maddrs", "/ip4/203.0.113.7/tcp/0")
    assert the_one_line(capsys, code).startswith(
        "run-peer: --announce-maddrs /ip4/203.0.113.7/tcp/0: port 0 cannot be announced"
    )


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"\xff\x00 not a key", "not a libp2p identity file"),
        (
            crypto_pb2.PrivateKey(key_type=crypto_pb2.Ed25519, data=bytes(64)).SerializeToString(),
            "the identity's key is Ed25519",
        ),
    ],
    ids=["garbage", "ed25519"],
)
def test_an_identity_file_that_cannot_sign_is_named_before_the_model_or_dht_starts(
    content, problem, spec_of, tmp_path, capsys
):
    # the peer signs its records with its identity's key (hivemind_ext/keys.py): it must be an RSA one
    identity = tmp_path / "peer.id"
    identity.write_bytes(content)
    line = the_one_line(capsys, run_peer("--run-spec", str(spec_of()), "--identity-path", str(identity)))
    assert line.startswith(f"run-peer: {identity}: {problem}"), line


def test_a_private_runs_missing_or_foreign_token_is_named_before_the_model_or_dht_starts(
    spec_of, tmp_path, capsys
):
    owner = RSAPrivateKey()
    spec = spec_of(access={"private": True, "owner_key": public_key_tag(owner).decode()})
    line = the_one_line(capsys, run_peer("--run-spec", str(spec)))
    assert line.startswith("run-peer: run 'test-run' is private: give --access-token FILE"), line
    identity, token = tmp_path / "peer.id", tmp_path / "token"
    token.write_text(issue_token(owner, "test-run", peer_id_of(tmp_path / "another.id"), ttl=60))
    peer_id_of(identity)  # made: this peer's own identity, not the one the token names
    code = run_peer("--run-spec", str(spec), "--identity-path", str(identity), "--access-token", str(token))
    assert the_one_line(capsys, code).startswith(f"run-peer: --access-token {token}: it is for peer "), token


def test_a_bad_coordinator_key_is_named_before_the_model_or_dht_starts(spec_of, capsys):
    # with --run-spec too: the key says whose pause and finish the peer obeys
    code = run_peer("--run-spec", str(spec_of()), "--coordinator-key", "ssh-rsa AAAA")
    assert the_one_line(capsys, code) == (
        "run-peer: --coordinator-key must be '[owner:ssh-rsa ...]' or a file holding it, got 'ssh-rsa AAAA'"
    )


def test_a_bad_coordinator_certificate_is_named_before_anything_dials(tmp_path, capsys):
    not_pem = tmp_path / "coordinator.crt"
    not_pem.write_text("a certificate, honest")
    code = run_peer("--coordinator", "127.0.0.1:1", "--coordinator-tls-ca", str(not_pem))
    assert the_one_line(capsys, code).startswith(
        f"run-peer: --coordinator-tls-ca {not_pem}: not a PEM certificate"
    )
    code = run_peer("--coordinator", "127.0.0.1:1", "--coordinator-tls-ca", str(tmp_path / "missing.crt"))
    assert (
        the_one_line(capsys, code)
        == f"run-peer: --coordinator-tls-ca {tmp_path / 'missing.crt'}: no such file"
    )


def test_generate_remote_names_a_bad_initial_peer(spec_of, capsys):
    code = generate("--run-spec", str(spec_of()), "--remote", "--initial-peers", "/ip4/127.0.0.1/tcp/31337")
    assert the_one_line(capsys, code).startswith(
        "potluck: --initial-peers /ip4/127.0.0.1/tcp/31337: no /p2p/"
    )


# --------------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("command", [run_peer, generate], ids=["run-peer", "generate"])
def test_a_model_folder_that_does_not_exist_is_named(command, make_spec, tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    line = the_one_line(capsys, command("--run-spec", str(make_spec(model={"name_or_path": str(missing)}))))
    assert line.endswith(f"model.name_or_path: folder {str(missing)!r} does not exist")


def test_a_folder_without_a_model_is_named(make_spec, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    line = the_one_line(capsys, run_peer("--run-spec", str(make_spec(model={"name_or_path": str(empty)}))))
    assert (
        line
        == f"run-peer: model.name_or_path: folder {str(empty)!r} holds no config.json or adapter_config.json"
    )


def test_an_init_from_run_without_a_checkpoint_is_named_before_loading(spec_of, tmp_path, capsys):
    code = run_peer("--run-spec", str(spec_of(init_from="sft-run")), "--save-dir", str(tmp_path / "save"))
    assert the_one_line(capsys, code).startswith(
        "run-peer: init_from: 'sft-run' is neither a model folder nor a run with a checkpoint"
    )


@pytest.mark.parametrize("command", ["run-peer", "generate", "chat"])
def test_an_uncached_hub_id_while_offline_is_named(command, offline_hub, make_spec, capsys):
    spec = make_spec(model={"name_or_path": "potluck-test/not-cached"})
    if command == "run-peer":
        code, field = run_peer("--run-spec", str(spec)), "model.name_or_path"
    elif command == "generate":
        code, field = generate("--run-spec", str(spec)), "model.name_or_path"
    else:
        code, field = potluck_main(["chat", "potluck-test/not-cached", "--prompt", "1+1="]), "MODEL_DIR"
    line = the_one_line(capsys, code)
    assert (
        f"{field}: 'potluck-test/not-cached' is not a folder, and as a hub id it is not in the local cache"
        in line
    )
    assert str(offline_hub) in line and "HF_HUB_OFFLINE" in line


def config_only(folder: Path, config) -> Path:
    """A model folder holding only ``config``'s ``config.json``: the architecture checks read nothing else, and
    loading it would fail with another message."""
    config.save_pretrained(folder)
    return folder


TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}


@pytest.mark.parametrize(
    ("kind", "what"),
    [("bert", "is an encoder; stage 'sft' trains a decoder-only causal LM"), ("t5", "is an encoder-decoder")],
)
def test_a_model_that_is_not_a_decoder_is_refused_for_sft(kind, what, make_spec, tmp_path, capsys):
    from transformers import BertConfig, T5Config

    config = (
        BertConfig(**TINY) if kind == "bert" else T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2)
    )
    folder = config_only(tmp_path / kind, config)
    line = the_one_line(capsys, run_peer("--run-spec", str(make_spec(model={"name_or_path": str(folder)}))))
    assert line.startswith(f"run-peer: model.name_or_path {str(folder)!r} (model type {kind!r}) {what}"), line


def test_an_encoder_passes_as_a_reward_model(make_spec, tiny_assets, tmp_path, capsys):
    from transformers import BertConfig

    folder = config_only(tmp_path / "bert", BertConfig(**TINY))
    pairs = tiny_assets["train"].parent / "preferences_eval.jsonl"
    spec = make_spec(
        stage="rm", model={"name_or_path": str(folder)}, data={"path": str(pairs), "eval_path": None}
    )
    assert run_peer("--run-spec", str(spec)) != 0  # it got as far as loading the weights, which are not there
    assert "model type" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("adapter", "what"),
    [
        ({"kind": "lora", "r": 4}, "adapter.target_modules: ['q_proj', 'v_proj'] name no module of model type "
                                   "'gpt2' (GPT2LMHeadModel); its linear layers are c_attn, c_fc, c_proj, lm_head"),
        ({"kind": "ia3", "target_modules": ["qkv_proj"]}, "adapter.target_modules: ['qkv_proj'] name no module"),
    ],
    ids=["lora", "ia3"],
)  # fmt: skip
def test_adapter_targets_the_model_does_not_have_are_refused(adapter, what, make_spec, tmp_path, capsys):
    from transformers import GPT2Config

    folder = config_only(tmp_path / "gpt2", GPT2Config(n_embd=32, n_layer=1, n_head=2))
    spec = make_spec(model={"name_or_path": str(folder)}, adapter=adapter)
    assert the_one_line(capsys, run_peer("--run-spec", str(spec))).startswith(f"run-peer: {what}")


def test_ia3_without_targets_needs_a_model_type_peft_knows(make_spec, tmp_path, capsys):
    from transformers import CodeGenConfig

    folder = config_only(tmp_path / "codegen", CodeGenConfig(n_embd=32, n_layer=1, n_head=2, rotary_dim=8))
    spec = make_spec(model={"name_or_path": str(folder)}, adapter={"kind": "ia3"})
    line = the_one_line(capsys, run_peer("--run-spec", str(spec)))
    assert line == ("run-peer: adapter.target_modules: peft has no default IA3 modules for model type 'codegen': "
                    "name them (with feedforward_modules)")  # fmt: skip


def test_a_model_type_transformers_does_not_know_is_named(make_spec, tmp_path, capsys):
    folder = tmp_path / "unknown"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-family"}))
    line = the_one_line(capsys, run_peer("--run-spec", str(make_spec(model={"name_or_path": str(folder)}))))
    assert line.startswith(f"run-peer: model.name_or_path {str(folder)!r}: ") and "no-such-family" in line, (
        line
    )


def test_a_cached_hub_id_still_loads_while_offline(offline_hub, tiny_assets, make_spec, capsys):
    cache_as_hub_model(tiny_assets["model"], offline_hub, "potluck-test/tiny")
    assert generate("--run-spec", str(make_spec(model={"name_or_path": "potluck-test/tiny"}))) == 0
    out = capsys.readouterr()
    assert out.out.strip() and not out.err.strip()


@pytest.mark.parametrize("role", ["trainer", "shard"])
def test_quantization_without_bitsandbytes_is_named_before_the_model_loads(
    role, make_spec, unloadable_model, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed, as the import system sees it
    spec = make_spec(
        model={"name_or_path": str(unloadable_model), "quantization": "4bit"}, adapter={"kind": "lora"}
    )
    line = the_one_line(capsys, run_peer("--run-spec", str(spec), "--role", role))
    assert line == (
        "run-peer: model.quantization: '4bit' needs bitsandbytes, which is not installed here: "
        "pip install 'potluck[quant]' (or set quantization kind none)"
    )
