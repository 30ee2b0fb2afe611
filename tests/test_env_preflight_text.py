"""`forge train` (and --dry-run) refuse an env whose system prompt or tools are not what
every episode renders through the chat template, before anything starts."""

from __future__ import annotations

import re

import pytest

from forge.env.base import Env, StepResult


class NumberPromptEnv(Env):
    system_prompt = 42  # a user's slip: not text

    @classmethod
    def generate_tasks(cls, num_tasks, seed, **kwargs):
        return [{"task_id": str(i)} for i in range(num_tasks)]

    def reset(self, task, seed):
        return "add 2 and 3"

    def step(self, action):
        return StepResult("done", done=True)


class ToolNamesEnv(NumberPromptEnv):
    system_prompt = "Use the calculator."
    tools = ["calculator"]  # names, not schemas


class BareSchemaEnv(NumberPromptEnv):
    system_prompt = "Use the calculator."
    # Without the {"type": "function", "function": ...} wrapper: every tool call errored its episode.
    tools = [{"name": "add", "description": "Add.", "parameters": {"type": "object", "properties": {}}}]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ("NumberPromptEnv", r"NumberPromptEnv.system_prompt is int, expected str or None"),
        ("ToolNamesEnv", r"ToolNamesEnv.tools is list, expected a list of OpenAI-style function schemas"),
        (
            "BareSchemaEnv",
            r"BareSchemaEnv.tools\[0\] is not an OpenAI function schema \(it has 'name', "
            r"'description', 'parameters': put them under 'function'\)",
        ),
    ],
)
def test_a_system_prompt_or_tools_of_the_wrong_type_stop_the_dry_run(capsys, env, message):
    from forge.cli import main

    assert (
        main(["train", "configs/smoke.yaml", f"env.name={__name__}:{env}", "env.kwargs={}", "--dry-run"]) == 2
    )
    error = capsys.readouterr().err
    assert re.search(message, error.splitlines()[-1]) and "Traceback" not in error
