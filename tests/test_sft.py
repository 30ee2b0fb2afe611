"""`forge sft`: supervised warm start through the RL trainer, loss on assistant tokens only."""

from __future__ import annotations

import json

import pytest
import torch

from forge.models.tiny import build_tokenizer
from forge.sft import transcript_sample

TRANSCRIPT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "guess a number from 0 to 3"},
    {"role": "assistant", "content": "2"},
    {"role": "user", "content": "higher"},
    {"role": "assistant", "content": "3"},
]


def test_only_the_assistant_tokens_carry_the_loss():
    tokenizer = build_tokenizer()
    sample = transcript_sample(tokenizer, TRANSCRIPT)
    trained = [
        tokenizer.convert_ids_to_tokens(i)
        for i, m in zip(sample.token_ids, sample.loss_mask, strict=True)
        if m
    ]
    assert trained == ["▁2", "<|im_end|>", "▁3", "<|im_end|>"]  # each reply and its end of turn
    rendered = tokenizer.apply_chat_template(TRANSCRIPT, tokenize=False)
    assert sample.token_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert sample.advantage == 1.0


def test_a_template_without_a_system_role_learns_the_prompt_a_rollout_renders():
    """Gemma 1 and 2 refuse a system message: the transcript's goes at the head of the first
    user message, as ChatFormat puts an env's system prompt in a rollout."""
    from test_chat_templates import REFUSES_SYSTEM

    from forge.rollout.chat import ChatFormat

    tokenizer = build_tokenizer()
    tokenizer.chat_template = REFUSES_SYSTEM
    sample = transcript_sample(tokenizer, TRANSCRIPT)
    prompt = ChatFormat(tokenizer).prompt_ids(TRANSCRIPT[1]["content"], TRANSCRIPT[0]["content"])
    assert sample.token_ids[: len(prompt)] == prompt
    assert sample.loss_mask[: len(prompt)] == [0] * len(prompt) and sample.loss_mask[len(prompt)] == 1


def test_a_transcript_without_an_assistant_message_is_refused():
    with pytest.raises(ValueError, match="no assistant message"):
        transcript_sample(build_tokenizer(), TRANSCRIPT[:2])


def test_sft_teaches_the_demonstrated_reply(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from forge.cli import main
    from forge.models.loading import load_tokenizer

    data = tmp_path / "demos.jsonl"
    data.write_text("".join(json.dumps({"messages": TRANSCRIPT[1:3]}) + "\n" for _ in range(16)))
    overrides = ["train.learning_rate=0.003", "logging.tensorboard=false"]
    assert main(["sft", "configs/smoke.yaml", *overrides, "--data", str(data), "--output-dir",
                 str(tmp_path / "sft"), "--epochs", "10", "--batch-size", "8"]) == 0  # fmt: skip
    assert "model.path=" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and rows[-1]["loss"] < rows[0]["loss"] / 4
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "sft" / "final")
    tokenizer = load_tokenizer(tmp_path / "sft" / "final")
    prompt = tokenizer.apply_chat_template(TRANSCRIPT[1:2], add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        best = model(ids).logits[0, -1].argmax().item()
    assert tokenizer.convert_ids_to_tokens(best) == "▁2"


def test_bad_transcript_files_name_the_line(tmp_path):
    from forge.config import ConfigError
    from forge.sft import read_transcripts

    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"messages": TRANSCRIPT}) + '\n{"text": "no messages"}\n')
    with pytest.raises(ConfigError, match="line 2 needs a 'messages' list"):
        read_transcripts(data)


class DemoEnv:
    """Only what `forge sft` asks of an env: tasks and `demonstrations(tasks)`."""

    @classmethod
    def demonstrations(cls, tasks, **kwargs):
        return [[{"role": "user", "content": "guess a number"}, {"role": "assistant", "content": str(t["secret"])}]
                for t in tasks]  # fmt: skip


def test_an_envs_demonstrations_are_the_default_data(tmp_path, monkeypatch):
    from forge import sft as sft_module
    from forge.config import load_config

    monkeypatch.setattr("forge.env.registry.resolve_env", lambda name: DemoEnv)
    monkeypatch.setattr("forge.run.tasks.load_task_rows", lambda cfg: [{"secret": i % 4} for i in range(12)])
    cfg = load_config("configs/smoke.yaml", ["logging.tensorboard=false"])
    sft_module.sft(cfg, None, tmp_path / "sft", epochs=1, batch_size=4)
    rows = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["trained_samples"] for r in rows] == [4.0, 4.0, 4.0]


