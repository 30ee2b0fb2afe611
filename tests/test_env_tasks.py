"""Tasks are rows of a datasets.Dataset: generated from a seed or read from a file or dataset."""

from __future__ import annotations

import datasets
import pytest

from forge.env import load_tasks
from forge.env.tasks import tasks_from
from forge_envs.guess_number import GuessNumberEnv

ROWS = [{"secret": 3, "n": 8}, {"secret": 5, "n": 8}]


def test_generated_tasks_are_a_dataset_reproducible_from_the_seed():
    first = load_tasks(GuessNumberEnv, None, num_tasks=20, seed=1)
    assert isinstance(first, datasets.Dataset) and len(first) == 20
    assert list(first) == list(load_tasks(GuessNumberEnv, None, num_tasks=20, seed=1))
    assert list(first) != list(load_tasks(GuessNumberEnv, None, num_tasks=20, seed=2))


def test_env_kwargs_reach_task_generation():
    tasks = load_tasks(GuessNumberEnv, None, num_tasks=50, seed=0, n=4)
    assert {row["n"] for row in tasks} == {4} and max(row["secret"] for row in tasks) < 4


class InstanceGenerator(GuessNumberEnv):
    def generate_tasks(self, num_tasks, seed):  # a newcomer's mistake: no @classmethod
        return [{"secret": 1}] * num_tasks


class OneDict(GuessNumberEnv):
    @classmethod
    def generate_tasks(cls, num_tasks, seed):
        return {"secret": 1}


class Strings(GuessNumberEnv):
    @staticmethod
    def generate_tasks(num_tasks, seed):
        return (f"secret {i}" for i in range(num_tasks))


@pytest.mark.parametrize(
    ("env_class", "message"),
    [
        (
            InstanceGenerator,
            r"InstanceGenerator.generate_tasks must be a @classmethod: Forge calls .* on the class, before any env",
        ),
        (OneDict, r"OneDict.generate_tasks returned a dict; return a list of tasks, each a dict"),
        (
            Strings,
            r"Strings.generate_tasks returned a str \('secret 0'\) among its tasks; each task is a dict",
        ),
    ],
)
def test_a_generator_of_the_wrong_shape_says_what_shape_it_must_have(env_class, message):
    # Before, Python's and datasets' own words: "missing 1 required positional argument: 'seed'",
    # "'str' object is not a mapping".
    with pytest.raises(TypeError, match=message):
        load_tasks(env_class, None, num_tasks=3, seed=0)


@pytest.mark.parametrize("extension", ["jsonl", "parquet", "csv"])
def test_a_local_file_is_read_and_given_task_ids(tmp_path, extension):
    path = tmp_path / f"tasks.{extension}"
    data = datasets.Dataset.from_list(ROWS)
    {"jsonl": data.to_json, "parquet": data.to_parquet, "csv": data.to_csv}[extension](str(path))
    tasks = load_tasks(GuessNumberEnv, str(path), num_tasks=1, seed=0)
    assert [row["secret"] for row in tasks] == [3, 5] and tasks["task_id"] == ["0", "1"]


def test_an_arrow_dataset_folder_and_its_arrow_file_are_read(tmp_path):
    datasets.Dataset.from_list([{"task_id": "a", **ROWS[0]}]).save_to_disk(str(tmp_path / "saved"))
    assert tasks_from(str(tmp_path / "saved"))["task_id"] == ["a"]
    arrow_file = next((tmp_path / "saved").glob("*.arrow"))
    assert tasks_from(str(arrow_file))["task_id"] == ["a"]


def test_a_missing_file_names_the_path():
    with pytest.raises(ValueError, match="no such file"):
        tasks_from("./nowhere/tasks.jsonl")


def test_an_unknown_file_type_lists_the_known_ones(tmp_path):
    path = tmp_path / "tasks.txt"
    path.write_text("hello")
    with pytest.raises(ValueError, match=r"unknown file type '\.txt'.*jsonl"):
        tasks_from(str(path))


def test_an_empty_task_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    datasets.Dataset.from_list(ROWS).select([]).to_json(str(path))
    with pytest.raises(ValueError, match="holds no rows"):
        tasks_from(str(path))


def test_a_dataset_name_goes_to_load_dataset_with_the_train_split(monkeypatch):
    asked = {}

    def fake_load_dataset(name, split):
        asked.update(name=name, split=split)
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    tasks = tasks_from("someorg/some-tasks")
    assert asked == {"name": "someorg/some-tasks", "split": "train"} and len(tasks) == 2


def test_an_unloadable_dataset_name_is_one_clear_error(monkeypatch):
    def offline(name, split):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match="neither a local file nor a loadable dataset"):
        tasks_from("someorg/missing")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"task_id": "a"}\n{"task_id": "b"\n', "line 2 is not JSON (Expecting ',' delimiter, column 16)"),
        ('{"task_id": "a"}\n\n["b"]\n', "line 3 is a JSON list; each line must be one task, an object"),
        (b'{"task_id": "\xff"}\n', "it is not UTF-8 text"),
    ],
)
def test_a_malformed_jsonl_task_file_names_its_line(tmp_path, text, problem):
    path = tmp_path / "tasks.jsonl"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError) as raised:
        tasks_from(str(path))
    assert str(raised.value) == f"env.tasks={str(path)!r}: {problem}"


def test_a_csv_datasets_cannot_read_says_pyarrows_reason_not_datasets_generic_one(tmp_path):
    path = tmp_path / "tasks.csv"
    path.write_text("task_id,x\na,1\nb,2,3,4\n")
    with pytest.raises(ValueError, match="could not be read as csv") as raised:
        tasks_from(str(path))
    assert "DatasetGenerationError" not in str(raised.value)


class YieldsNothing(GuessNumberEnv):
    @classmethod
    def generate_tasks(cls, num_tasks, seed):
        yield from ()


def test_a_generate_tasks_that_yields_no_tasks_says_so():
    # Before, a generator object passed the emptiness check and the first task's lookup raised
    # datasets' IndexError, a traceback from the dry run.
    with pytest.raises(ValueError, match="YieldsNothing.generate_tasks returned no tasks"):
        load_tasks(YieldsNothing, None, num_tasks=3, seed=0)
