"""Where a benchmark's result goes: one JSON file under bench/results/."""

from __future__ import annotations

import json
from pathlib import Path


def save_result(result: dict, path: Path) -> None:
    """Write `result` as indented JSON to `path`, making its folder if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