def test_an_env_without_demonstrations_is_told_to_give_data(monkeypatch):
    from forge.config import ConfigError, load_config
    from forge.sft import env_demonstrations

    with pytest.raises(ConfigError, match="GuessNumberEnv has no demonstrations"):
        env_demonstrations(load_config("configs/smoke.yaml", []))


def test_a_swarm_config_asks_the_env_for_a_teams_demonstrations():
    from forge.config import load_config
    from forge.sft import env_demonstrations

    team = env_demonstrations(load_config("configs/swarm.yaml", ["env.num_tasks=3"]))
    single = ["env.num_tasks=3", "swarm.enabled=false", "reward.parl.enabled=false"]
    alone = env_demonstrations(load_config("configs/swarm.yaml", single))
    assert [m[1]["content"].split()[0] for m in team[:2]] == ["spawn", team[1][0]["content"].split()[1]]
    assert len(team) == 3 * 7 and len(alone) == 3
    assert all(m["role"] == "user" or m["content"].split()[0] != "spawn" for t in alone for m in t)


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ('{"messages": [{"role": "user", "content": "hi"}]}', "line 1 has no assistant message"),
        ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}',
         "line 1 message 0 \\(user\\) has 'content' int"),
        ('{"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}', "line 1 message 0 has no 'role'"),
        ('{"messages": "hello"}', "line 1 needs a 'messages' list"),
        ('{"messages": [{"role": "human", "content": "hi"}, {"role": "gpt", "content": "x"}]}',
         "line 1 message 0 has role 'human'; roles are assistant, developer, system, tool, user \\(ShareGPT's"),
        ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}',
         "line 1 message 1 \\(assistant\\) is empty"),
    ],
)  # fmt: skip
def test_a_transcript_file_that_cannot_teach_is_refused_naming_its_line(tmp_path, line, says):
    from forge.config import ConfigError
    from forge.sft import read_transcripts

    data = tmp_path / "bad.jsonl"
    data.write_text(line + "\n")
    with pytest.raises(ConfigError, match=says):
        read_transcripts(data)


class GarbageDemoEnv:
    """An env whose demonstrations are not transcripts, in one of the ways they go wrong."""

    given: object = None

    @classmethod
    def demonstrations(cls, tasks, **kwargs):
        if cls.given == "raise":
            raise KeyError("no solver for this task")
        return cls.given


@pytest.mark.parametrize(
    ("given", "says"),
    [
        (None, "GarbageDemoEnv.demonstrations returned NoneType; return a list of transcripts"),
        (["hello"], "transcript 0 needs a 'messages' list of \\{role, content\\} dicts, not str"),
        ([{"messages": TRANSCRIPT}], "transcript 0 needs a 'messages' list .* not dict"),
        ([TRANSCRIPT[:2]], "transcript 0 has no assistant message"),
        ([], "gave no transcripts for 12 tasks"),
        ("raise", "demonstrations raised KeyError: 'no solver for this task' \\(at .*test_sft.py:\\d+ in demonstrations"),
    ],
)  # fmt: skip
def test_demonstrations_that_are_not_transcripts_stop_with_one_message(monkeypatch, given, says):
    from forge.config import ConfigError, load_config
    from forge.sft import env_demonstrations

    monkeypatch.setattr(GarbageDemoEnv, "given", given)
    monkeypatch.setattr("forge.env.registry.resolve_env", lambda name: GarbageDemoEnv)
    monkeypatch.setattr("forge.run.tasks.load_task_rows", lambda cfg: [{"secret": i % 4} for i in range(12)])
    with pytest.raises(ConfigError, match=says):
        env_demonstrations(load_config("configs/smoke.yaml", []))


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["env.name=guess_numbr"], "env.name: env 'guess_numbr' is not registered"),
        (["--data", "no/such.jsonl"], "sft.data no/such.jsonl: cannot read it"),
        (["--epochs", "0"], "--epochs and --batch-size of at least 1"),
        (["--batch-size", "0"], "--epochs and --batch-size of at least 1"),
        (["model.dtype=float16"], "model.dtype=float16 trains float16 weights"),
    ],
)
def test_forge_sft_refuses_bad_input_with_exit_2_and_no_traceback(tmp_path, capsys, args, says):
    import re

    from forge.cli import main

    assert main(["sft", "configs/smoke.yaml", "--output-dir", str(tmp_path / "sft"), *args]) == 2
    err = capsys.readouterr().err
    assert re.search(says, err) and "Traceback" not in err
    assert not (tmp_path / "sft" / "metrics.jsonl").exists()


