"""The sandbox level a run records is the one its rollout workers use: each worker probes its
own node, so the run's level is the lowest they report, and a worker whose node is below what
the config allows stops the run at start with its refusal (naming the worker and its node)."""

from __future__ import annotations

from typing import Any

from forge.actor_errors import raised_at_creation
from forge.sandbox.core import SandboxUnavailable
from forge.sandbox.policy import WorkerSandboxRefused, announce_workers


def workers_level(workers: list[Any], driver_level: int, *, untrusted: bool, env_name: str) -> int:
    """Wait for each worker's start and return the lowest sandbox level they use (the driver's
    when none started), warning about the nodes below `driver_level`. Raises
    SandboxUnavailable when a worker refused its node's level."""
    import ray
    from ray.exceptions import RayActorError

    reports, refused = [], []
    for worker in workers:
        try:
            reports.append(ray.get(worker.sandbox_report.remote()))
        except RayActorError as exc:  # a worker that failed to start otherwise is told of at its first call
            if (message := raised_at_creation(exc, WorkerSandboxRefused)) is not None:
                refused.append(message)
    if refused:
        more = f" ({len(refused)} of {len(workers)} rollout workers refused)" if len(refused) > 1 else ""
        raise SandboxUnavailable(refused[0] + more)
    announce_workers(driver_level, reports, untrusted=untrusted, env_name=env_name)
    return min((r.level for r in reports), default=driver_level)
