"""The sandbox level a run records is the one its rollout workers use: each worker probes its
own node, so the run's level is the lowest they report (at start, and again for a worker Ray
restarted, maybe on another node), and a worker whose node is below what the config allows
stops the run with its refusal (naming the worker and its node).
A worker whose start failed otherwise stops the run there too, with its error: Ray does not
restart an actor whose `__init__` raised, so every episode sent to it would be lost."""

from __future__ import annotations

from typing import Any

from forge.actor_errors import actor_hub_message, creation_error, known_refusal, raised_at_creation
from forge.config import ConfigError
from forge.failures import RunStopped
from forge.sandbox import isolation
from forge.sandbox.core import SandboxUnavailable
from forge.sandbox.policy import SandboxReport, WorkerSandboxRefused, announce_workers, untrusted_at_level_0


def workers_level(workers: list[Any], driver_level: int, *, untrusted: bool, env_name: str) -> int:
    """Wait for each worker's start and return the lowest sandbox level they use (the driver's
    when none started), warning about the nodes below `driver_level`. Raises
    SandboxUnavailable when a worker refused its node's level."""
    import ray
    from ray.exceptions import RayActorError

    reports, refused, failed = [], [], []
    for index, worker in enumerate(workers):
        try:
            reports.append(ray.get(worker.sandbox_report.remote()))
        except RayActorError as exc:  # one that died later, not at its start, is told of at its next call
            if (message := raised_at_creation(exc, WorkerSandboxRefused)) is not None:
                refused.append(message)
            elif actor_hub_message(exc) is not None:
                continue  # told at its first call, as a restarted worker's (forge.run.faults)
            elif (message := known_refusal(exc)) is not None:
                raise ConfigError(message) from None  # a setting every worker refuses alike
            elif (cause := creation_error(exc)) is not None:
                failed.append((index, cause))
    if refused:
        more = f" ({len(refused)} of {len(workers)} rollout workers refused)" if len(refused) > 1 else ""
        raise SandboxUnavailable(refused[0] + more)
    if failed:
        index, cause = failed[0]
        more = f" ({len(failed)} of {len(workers)} rollout workers failed)" if len(failed) > 1 else ""
        raise RunStopped(
            f"rollout worker {index} could not start, so the run stopped before its first step{more}: {cause}"
        )
    announce_workers(driver_level, reports, untrusted=untrusted, env_name=env_name)
    return min((r.level for r in reports), default=driver_level)


def restarted_level_note(
    index: int, report: SandboxReport, was: int, *, untrusted: bool, env_name: str
) -> str:
    """The console line for rollout worker `index`, restarted on a node (`report`) whose level
    is below the run's recorded level `was`."""
    why = report.unavailable.get(was)
    lines = [
        f"forge: rollout worker {index} restarted on node {report.node} at sandbox level {report.level} "
        f"(was {was}{f'; there: {why}' if why else ''}): this run's sandbox level is now {report.level} "
        f"({isolation.LEVEL_NAMES[report.level]}), in config.yaml and the sandbox_level of its later steps"
    ]
    if report.level == 0 and untrusted:
        lines.append(untrusted_at_level_0(env_name, f" on node {report.node}", report.root))
    return "\n".join(lines)