def test_each_sft_step_records_its_own_wall_time_and_shows_its_loss(tmp_path, capsys):
    from forge import sft as sft_module
    from forge.config import load_config

    data = tmp_path / "demos.jsonl"
    data.write_text("".join(json.dumps({"messages": TRANSCRIPT}) + "\n" for _ in range(4)))
    cfg = load_config("configs/smoke.yaml", ["logging.tensorboard=false"])
    sft_module.sft(cfg, str(data), tmp_path / "sft", epochs=1, batch_size=2)
    rows = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(0 < r["step_seconds"] <= r["wall_seconds"] for r in rows)
    # No behaviour policy sampled a transcript: nothing is compared with one.
    assert not {"mismatch_kl", "importance_ratio_mean"} & {key for row in rows for key in row}
    progress = capsys.readouterr().err.split("\r")[-1]  # the console's last progress line
    assert "sft: 100%" in progress and "2/2" in progress and f"loss={rows[-1]['loss']:.3f}" in progress


def test_an_earlier_sft_run_is_refused_with_the_flags_forge_sft_has_then_replaced(tmp_path, capsys):
    from forge.cli import main

    data = tmp_path / "demos.jsonl"
    data.write_text(json.dumps({"messages": TRANSCRIPT}) + "\n")
    args = ["sft", "configs/smoke.yaml", "logging.tensorboard=false", "--data", str(data)]
    args += ["--output-dir", str(tmp_path / "sft")]
    assert main(args) == 0
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "already holds a run" in error and "--overwrite" in error and "--resume" not in error
    assert main([*args, "--overwrite"]) == 0
    assert len((tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()) == 1


def test_a_transcript_the_chat_template_refuses_stops_with_its_words_and_no_traceback(
    tiny_checkpoint, tmp_path, capsys
):
    import shutil

    from test_chat_templates import ALTERNATES

    from forge.cli import main
    from forge.models.loading import load_tokenizer

    folder = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, folder)
    tokenizer = load_tokenizer(folder)
    tokenizer.chat_template = ALTERNATES  # Mistral's first instruct models: user and assistant only
    tokenizer.save_pretrained(folder)
    # Two user messages in a row (a tool result is a user message to a template without tool calls).
    twice_user = [TRANSCRIPT[1], TRANSCRIPT[3], TRANSCRIPT[4]]
    data = tmp_path / "demos.jsonl"
    data.write_text(json.dumps({"messages": twice_user}) + "\n")
    args = [
        "sft",
        "configs/smoke.yaml",
        f"model.path={folder}",
        "logging.tensorboard=false",
        "--data",
        str(data),
    ]
    assert main([*args, "--output-dir", str(tmp_path / "sft")]) == 2
    err = capsys.readouterr().err
    assert "Conversation roles must alternate" in err and "transcript 0" in err and "Traceback" not in err


TOOL_TRANSCRIPT = [  # OpenAI's chat format: arguments as JSON text, results in tool messages
    {"role": "user", "content": "How many fig and pear in total?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c0", "type": "function", "function": {"name": "count", "arguments": '{"item": "fig"}'}},
        {"id": "c1", "type": "function", "function": {"name": "count", "arguments": '{"item": "pear"}'}},
    ]},
    {"role": "tool", "tool_call_id": "c0", "content": "3"},
    {"role": "tool", "tool_call_id": "c1", "content": "2"},
    {"role": "assistant", "content": "<answer>5</answer>"},
]  # fmt: skip


def trained_text(tokenizer, sample) -> list[str]:
    """The decoded runs of loss-masked tokens: one per assistant turn."""
    runs, current = [], []
    for token, mask in zip(sample.token_ids, sample.loss_mask, strict=True):
        if mask:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current, skip_special_tokens=True))
            current = []
    return runs + ([tokenizer.decode(current, skip_special_tokens=True)] if current else [])


