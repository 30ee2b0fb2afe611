"""README stays true: its example env is the tested file, its configs exist."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def test_first_lines_install_and_run_the_smoke_training():
    head = "\n".join(README.splitlines()[:10])
    assert "forge train configs/smoke.yaml" in head
    assert 'python -m pytest -q -m "slow or not slow"' in head


def test_ci_runs_the_readme_test_command():
    assert 'python -m pytest -q -m "slow or not slow"' in (REPO / ".ci" / "run").read_text()


def test_custom_env_example_in_readme_is_the_tested_file():
    example = (REPO / "examples" / "custom_env.py").read_text().rstrip()
    assert f"```python\n{example}\n```" in README


def test_every_config_named_in_readme_exists():
    for name in set(re.findall(r"configs/[\w.-]+\.yaml", README)):
        assert (REPO / name).is_file(), name


def test_every_example_file_named_in_readme_exists():
    names = set(re.findall(r"examples/[\w./-]+\.(?:py|yaml|toml)", README))
    assert "examples/reach/reach.yaml" in names
    for name in names:
        assert (REPO / name).is_file(), name
