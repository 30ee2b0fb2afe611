"""A checkpoint whose chat template ends an assistant turn with a special token other than
its eos token (Gemma's <end_of_turn> beside <eos>, the first Llama 3 tokenizers' <|eot_id|>
beside <|end_of_text|>) trains multi-turn: generation stops at either, a turn cut at
max_new_tokens is closed with the template's end of turn, and observations are appended
after it exactly as the template renders them."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from forge.cli import main
from forge.config import Config
from forge.models.loading import load_tokenizer
from forge.rollout.chat import ChatFormat
from forge.rollout.worker import RolloutWorker

BASE_EOS = "<|endoftext|>"  # the tiny tokenizer's other special token, as a base model's eos
TURN_END = "<|im_end|>"  # what the tiny template ends every turn with


@pytest.fixture(scope="module")
def base_eos_checkpoint(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("base_eos") / "model"
    shutil.copytree(tiny_checkpoint, folder)
    tokenizer = load_tokenizer(folder)
    tokenizer.eos_token = BASE_EOS
    tokenizer.save_pretrained(folder)
    return folder


def test_the_turn_end_is_the_templates_and_generation_stops_at_it_and_at_eos(base_eos_checkpoint):
    tokenizer = load_tokenizer(base_eos_checkpoint)
    assert tokenizer.eos_token == BASE_EOS
    chat = ChatFormat(tokenizer)
    assert chat.turn_end == TURN_END
    assert chat.stop_token_ids == tokenizer.convert_tokens_to_ids([TURN_END, BASE_EOS])
    history = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    before = tokenizer.apply_chat_template(history, tokenize=False)
    after = tokenizer.apply_chat_template(
        [*history, {"role": "user", "content": "higher"}], tokenize=False, add_generation_prompt=True
    )
    assert after.startswith(before)
    assert (
        chat.observation_ids("higher")
        == tokenizer(after[len(before) :], add_special_tokens=False)["input_ids"]
    )


def test_a_multi_turn_rollout_closes_cut_turns_with_the_templates_turn_end(base_eos_checkpoint):
    cfg = Config()
    cfg.rollout.max_new_tokens = 3
    cfg.rollout.max_turns = 4
    worker = RolloutWorker(str(base_eos_checkpoint), cfg.model, cfg.env, cfg.rollout, 0.5, seed=0)
    tasks = [{"task_id": "t0", "secret": 3, "n": 16}]
    trajectories = asyncio.run(worker.rollout(tasks, group_size=4))
    turn_end = worker.tokenizer.convert_tokens_to_ids(TURN_END)
    assert sorted(worker.engine.stop_token_ids.tolist()) == sorted(worker.chat.stop_token_ids)
    played = [turn for t in trajectories for turn in t.turns[:-1]]
    assert played and any(turn.truncated for turn in played)
    for t in trajectories:
        assert t.status in {"ok", "truncated"}, t.status
        for turn in t.turns[:-1]:
            observation = t.token_ids[turn.end : turn.obs_end]
            if turn.truncated:  # closed by the harness, with the template's end of turn
                assert observation[0] == turn_end
                observation = observation[1:]
            else:  # the model stopped itself, at either stop token
                assert t.token_ids[turn.end - 1] in worker.chat.stop_token_ids
            text = worker.tokenizer.decode(observation, skip_special_tokens=True).split()
            assert text[0] == "user" and text[1] in {"higher", "lower", "invalid"}


def test_the_dry_run_takes_a_checkpoint_whose_eos_is_not_its_turn_end(base_eos_checkpoint, capsys):
    assert main(["train", "smoke", f"model.path={base_eos_checkpoint}", "--dry-run"]) == 0
    assert "Traceback" not in capsys.readouterr().err
