"""A checkpoint whose chat template ends an assistant turn with a special token other than
its eos token (Gemma's <end_of_turn> beside <eos>, the first Llama 3 tokenizers' <|eot_id|>
beside <|end_of_text|>) trains multi-turn: generation stops at either, a turn cut at
max_new_tokens or ended at eos is closed with the template's end of turn, and observations are appended
after it exactly as the template renders them. Generation also stops at every end id the
checkpoint's generation_config.json lists (Llama-3.x-Instruct, Qwen2.5-Instruct list several)."""

from __future__ import annotations

import asyncio
import shutil

import pytest
import torch
from transformers import GenerationConfig

from forge.cli import main
from forge.config import Config
from forge.models.loading import generation_end_ids, load_tokenizer
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
            if not turn.truncated:  # the model stopped itself, at either stop token
                assert t.token_ids[turn.end - 1] in worker.chat.stop_token_ids
            if t.token_ids[turn.end - 1] != turn_end:  # cut, or at eos: closed by the harness
                assert observation[0] == turn_end
                observation = observation[1:]
            text = worker.tokenizer.decode(observation, skip_special_tokens=True).split()
            assert text[0] == "user" and text[1] in {"higher", "lower", "invalid"}


def test_the_dry_run_takes_a_checkpoint_whose_eos_is_not_its_turn_end(base_eos_checkpoint, capsys):
    assert main(["train", "smoke", f"model.path={base_eos_checkpoint}", "--dry-run"]) == 0
    assert "Traceback" not in capsys.readouterr().err


@pytest.fixture(scope="module")
def listed_ends_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint (eos <|im_end|>) whose generation_config.json lists <|endoftext|> as
    an end too, as Qwen2.5-Instruct's lists 151645 (its eos) and 151643."""
    folder = tmp_path_factory.mktemp("listed_ends") / "model"
    shutil.copytree(tiny_checkpoint, folder)
    ends = load_tokenizer(folder).convert_tokens_to_ids([TURN_END, BASE_EOS])
    GenerationConfig(eos_token_id=ends, pad_token_id=0).save_pretrained(folder)
    return folder


def test_generation_stops_at_every_end_id_the_generation_config_lists_and_trains_on_it(
    listed_ends_checkpoint, tmp_path
):
    """Before, only the tokenizer's eos and the template's turn end stopped generation: a reply
    ran on past <|endoftext|> to max_new_tokens. The listed end is the reply's last token,
    sampled, trained on with its behaviour logprob (as eos is), and closed with the template's
    turn end (tests/test_turn_close.py) before the observation."""
    assert generation_end_ids(tmp_path) == []  # no generation_config.json: no more ends
    cfg = Config()
    cfg.rollout.max_new_tokens, cfg.rollout.max_turns = 4, 2
    worker = RolloutWorker(str(listed_ends_checkpoint), cfg.model, cfg.env, cfg.rollout, 0.5, seed=0)
    turn_end, listed = worker.tokenizer.convert_tokens_to_ids([TURN_END, BASE_EOS])
    assert worker.chat.stop_token_ids == [turn_end, listed]
    assert sorted(worker.engine.stop_token_ids.tolist()) == sorted([turn_end, listed])
    model = worker.engine.model

    def likely_listed_end(module, args, output):  # the model now ends most replies at it
        output.logits[..., listed] += 8.0

    model.register_forward_hook(likely_listed_end)
    trajectories = asyncio.run(worker.rollout([{"task_id": "t0", "secret": 3, "n": 16}], group_size=4))
    ended = [(t, turn) for t in trajectories for turn in t.turns if t.token_ids[turn.end - 1] == listed]
    assert len(ended) >= 4
    for t, turn in ended:
        assert not turn.truncated and t.loss_mask[turn.end - 1] == 1
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([t.token_ids[: turn.end - 1]])).logits[0, -1]
        want = torch.log_softmax(logits.float(), dim=-1)[listed].item()
        assert abs(t.behaviour_logprobs[turn.end - 1] - want) < 1e-4
        if turn.obs_end > turn.end:  # closed with the template's turn end, then the observation
            assert t.token_ids[turn.end] == turn_end and t.loss_mask[turn.end] == 0
            text = worker.tokenizer.decode(t.token_ids[turn.end : turn.obs_end], skip_special_tokens=True)
            assert text.split()[0] == "user"


def test_forge_serve_stops_at_the_generation_configs_end_ids(listed_ends_checkpoint):
    from forge.rollout.engines.server import make_service

    service = make_service(listed_ends_checkpoint, max_context_tokens=256)
    tokenizer = load_tokenizer(listed_ends_checkpoint)
    assert sorted(service.served.engine.stop_token_ids.tolist()) == sorted(
        tokenizer.convert_tokens_to_ids([TURN_END, BASE_EOS])
    )