def test_tool_calls_a_template_drops_are_learned_as_the_text_a_tool_env_parses():
    """The tiny model's template writes a message's content only: a call would be an empty
    turn. It becomes the Hermes text a ToolEnv reads, its results the user turn a rollout shows."""
    from forge.env.tools import ToolCall, ToolEnv, parse_tool_calls
    from forge.rollout.chat import ChatFormat

    tokenizer = build_tokenizer()
    sample = transcript_sample(tokenizer, TOOL_TRANSCRIPT)
    call_turn, answer_turn = trained_text(tokenizer, sample)
    assert parse_tool_calls(call_turn) == (
        [ToolCall("count", {"item": "fig"}), ToolCall("count", {"item": "pear"})],
        [],
    )
    assert answer_turn.strip() == "<answer>5</answer>"
    observation = ToolEnv.format_responses(ToolEnv.__new__(ToolEnv), ["3", "2"])
    shown = ChatFormat(tokenizer).observation_ids(observation)
    untrained = [t for t, m in zip(sample.token_ids, sample.loss_mask, strict=True) if not m]
    assert any(untrained[i : i + len(shown)] == shown for i in range(len(untrained))), (
        "results not shown as a rollout"
    )


def test_tool_call_arguments_given_as_json_text_render_as_an_object_in_a_hermes_template(tmp_path):
    from family_tokenizers import byte_level_tokenizer

    from forge.env.tools import ToolCall, parse_tool_calls

    tokenizer = byte_level_tokenizer("qwen", tmp_path)
    sample = transcript_sample(tokenizer, TOOL_TRANSCRIPT)
    call_turn = trained_text(tokenizer, sample)[0]
    assert '"arguments": {"item": "fig"}' in call_turn  # not the text '"{\"item\": \"fig\"}"'
    assert parse_tool_calls(call_turn)[0] == [
        ToolCall("count", {"item": "fig"}),
        ToolCall("count", {"item": "pear"}),
    ]


def test_a_transcript_whose_tool_call_arguments_are_not_json_is_refused_naming_its_line(tmp_path):
    from forge.config import ConfigError
    from forge.sft import read_transcripts

    broken = json.loads(json.dumps(TOOL_TRANSCRIPT))
    broken[1]["tool_calls"][1]["function"]["arguments"] = '{"item": pear}'
    data = tmp_path / "data.jsonl"
    data.write_text(
        json.dumps({"messages": TOOL_TRANSCRIPT}) + "\n" + json.dumps({"messages": broken}) + "\n"
    )
    with pytest.raises(
        ConfigError, match=r"line 2 message 1 \(assistant\) has a tool call 'count' has arguments"
    ):
        read_transcripts(data)


COUNT_TOOL = {
    "type": "function",
    "function": {
        "name": "count",
        "description": "Stock count of one item.",
        "parameters": {"type": "object", "properties": {"item": {"type": "string"}}, "required": ["item"]},
    },
}


@pytest.mark.parametrize("family", ["tiny", "qwen"], ids=["template drops tools", "template renders tools"])
def test_a_rows_tools_are_shown_as_a_rollout_shows_an_envs(tmp_path, family):
    """OpenAI's fine-tuning rows list the tools beside the messages: the transcript's prompt
    is then the first prompt a rollout of a ToolEnv with that system prompt and tools renders."""
    from family_tokenizers import byte_level_tokenizer

    from forge.rollout.chat import ChatFormat
    from forge.sft import read_transcripts

    tokenizer = build_tokenizer() if family == "tiny" else byte_level_tokenizer("qwen", tmp_path)
    system = {"role": "system", "content": "Count the stock."}
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"messages": [system, *TOOL_TRANSCRIPT], "tools": [COUNT_TOOL]}) + "\n")
    [(messages, tools)] = read_transcripts(data)
    sample = transcript_sample(tokenizer, messages, tools=tools)
    prompt = ChatFormat(tokenizer).prompt_ids(TOOL_TRANSCRIPT[0]["content"], system["content"], [COUNT_TOOL])
    assert sample.token_ids[: len(prompt)] == prompt
    assert sample.loss_mask[: len(prompt)] == [0] * len(prompt) and sample.loss_mask[len(prompt)] == 1


def test_a_row_whose_tools_are_not_function_schemas_is_refused_naming_its_line(tmp_path):
    from forge.config import ConfigError
    from forge.sft import read_transcripts

    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"messages": TOOL_TRANSCRIPT, "tools": ["count"]}) + "\n")
    with pytest.raises(ConfigError, match="line 1 has a tool that is not"):
        read_transcripts(data)
