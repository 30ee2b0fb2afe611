"""`forge eval` plays N episodes per task with a saved model and prints one JSON object."""

import json

import pytest

from forge.cli import main


def test_eval_prints_one_json_object_with_per_task_numbers(tiny_checkpoint, tmp_path, capsys):
    config = tmp_path / "eval.yaml"
    config.write_text("env: {name: guess_number, kwargs: {n: 4}}\nrollout: {max_turns: 3, max_new_tokens: 1}\n")
    code = main(["eval", str(config), "--checkpoint", str(tiny_checkpoint), "--episodes", "3", "--tasks", "2",
                 "--no-progress"])
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
