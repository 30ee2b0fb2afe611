"""The built-in envs import as `forge_envs`: an unrelated package named `envs` (a common name
in RL code bases) earlier on the path changes nothing, by name or by `module:Class`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ENTRY_POINTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["forge.envs"]

# Runs with the unrelated `envs` first on sys.path and already imported, as a user's own code
# base would have it; prints where every built-in env resolved from.
PROBE = """
import json, sys
import envs
from forge.env.registry import registered_envs, resolve_env
targets = json.loads(sys.argv[1])
print(json.dumps({
    "imported_envs": envs.__file__,
    "by_target": {name: resolve_env(target).__module__ for name, target in targets.items()},
    "by_name": {name: resolve_env(name).__module__ for name in targets if name in registered_envs()},
    "registered": registered_envs(),
}))
"""


def _unrelated_envs_package(root: Path) -> Path:
    package = root / "envs"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("WHO = 'someone else'\n")
    for target in ENTRY_POINTS.values():
        module = target.split(":")[0].split(".")[-1]
        (package / f"{module}.py").write_text(
            "raise ImportError('the unrelated envs package was imported')\n"
        )
    return root


def test_every_builtin_entry_point_targets_forge_envs():
    assert set(ENTRY_POINTS) == {
        "guess_number",
        "countdown",
        "python_coding",
        "file_search",
        "parallel_lookup",
        "guess_rounds",
    }
    assert all(target.startswith("forge_envs.") for target in ENTRY_POINTS.values())
    assert not (REPO / "envs").exists()


def test_an_unrelated_envs_package_first_on_the_path_changes_nothing(tmp_path):
    other = _unrelated_envs_package(tmp_path / "other")
    path = os.pathsep.join([str(other), str(REPO), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(ENTRY_POINTS)],
        cwd=other,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": path},
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["imported_envs"] == str(other / "envs" / "__init__.py")  # the other package is there
    expected = {name: target.split(":")[0] for name, target in ENTRY_POINTS.items()}
    assert found["by_target"] == expected
    stale = sorted(set(ENTRY_POINTS) - set(found["registered"]))
    if stale:  # an install made before an env was added; CI installs afresh
        pytest.skip(
            f"the installed forge_rl metadata lacks {stale}: reinstall (pip install -e .) to check by name"
        )
    # By name through the installed entry points: this checks the installed metadata too
    # (an install made before the rename still says envs.*; reinstall to refresh it).
    assert found["by_name"] == expected
    assert {name: found["registered"][name] for name in ENTRY_POINTS} == ENTRY_POINTS
