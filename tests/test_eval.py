"""`forge eval` plays N episodes per task with a saved model and prints one JSON object."""

import json

import pytest

from forge.cli import main
from forge.env.base import Env


def test_eval_prints_one_json_object_with_per_task_numbers(tiny_checkpoint, tmp_path, capsys):
    config = tmp_path / "eval.yaml"
    config.write_text(
        "env: {name: guess_number, kwargs: {n: 4}}\nrollout: {max_turns: 3, max_new_tokens: 1}\n"
    )
    code = main(
        [
            "eval",
            str(config),
            "--checkpoint",
            str(tiny_checkpoint),
            "--episodes",
            "3",
            "--tasks",
            "2",
            "--no-progress",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tasks"] == 2 and result["episodes"] == 6
    assert len(result["per_task"]) == 2
    for summary in result["per_task"].values():
        assert summary["episodes"] == 3
        assert 0.0 <= summary["success_rate"] <= 1.0
        assert 1.0 <= summary["turns_mean"] <= 3.0
        assert summary["generated_tokens_mean"] >= 1.0
        assert summary["wall_seconds"] > 0


def test_eval_of_a_folder_that_is_not_a_model_names_the_fix(tmp_path):
    from forge.config import Config
    from forge.eval import evaluate

    with pytest.raises(FileNotFoundError, match="final/"):
        evaluate(Config(), tmp_path, episodes=1, num_tasks=1)


@pytest.mark.parametrize("given", ["run", "checkpoints", "step", "latest"])
def test_eval_of_a_path_into_a_run_without_a_final_model_says_how_to_get_one(tmp_path, capsys, given):
    """A run stopped early (no learning signal, too many errors) has checkpoints and no final/:
    a checkpoint is trainer state, and the message says so and what to run, not 'no config.json'."""
    run = tmp_path / "run"
    step = run / "checkpoints" / "step-000004"
    step.mkdir(parents=True)
    (step / "trainer.pt").write_bytes(b"")
    (step / "run_state.pkl").write_bytes(b"")
    (run / "checkpoints" / "latest").write_text("step-000004\n")
    (run / "metrics.jsonl").write_text("")
    path = {
        "run": run,
        "checkpoints": run / "checkpoints",
        "step": step,
        "latest": run / "checkpoints" / "latest",
    }
    assert main(["eval", "smoke", "--checkpoint", str(path[given]), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"of the run {run}" in err and f"forge train {run / 'config.yaml'} --resume {run}" in err
    # ...or how to get that checkpoint's model now: forge export (tests/test_export.py)
    assert f"`forge export {run}{' --step 4' if given == 'step' else ''}`" in err


def test_eval_of_a_run_folder_names_its_final_model(tiny_checkpoint, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(tiny_checkpoint, run / "final")
    assert main(["eval", "smoke", "--checkpoint", str(run), "--no-progress"]) == 2
    assert f"whose trained model is {run / 'final'}: pass that" in capsys.readouterr().err


@pytest.mark.parametrize("counts", [["--tasks", "0"], ["--episodes", "-1"]])
def test_eval_of_no_episodes_is_refused_naming_the_flags(tmp_path, capsys, counts):
    # It played nothing, and its verdict blamed a dead engine: "every one of the 0 episodes was lost".
    assert main(["eval", "smoke", "--checkpoint", str(tmp_path), *counts, "--no-progress"]) == 2
    assert "forge eval needs --episodes and --tasks of at least 1" in capsys.readouterr().err


class RaisingEnv(Env):
    """Every step raises: an eval of it measures the env's bug, not the model."""

    system_prompt = "Guess."

    @classmethod
    def generate_tasks(cls, num_tasks, seed, **kwargs):
        return [{"task_id": str(i)} for i in range(num_tasks)]

    def reset(self, task, seed):
        print("debugging my env")  # which must not spoil the JSON on stdout
        return "guess a number"

    def step(self, action):
        return {}["answer"]  # the user's bug: KeyError


def test_eval_of_an_env_that_errors_says_so_and_exits_1(tiny_checkpoint, tmp_path, capsys):
    config = tmp_path / "eval.yaml"
    config.write_text(
        f"env: {{name: '{__name__}:RaisingEnv'}}\nrollout: {{max_turns: 2, max_new_tokens: 1}}\n"
    )
    code = main(["eval", str(config), "--checkpoint", str(tiny_checkpoint), "--episodes", "2", "--tasks", "2",
                 "--no-progress"])  # fmt: skip
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert code == 1 and result["episodes"] == 4 and result["episodes_error"] == 4
    assert result["per_task"]["0"]["episodes_error"] == 2
    assert err.count("KeyError: 'answer'") == 1 and "test_eval.py:" in err  # once, at the user's line
    assert "4 of 4 episodes errored" in err and "env.max_error_fraction=0.5" in err
    assert "debugging my env" in err


def test_eval_of_a_misspelt_env_is_one_message_before_the_model_loads(tiny_checkpoint, capsys):
    code = main(["eval", "configs/smoke.yaml", "env.name=guess_numbr", "--checkpoint", str(tiny_checkpoint),
                 "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "env 'guess_numbr' is not registered" in err and "Traceback" not in err


def _word_level_checkpoint(tiny_checkpoint, folder):
    """The tiny checkpoint's config with a word-level tokenizer that knows none of ReverseEnv's
    words (and no weights: a check that let it through would fail loading them instead)."""
    import shutil

    from family_tokenizers import word_level_tokenizer

    tokenizer = word_level_tokenizer()
    folder.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", folder / "config.json")
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("checkpoint", "overrides", "said"),
    [
        ("word-level", [], "unknown tokens: the model cannot see 'Reply', 'with'"),
        ("tiny", ["rollout.max_context_tokens=24"], "over rollout.max_context_tokens=24"),
    ],
    ids=["unknown tokens", "no room for a reply"],
)
def test_eval_checks_the_first_prompt_as_a_dry_run_does(
    tiny_checkpoint, tmp_path, capsys, checkpoint, overrides, said
):
    folder = (
        tiny_checkpoint
        if checkpoint == "tiny"
        else _word_level_checkpoint(tiny_checkpoint, tmp_path / "words")
    )
    code = main(["eval", "configs/smoke.yaml", "env.name=examples.custom_env:ReverseEnv", "env.kwargs={}", *overrides,
                 "--checkpoint", str(folder), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "first prompt" in err and said in err and "Traceback" not in err
    if checkpoint != "tiny":  # the hint's command checks the env with this very tokenizer
        assert f"`forge env check examples.custom_env:ReverseEnv --model {folder}`" in err
