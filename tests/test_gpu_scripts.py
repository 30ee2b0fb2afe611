"""The prepared GPU scripts (bench/gpu_*.sh) run only when a session is lent a device, so their
shell is checked here: they parse, and `cap` fits each part's timeouts into gpu_all.sh's shares."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "bench").glob("gpu_*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_gpu_script_parses(script: Path) -> None:
    subprocess.run(["bash", "-n", str(script)], check=True)


def cap(want: int, deadline: int | None) -> int:
    env_line = f"FORGE_GPU_DEADLINE={deadline} " if deadline is not None else "unset FORGE_GPU_DEADLINE; "
    # only the function: sourcing the whole file would install the carried wheels
    command = f"eval \"$(sed -n '/^cap()/,/^}}/p' bench/gpu_env.sh)\" && {env_line}cap {want}"
    done = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


def test_cap_keeps_a_timeout_inside_the_deadline() -> None:
    now = int(time.time())
    assert cap(330, None) == 330  # a script run on its own keeps its timeouts
    assert cap(330, now + 1000) == 330
    assert 0 < cap(330, now + 60) <= 60
    assert cap(330, now - 5) == 1  # past the deadline: a timeout of 1 s, never 0 (= none)


def test_every_part_of_gpu_all_exists() -> None:
    text = (ROOT / "bench" / "gpu_all.sh").read_text()
    parts = text.split("parts=(", 1)[1].split(")", 1)[0].split()
    weights = text.split("weights=(", 1)[1].split(")", 1)[0].split()
    assert len(parts) == len(weights) >= 4
    for part in parts:
        assert (ROOT / "bench" / f"{part}.sh").is_file(), part
