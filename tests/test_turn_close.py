"""What the model sees after each of its replies is what the chat template renders, however
the reply ended: at the template's turn end, at another end id generation stops at (the
tokenizer's eos, one the checkpoint's generation_config.json lists: Qwen2-Instruct's
<|endoftext|> beside <|im_end|>, Llama 3's <|end_of_text|> beside <|eot_id|>), or cut at
max_new_tokens. A reply that did not end at the turn end is closed with it, a token the
model did not sample (mask 0, no logprob, no version); the sampled tokens are trained on
exactly as the engine gave them, and each turn's context is exactly what the engine saw."""

from __future__ import annotations

import asyncio

import pytest
from family_tokenizers import byte_level_tokenizer

from forge.env.base import Env, StepResult
from forge.rollout.agent import EpisodeLimits, run_episode
from forge.rollout.chat import ChatFormat
from forge.rollout.engines.batching import BatchingEngine
from forge.rollout.engines.protocol import GenerationResult
from forge.types import NO_VERSION

# family: (the template's turn end, the other end id its checkpoints stop at)
FAMILIES = {"qwen": ("<|im_end|>", "<|endoftext|>"), "llama3": ("<|eot_id|>", "<|end_of_text|>")}
CUT = None  # a reply max_new_tokens cut off
REPLIES = ["guess 4", "guess 9", "guess 7", "guess 6"]
OBSERVATIONS = ["pick a number", "higher", "lower", "lower"]


class GuessEnv(Env):
    def reset(self, task, seed):
        self.steps = 0
        return OBSERVATIONS[0]

    def step(self, action):
        self.steps += 1
        done = self.steps == len(REPLIES)
        return StepResult("" if done else OBSERVATIONS[self.steps], float(done), done)


class ScriptedEngine:
    """Replies with the next scripted text, ended by the given id (or cut: no end id);
    keeps every prompt it was asked to continue."""

    policy_version = 5

    def __init__(self, tokenizer, ends: list[int | None]) -> None:
        self.tokenizer = tokenizer
        self.ends = list(ends)
        self.prompts: list[list[int]] = []
        self.sampled: list[list[int]] = []

    def generate(self, requests):
        results = []
        for request in requests:
            self.prompts.append(list(request.token_ids))
            end = self.ends[len(self.sampled)]
            ids = self.tokenizer(REPLIES[len(self.sampled)], add_special_tokens=False)["input_ids"]
            ids += [] if end is CUT else [end]
            self.sampled.append(ids)
            logprobs = [-0.25 - i / 100 for i in range(len(ids))]
            results.append(GenerationResult(ids, logprobs, end is not CUT, self.policy_version, len(ids)))
        return results

    def release(self, episode_id):
        pass


def play(chat: ChatFormat, engine: ScriptedEngine):
    limits = EpisodeLimits(
        max_turns=8, max_new_tokens=64, max_context_tokens=4096, step_timeout_s=30, episode_timeout_s=60
    )

    async def episode():
        batching = BatchingEngine(engine)
        try:
            return await run_episode(GuessEnv(), {"task_id": "t"}, 0, batching, chat, limits, "g")
        finally:
            await batching.close()

    return asyncio.run(episode())


