"""What the processes Forge starts import before they do anything: every rollout worker and
trainer actor pays its imports anew, once per run, so a heavy library that only the driver
needs (`datasets`, for the task rows) stays out of their modules' top level."""

from __future__ import annotations

import json
import subprocess
import sys

# Libraries no actor needs at import: `datasets` alone was a second of every worker's start
# (it brings pandas and pyarrow), paid again at each run and each restart.
DRIVER_ONLY = ("datasets", "pandas", "pyarrow")


def test_the_modules_actors_import_leave_the_driver_only_libraries_out():
    probe = (
        "import json, sys\n"
        "import forge.rollout.worker, forge.train.trainer, forge.env, forge.env.tasks\n"
        f"print(json.dumps([name for name in {DRIVER_ONLY!r} if name in sys.modules]))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_the_task_rows_still_come_from_datasets():
    from forge.env.tasks import generated_tasks
    from forge_envs.guess_number import GuessNumberEnv

    rows = generated_tasks(GuessNumberEnv, 3, seed=0)
    assert type(rows).__module__.startswith("datasets")
    assert len(rows) == 3 and len(set(rows["task_id"])) == 3
