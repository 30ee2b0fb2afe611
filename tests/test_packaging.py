"""The distributions `python -m build` makes: the sdist, and from it the wheel, which carries
forge, forge_envs and configs/ (as forge/configs), no top-level `envs`, and full metadata.
(.ci/run installs that wheel into a fresh virtualenv and trains with it.)"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from forge import __version__

REPO = Path(__file__).resolve().parent.parent
DIST_INFO = f"forge_rl-{__version__}.dist-info"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [wheel] = out.glob("*.whl")
    [sdist] = out.glob("*.tar.gz")
    return wheel, sdist


def test_the_wheel_holds_forge_and_forge_envs_and_no_envs_package(dists):
    names = zipfile.ZipFile(dists[0]).namelist()
    assert {name.split("/")[0] for name in names} == {"forge", "forge_envs", DIST_INFO}
    for module in ("forge/cli.py", "forge/openai_agent.py", "forge_envs/guess_number.py"):
        assert module in names


def test_the_wheel_carries_every_config_of_the_repository_unchanged(dists):
    wheel = zipfile.ZipFile(dists[0])
    packed = {Path(name).name for name in wheel.namelist() if name.startswith("forge/configs/")}
    assert packed == {path.name for path in (REPO / "configs").glob("*.yaml")}
    for name in packed:
        assert wheel.read(f"forge/configs/{name}") == (REPO / "configs" / name).read_bytes()


def test_the_wheel_metadata_is_complete(dists):
    wheel = zipfile.ZipFile(dists[0])
    metadata = Parser().parsestr(wheel.read(f"{DIST_INFO}/METADATA").decode())
    assert metadata["Version"] == __version__
    assert metadata["Requires-Python"] == ">=3.11"
    assert metadata["License-Expression"] == "Apache-2.0"
    assert "Programming Language :: Python :: 3.11" in metadata.get_all("Classifier")
    assert wheel.read(f"{DIST_INFO}/licenses/LICENSE") == (REPO / "LICENSE").read_bytes()
    entry_points = wheel.read(f"{DIST_INFO}/entry_points.txt").decode()
    assert "forge = forge.cli:main" in entry_points
    assert "guess_number = forge_envs.guess_number:GuessNumberEnv" in entry_points
    assert "envs." not in entry_points.replace("forge_envs.", "")


def test_the_sdist_holds_the_configs_folder_and_the_license(dists):
    root = f"forge_rl-{__version__}"
    names = set(tarfile.open(dists[1]).getnames())
    for path in ("LICENSE", "setup.py", "pyproject.toml", "configs/smoke.yaml", "forge_envs/countdown.py"):
        assert f"{root}/{path}" in names


def test_the_readme_installs_the_wheel_of_this_version():
    assert f"dist/forge_rl-{__version__}-py3-none-any.whl" in (REPO / "README.md").read_text()
