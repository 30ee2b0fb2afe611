"""An env named the ways people get it wrong is refused with the name they meant."""

from __future__ import annotations

import pytest

from forge.env.registry import resolve_env


def test_a_near_miss_of_a_registered_name_is_suggested():
    with pytest.raises(
        ValueError, match=r"is not registered \(known: .*\); did you mean 'guess_number'\? Otherwise"
    ):
        resolve_env("Guess_Numbr")


def test_a_name_like_nothing_registered_gets_no_guess():
    with pytest.raises(ValueError, match="not registered") as raised:
        resolve_env("zzzz")
    assert "did you mean" not in str(raised.value)


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("my_envs/add.py:AddEnv", "'my_envs/add.py' is a file path; name the module as Python imports it: my_envs.add:AddEnv"),
        ("/srv/envs/add.py:AddEnv", "imports it: add:AddEnv, run from /srv/envs \\(or with it on PYTHONPATH\\)"),
    ],
)  # fmt: skip
def test_a_file_path_in_place_of_a_module_says_how_to_name_it(name, says):
    with pytest.raises(ValueError, match=says):
        resolve_env(name)


def test_a_module_not_found_says_where_it_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a config run from another folder than the one holding its env
    with pytest.raises(ValueError, match="it is looked for in the working directory .* and on PYTHONPATH"):
        resolve_env("no_such_env_pkg.single:EchoEnv")


def test_a_module_that_fails_its_own_import_is_not_said_to_be_missing(tmp_path, monkeypatch):
    (tmp_path / "broken_env_mod.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="No module named 'no_such_dependency_xyz'") as raised:
        resolve_env("broken_env_mod:Env")
    assert "looked for in the working directory" not in str(raised.value)
