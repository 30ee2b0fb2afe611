"""`forge env check NAME --config CFG` checks the env a run of that config would build: with
its env.kwargs, and its text with the tokenizer of the model that config trains."""

from __future__ import annotations

import random

import yaml

from forge.cli import main
from forge.env import Env, StepResult
from forge.env.check import add_check_arguments
from forge.env.check_process import check_from_arguments


class Target(Env):
    """Needs its target from env.kwargs, as a user's env with a required argument would."""

    system_prompt = "Reach the target with +1 moves."

    def __init__(self, target: int):
        self.target = target

    @classmethod
    def generate_tasks(cls, num_tasks, seed, **kwargs):
        rng = random.Random(seed)
        return [{"task_id": str(i), "start": rng.randrange(3)} for i in range(num_tasks)]

    def reset(self, task, seed):
        self.at = task["start"]
        return f"at {self.at}, target {self.target}"

    def step(self, action):
        self.at += action.strip() == "+1"
        done = self.at >= self.target
        return StepResult(f"at {self.at}", float(done), done)


def _config(tmp_path, **model) -> str:
    path = tmp_path / "run.yaml"
    cfg = {"env": {"name": f"{__name__}:Target", "kwargs": {"target": 3}}, "model": model}
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _arguments(*argv: str):
    import argparse

    parser = argparse.ArgumentParser()
    add_check_arguments(parser)
    return parser.parse_args(list(argv))


def test_the_env_is_built_with_the_configs_kwargs(tmp_path, capsys):
    assert main(["env", "check", f"{__name__}:Target", "--config", _config(tmp_path)]) == 0
    assert "construct        Target(**{'target': 3})" in capsys.readouterr().out


def test_kwargs_on_the_command_line_win_over_the_configs(tmp_path):
    report = check_from_arguments(_arguments(f"{__name__}:Target", "--config", _config(tmp_path),
                                             "--kwargs", '{"target": 5}'))  # fmt: skip
    assert report.checks[0].detail == "Target(**{'target': 5})"


def test_tokens_are_checked_with_the_tokenizer_the_configs_run_trains(tmp_path):
    from forge.config import load_config
    from forge.models.loading import load_tokenizer
    from forge.models.tiny import save_tiny_checkpoint

    path = _config(tmp_path, tiny={"extra_words": ["+1"]})
    run_tokenizer = load_tokenizer(save_tiny_checkpoint(load_config(path).model.tiny, tmp_path / "tiny"))
    report = check_from_arguments(
        _arguments(f"{__name__}:Target", "--config", path, "--kwargs", '{"target": 3}')
    )
    tokens = next(c for c in report.checks if c.name == "tokens")
    assert tokens.detail.startswith("for the built-in tiny model with model.tiny.extra_words ['+1']: prompt ")
    # The run's model reads ' +1' as one token; so must the check's report of it.
    prompt_tokens = len(run_tokenizer.apply_chat_template(
        [{"role": "system", "content": Target.system_prompt}, {"role": "user", "content": "at 0, target 3"}],
        add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])  # fmt: skip
    assert len(run_tokenizer(" +1", add_special_tokens=False)["input_ids"]) == 1
    assert f"prompt {prompt_tokens} tokens" in tokens.detail, (prompt_tokens, tokens.detail)
