"""A tokenizer that gives ids past the model's embedding table is refused before anything runs,
naming the folder and the fix, rather than each episode erroring with an IndexError."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from forge.cli import main
from forge.models.tiny import build_tokenizer


def checkpoint(folder, vocab_size: int):
    """The tiny tokenizer (298 ids, text spelled in byte tokens up to id 297) beside a one-layer
    Llama with `vocab_size` embedding rows."""
    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=64, max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "command",
    [
        ["train", "smoke", "--dry-run"],
        ["sft", "smoke", "--data", "DATA"],
        ["eval", "smoke", "--tasks", "1", "--episodes", "1", "--no-progress"],
    ],
    ids=["train --dry-run", "sft", "eval"],
)
def test_a_tokenizer_past_the_models_embeddings_is_refused_naming_the_fix(tmp_path, capsys, command):
    folder = checkpoint(tmp_path / "model", vocab_size=100)
    data = tmp_path / "data.jsonl"
    data.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "2"}]})
    )
    args = [str(data) if arg == "DATA" else arg for arg in command]
    if command[0] == "eval":
        args += ["--checkpoint", str(folder)]
    else:
        args += [f"model.path={folder}", "logging.tensorboard=false", "--output-dir", str(tmp_path / "run")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"the tokenizer at {folder}" in err and "its vocabulary (id 297)" in err and "100 rows" in err
    assert "resize_token_embeddings" in err and "Traceback" not in err


def test_embeddings_past_the_tokenizer_as_real_checkpoints_pad_them_are_fine(tmp_path):
    folder = checkpoint(tmp_path / "model", vocab_size=320)
    assert (
        main(["train", "smoke", f"model.path={folder}", "--dry-run", "--output-dir", str(tmp_path / "run")])
        == 0
    )
