"""File search: a generated tree with decoys, explored by ls/cat/grep run in the sandbox."""

from __future__ import annotations

import json

import pytest

from forge.env.calls import call_sync
from forge_envs.file_search import FileSearchEnv


def tool(name: str, **arguments) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


@pytest.fixture
def episode():
    task = FileSearchEnv.generate_tasks(1, seed=3)[0]
    env = FileSearchEnv()
    env.reset(task, seed=0)
    return env, task


def live_config(task: dict) -> str:
    files = json.loads(task["files"])
    service = task["question"].split("`")[3]
    return next(p for p in files if p.endswith(f"/{service}/config.ini"))


def test_the_answer_is_in_the_live_config_and_the_backup_holds_a_decoy():
    for task in FileSearchEnv.generate_tasks(30, seed=1):
        files = json.loads(task["files"])
        key = task["question"].split("`")[1]
        path = live_config(task)
        assert f"{key} = {task['answer']}\n" in files[path]
        assert (
            f"{key} = {task['answer']}\n" not in files[path + ".bak"] and f"{key} = " in files[path + ".bak"]
        )


def test_ls_grep_and_cat_run_over_the_tree(episode):
    env, task = episode
    path = live_config(task)
    listing = call_sync(env.step, tool("ls", path="repo"))
    assert "docs/" in listing.observation
    key = task["question"].split("`")[1]
    found = call_sync(env.step, tool("grep", pattern=f"^{key} =", path="repo"))
    assert f"{path}:" in found.observation and f"{path}.bak:" in found.observation
    shown = call_sync(env.step, tool("cat", path=path))
    assert json.loads(task["files"])[path] in shown.observation
    assert shown.info["tool_calls"] == 3 and shown.info["tool_seconds"] > 0 and shown.info["turns"] == 3


def test_the_exact_value_wins(episode):
    env, task = episode
    result = call_sync(env.step, f"It is <answer>{task['answer']}</answer>")
    assert result.done and result.reward == 1.0 and result.info["outcome"] == "success"


def test_the_stale_backup_value_loses(episode):
    env, task = episode
    stale = json.loads(task["files"])[live_config(task) + ".bak"].split(" = ")[-1].strip()
    result = call_sync(env.step, f"<answer>{stale}</answer>")
    assert result.done and result.reward == 0.0 and result.info["outcome"] == "failure"


def test_tool_arguments_cannot_inject_shell_commands(episode):
    env, _ = episode
    result = call_sync(
        env.step, tool("cat", path="x; echo INJECTED") + tool("grep", pattern="$(echo hi)", path=".")
    )
    lines = [line.strip() for line in result.observation.splitlines()]
    assert "INJECTED" not in lines and "hi" not in lines
    assert "cat: 'x; echo INJECTED': No such file or directory" in lines


def test_files_outside_the_tree_are_not_served(episode):
    env, _ = episode
    result = call_sync(env.step, tool("cat", path="/etc/shadow"))
    assert "root:" not in result.observation
