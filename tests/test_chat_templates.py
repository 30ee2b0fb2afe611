"""Chat templates as checkpoints in the wild carry them. One that takes no system message
(Gemma 1 and 2 raise 'System role not supported', Mistral's first instruct models 'Conversation
roles must alternate', others drop it unsaid) still gets the env's system prompt: at the head of
the first user message, as those models' own guidance puts instructions. One that raises on
what every episode renders is refused before a run starts, naming the folder."""

from __future__ import annotations

import shutil

import pytest

from forge.cli import main
from forge.models.loading import load_tokenizer
from forge.models.tiny import CHAT_TEMPLATE, build_tokenizer
from forge.rollout.chat import ChatFormat

REFUSES_SYSTEM = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    + CHAT_TEMPLATE
)
ALTERNATES = (
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<|im_start|>{{ message['role'] }} {{ message['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}"
)
DROPS_SYSTEM = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "<|im_start|>{{ message['role'] }} {{ message['content'] }}<|im_end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}"
)
SYSTEM = "Reply with the given word spelled backwards."
TASK = "Reverse this word: forge"


def tokenizer_with(template: str):
    tokenizer = build_tokenizer(extra_words=["Reply", "with", "given", "word", "spelled", "backwards."])
    tokenizer.chat_template = template
    return tokenizer


@pytest.mark.parametrize(
    "template", [REFUSES_SYSTEM, ALTERNATES, DROPS_SYSTEM], ids=["refuses", "alternates", "drops"]
)
def test_a_template_without_a_system_role_gets_the_system_prompt_in_the_first_user_message(template):
    tokenizer = tokenizer_with(template)
    ids = ChatFormat(tokenizer).prompt_ids(TASK, SYSTEM)
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{SYSTEM}\n\n{TASK}"}], add_generation_prompt=True, tokenize=False
    )
    assert ids == tokenizer(expected, add_special_tokens=False)["input_ids"]


def test_a_template_with_a_system_role_renders_the_system_prompt_as_its_own_message():
    tokenizer = tokenizer_with(CHAT_TEMPLATE)
    expected = tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TASK}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert (
        ChatFormat(tokenizer).prompt_ids(TASK, SYSTEM)
        == tokenizer(expected, add_special_tokens=False)["input_ids"]
    )


def test_the_dry_run_takes_an_env_with_a_system_prompt_on_a_template_that_refuses_one(
    tiny_checkpoint, tmp_path, capsys
):
    folder = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, folder)
    tokenizer = load_tokenizer(folder)
    tokenizer.chat_template = REFUSES_SYSTEM
    tokenizer.save_pretrained(folder)
    args = [
        "train",
        "smoke",
        f"model.path={folder}",
        "env.name=examples.custom_env:ReverseEnv",
        "env.kwargs={}",
    ]
    assert main([*args, "env.num_tasks=8", "--dry-run", "--output-dir", str(tmp_path / "run")]) == 0
    assert "Traceback" not in capsys.readouterr().err


def test_the_dry_run_refuses_a_template_that_raises_on_a_conversation_naming_the_folder(
    tiny_checkpoint, tmp_path, capsys
):
    folder = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, folder)
    tokenizer = load_tokenizer(folder)
    tokenizer.chat_template = (
        "{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}" + CHAT_TEMPLATE
    )
    tokenizer.save_pretrained(folder)
    assert (
        main(["train", "smoke", f"model.path={folder}", "--dry-run", "--output-dir", str(tmp_path / "run")])
        == 2
    )
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert str(folder) in err and "one message only" in err


def test_the_gateway_puts_an_agents_system_message_in_its_first_user_message_on_such_a_template():
    """The reference agent (forge.openai_agent) sends an env's system prompt as a system message."""
    from gateway_helpers import ScriptedEngine

    from forge.gateway import Gateway
    from forge.gateway.episodes import EpisodeStore

    tokenizer = tokenizer_with(REFUSES_SYSTEM)
    gateway = Gateway(
        ScriptedEngine([5]), tokenizer, EpisodeStore(), max_new_tokens=4, max_context_tokens=256
    )
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TASK}]
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{SYSTEM}\n\n{TASK}"}], add_generation_prompt=True, tokenize=False
    )
    assert gateway.chat_prompt_text(messages, None) == expected


def test_tool_call_markers_a_tokenizer_registers_as_special_reach_the_env_in_the_reply():
    """A tokenizer whose <tool_call> and </tool_call> are special tokens: skipping special tokens
    handed a ToolEnv the call's JSON alone, a malformed final answer, on every call."""
    from forge.env.tools import ToolCall, parse_tool_calls
    from forge.models.tiny import build_tokenizer
    from forge.rollout.chat import ChatFormat

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|im_start|>", "<|endoftext|>", "<tool_call>", "</tool_call>"]}
    )
    chat = ChatFormat(tokenizer)
    call = '<tool_call>{"name": "count", "arguments": {"item": "fig"}}</tool_call>'
    reply = tokenizer(call, add_special_tokens=False)["input_ids"] + [chat.turn_end_id]
    text = chat.decode(reply)
    assert parse_tool_calls(text) == ([ToolCall("count", {"item": "fig"})], [])
    assert "<|im_end|>" not in text  # the turn's end is still no text
