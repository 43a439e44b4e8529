"""``potluck chat``: a trained checkpoint answers prompts (non-interactively with ``--prompt``); it and ``potluck generate``
lay out prompts the same way (one BOS, the chat template applied once)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from potluck.peer.training.checkpoint import save_checkpoint
from potluck.tools.cli import main as potluck_main

pytestmark = pytest.mark.unit


def greedy_answer(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The greedy answer to ``prompt`` exactly as written (special tokens parsed, nothing added), BOS first
    unless it starts with a special token already."""
    if not prompt.startswith("<"):
        prompt = tokenizer.bos_token + prompt
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False).input_ids])
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_chat_answers_with_the_last_written_checkpoint_of_a_save_dir(tiny_assets, tmp_path, capsys):
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets["model"])
    model = AutoModelForCausalLM.from_pretrained(tiny_assets["model"])
    save_checkpoint(tmp_path, "sft", 200, model, tokenizer, {}, keep=0)
    torch.manual_seed(0)
    with torch.no_grad():  # the later stage (fewer steps, written last) answers differently
        for parameter in model.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    save_checkpoint(tmp_path, "ppo", 30, model, tokenizer, {}, keep=0)
    expected = [greedy_answer(model, tokenizer, p, 4) for p in ("12+30=", "1+1=")]

    code = potluck_main(
        ["chat", str(tmp_path), "--prompt", "12+30=", "--prompt", "1+1=", "--max-new-tokens", "4"]
    )
    assert code == 0
    assert capsys.readouterr().out.splitlines() == [f"12+30={expected[0]}", f"1+1={expected[1]}"]


def test_chat_names_a_folder_without_a_model(tmp_path, capsys):
    assert potluck_main(["chat", str(tmp_path), "--prompt", "1+1="]) == 2
    assert "holds no model and no checkpoint" in capsys.readouterr().err


def test_chat_and_generate_send_one_bos_through_a_template_that_renders_it(
    bos_template_model, make_spec, capsys
):
    """A Llama-3-style template starts with BOS: ``--chat-template`` must not add the tokenizer's on top, in
    ``potluck chat`` and ``potluck generate`` alike (one template path)."""
    tokenizer = AutoTokenizer.from_pretrained(bos_template_model)
    model = AutoModelForCausalLM.from_pretrained(bos_template_model)
    one_bos = "<s>user: 1+2=</s>assistant: "
    expected = greedy_answer(model, tokenizer, one_bos, 4)

    options = ["--prompt", "1+2=", "--max-new-tokens", "4", "--chat-template", "--show-prompt"]
    assert potluck_main(["chat", str(bos_template_model), *options]) == 0
    chat = capsys.readouterr()
    spec = make_spec(model={"name_or_path": str(bos_template_model)})
    assert potluck_main(["generate", "--run-spec", str(spec), *options]) == 0
    generate = capsys.readouterr()

    assert chat.err.splitlines() == [f"potluck chat: prompt tokens {one_bos!r}"]
    assert generate.err.splitlines() == [f"potluck generate: prompt tokens {one_bos!r}"]
    assert chat.out.splitlines() == [f"1+2={expected}"]
    assert generate.out.splitlines() == [expected]


def test_raw_prompts_get_one_bos_in_chat_and_generate(tiny_assets, make_spec, capsys):
    options = ["--prompt", "1+2=", "--max-new-tokens", "4", "--show-prompt"]
    assert potluck_main(["chat", str(tiny_assets["model"]), *options]) == 0
    assert potluck_main(["generate", "--run-spec", str(make_spec()), *options]) == 0
    assert capsys.readouterr().err.splitlines() == [
        "potluck chat: prompt tokens '<s>1+2='",
        "potluck generate: prompt tokens '<s>1+2='",
    ]
