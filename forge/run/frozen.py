"""The sub-agents' frozen policy of a run (swarm.subagent_policy: frozen): the snapshot of
`swarm.frozen_version` kept in the run folder, so restarted workers and resumed runs use it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from forge.config import Config

SNAPSHOT_FILE = "swarm_frozen.pt"


def frozen_snapshot(cfg: Config, output_dir: Path) -> Path | None:
    """Where a run keeps the snapshot; None when its sub-agents need none. Version 0 needs
    none: every worker, restarted or resumed, starts from the initial weights and keeps them."""
    swarm = cfg.swarm
    if not swarm.enabled or swarm.subagent_policy != "frozen" or swarm.frozen_version == 0:
        return None
    return output_dir / SNAPSHOT_FILE


def keep_snapshot(
    snapshot: Path | None, frozen_version: int, version: int, worker: Any, loading: Any = None
) -> None:
    """Once `worker` holds `version` == the frozen version, save its snapshot (waited for, so
    that any later version a restarted worker gets finds the file). `loading`: the worker's
    pending `set_weights` call, waited for first (an async actor may run calls out of order)."""
    import ray

    if snapshot is None or version != frozen_version or snapshot.exists():
        return
    if loading is not None:
        ray.get(loading)
    ray.get(worker.save_frozen.remote(str(snapshot)))


def check_resumable(snapshot: Path | None, frozen_version: int, step: int) -> None:
    """A resumed run past the frozen version needs the snapshot its first part saved."""
    if snapshot is not None and step >= frozen_version and not snapshot.exists():
        raise ValueError(
            f"cannot resume at step {step}: swarm.frozen_version is {frozen_version} and the run folder has no "
            f"snapshot of it ({snapshot}; runs before this version of Forge did not save one), so sub-agents "
            "would sample from other weights than before. Start the run afresh"
        )