def after_reply(tokenizer, turn: int) -> str:
    """The template's text after the content of reply `turn` up to the opening of the next
    assistant turn: its end of turn, the next observation as a user message, the opening."""
    messages = [{"role": "user", "content": OBSERVATIONS[0]}]
    for played in range(turn + 1):
        messages += [
            {"role": "assistant", "content": REPLIES[played]},
            {"role": "user", "content": OBSERVATIONS[played + 1]},
        ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    reply = text.rindex(REPLIES[turn])
    return text[reply + len(REPLIES[turn]) :]


def family_tokenizer(family: str, folder):
    """`family`'s byte-level tokenizer with its other end token (Llama 3's <|end_of_text|> is
    not among the family's specials; Qwen's <|endoftext|> is)."""
    other_end = FAMILIES[family][1]
    return byte_level_tokenizer(family, folder, more_specials=[other_end] if family == "llama3" else [])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_what_follows_every_reply_is_the_templates_rendering_however_the_reply_ended(family, tmp_path):
    turn_end, other_end = FAMILIES[family]
    tokenizer = family_tokenizer(family, tmp_path)
    turn_end_id, other_end_id = tokenizer.convert_tokens_to_ids([turn_end, other_end])
    chat = ChatFormat(tokenizer, end_token_ids=[turn_end_id, other_end_id])  # the generation config's
    assert chat.turn_end_id == turn_end_id and other_end_id in chat.stop_token_ids
    ends = [turn_end_id, other_end_id, CUT, other_end_id]
    engine = ScriptedEngine(tokenizer, ends)
    trajectory = play(chat, engine)
    assert trajectory.status == "ok" and trajectory.num_turns == len(REPLIES), trajectory.error
    for turn, end in enumerate(ends[:-1]):
        played = trajectory.turns[turn]
        # The end id the model sampled stays where it sampled it (it is trained on); what
        # the harness adds after it is the template's.
        content_end = played.end - (end == other_end_id)
        assert tokenizer.decode(trajectory.token_ids[played.start : content_end]) == REPLIES[turn] + (
            turn_end if end == turn_end_id else ""
        )
        shown = tokenizer.decode(trajectory.token_ids[played.end : played.obs_end])
        assert (turn_end if end == turn_end_id else "") + shown == after_reply(tokenizer, turn), (
            family,
            turn,
        )
    # Each turn's context, which the engine continued, is the trajectory so far: the trainer
    # trains on what the engine saw.
    for turn, prompt in enumerate(engine.prompts):
        assert prompt == trajectory.token_ids[: trajectory.turns[turn].start]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_only_sampled_tokens_are_trained_and_the_closing_turn_end_is_not(family, tmp_path):
    turn_end, other_end = FAMILIES[family]
    tokenizer = family_tokenizer(family, tmp_path)
    turn_end_id, other_end_id = tokenizer.convert_tokens_to_ids([turn_end, other_end])
    chat = ChatFormat(tokenizer, end_token_ids=[other_end_id])
    ends = [other_end_id, CUT, turn_end_id, other_end_id]
    engine = ScriptedEngine(tokenizer, ends)
    trajectory = play(chat, engine)
    for turn, sampled, end in zip(trajectory.turns, engine.sampled, ends, strict=True):
        assert trajectory.token_ids[turn.start : turn.end] == sampled
        assert trajectory.loss_mask[turn.start : turn.end] == [1] * len(sampled)
        assert trajectory.policy_versions[turn.start : turn.end] == [5] * len(sampled)
        assert trajectory.behaviour_logprobs[turn.start : turn.end] == [
            -0.25 - i / 100 for i in range(len(sampled))
        ]
        assert turn.truncated == (end is CUT)
        after = slice(turn.end, turn.obs_end)
        closed = end != turn_end_id  # closed by the harness with the template's turn end
        assert (trajectory.token_ids[after][:1] == [turn_end_id]) == closed
        assert set(trajectory.loss_mask[after]) <= {0} and set(trajectory.policy_versions[after]) <= {
            NO_VERSION
        }
        assert set(trajectory.behaviour_logprobs[after]) <= {0.0}
    assert sum(trajectory.loss_mask) == sum(map(len, engine.sampled))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_gateway_renders_each_calls_prompt_whole_so_a_reply_at_another_end_id_is_closed(family, tmp_path):
    """The gateway's agents send their whole history each call and the template renders it:
    the next call sees the reply closed as the template closes it, and each call's sample
    trains the reply with the end id it was sampled with."""
    from gateway_helpers import ScriptedEngine as GatewayEngine
    from gateway_helpers import calls_of, client, serve, start

    turn_end, other_end = FAMILIES[family]
    tokenizer = family_tokenizer(family, tmp_path)
    other_end_id = tokenizer.convert_tokens_to_ids(other_end)
    reply = tokenizer("4", add_special_tokens=False)["input_ids"] + [other_end_id]
    with serve(GatewayEngine(reply), tokenizer) as server:
        episode = start(server)
        agent = client(server, episode["episode_id"])
        messages = [{"role": "user", "content": "guess"}]
        answer = agent.chat.completions.create(model="forge", messages=messages).choices[0]
        assert answer.finish_reason == "stop" and answer.message.content == "4"
        messages += [{"role": "assistant", "content": "4"}, {"role": "user", "content": "higher"}]
        agent.chat.completions.create(model="forge", messages=messages)
        first, second = calls_of(server, episode)[:2]
    assert first.completion_ids == reply
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(second.prompt_ids) == rendered and f"4{turn_end}" in rendered
