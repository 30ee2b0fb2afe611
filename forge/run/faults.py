"""What a run does when one of its Ray actors dies: lost stand-in episodes for a dead
worker's groups, what to say about the death, waiting for a restarted worker, and the
message when the run must stop."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from forge.actor_errors import actor_hub_message, creation_error, known_refusal
from forge.failures import RunStopped
from forge.types import Trajectory


def lost_group(task: dict[str, Any], group_size: int, error: str) -> list[Trajectory]:
    """Stand-ins for the episodes of a group whose worker died: counted, never trained on."""
    task_id = str(task.get("task_id", ""))
    return [
        Trajectory(
            task_id=task_id,
            group_id=f"{task_id}@lost",
            token_ids=[],
            loss_mask=[],
            behaviour_logprobs=[],
            policy_versions=[],
            prompt_length=0,
            status="lost",
            error=error,
        )
        for _ in range(group_size)
    ]


def collect_groups(
    ref: Any, tasks: list[dict[str, Any]], group_size: int
) -> tuple[list[list[Trajectory]], bool]:
    """The episodes of one worker call, one list per task (its group) in launch order; if
    the worker died, lost stand-ins for every group, and True."""
    import ray
    from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

    try:
        episodes = ray.get(ref)
    except (RayActorError, ActorUnavailableError) as exc:  # Ray restarts the worker; the episodes are gone
        stop_if_model_missing(exc)
        return [lost_group(task, group_size, death_cause(exc)) for task in tasks], True
    except RayTaskError as exc:
        stop_if_engines_lost(exc)
        raise
    return [episodes[i * group_size : (i + 1) * group_size] for i in range(len(tasks))], False


def death_cause(exc: BaseException) -> str:
    """A dead worker's lost episodes' error: what its start raised, or Ray's first line (not
    Ray's whole text, a traceback that would bury the run's stop message)."""
    lines = str(exc).strip().splitlines()
    return f"rollout worker died: {creation_error(exc) or (lines[0] if lines else type(exc).__name__)}"


def stop_if_engines_lost(exc: BaseException) -> None:
    """A worker's rollout that waited rollout.engine_timeout_s for one of its lost engines to
    come back, in vain, stops the run naming them (`exc`: the call's RayTaskError)."""
    from forge.rollout.engines.remote import EngineLost

    cause = getattr(exc, "cause", None)
    if isinstance(cause, EngineLost) and cause.url == "every engine":
        raise RunStopped(f"a rollout worker stopped: {cause}") from None


def stop_if_model_missing(exc: BaseException) -> None:
    """A worker that could not start (or restart) because its node cannot resolve the run's hub
    model, or because it refused a setting or its node's sandbox, would fail the same way at
    every restart: stop the run with its message (role, node, setting, fix). Ray's log of it
    was kept off the console (forge.actor_errors.quiet_known_creation_errors)."""
    if (message := actor_hub_message(exc)) is not None:
        raise RunStopped(message) from None
    if (message := known_refusal(exc)) is not None:
        raise RunStopped(f"a rollout worker could not start, so the run stopped: {message}") from None


def worker_death_note(
    index: int, lost: int, report_dir: str | Path, reported: set[str], env_name: str, step_timeout_s: float
) -> str:
    """The console line for rollout worker `index`'s death, which lost `lost` episodes:
    where its env call was stuck, when the worker ended itself for that (its report in
    `report_dir`, see `forge.rollout.stuck`; `reported` holds the reports told already)."""
    from forge.rollout.stuck import stuck_report

    stuck = stuck_report(report_dir, f"rollout_{index}", reported)
    if stuck is None:
        return (
            f"forge: rollout worker {index} died (its log above says why; Ray restarts it, up to "
            f"async.max_worker_restarts times); its {lost} episodes count as lost"
        )
    why = (
        "inside C code, which the watchdog cannot interrupt, on the worker's event loop (the env sets "
        "blocking = False, so its calls run there; an env whose calls can block must leave `blocking` True)"
        if stuck.on_loop
        else "in a thread that held the GIL (C code that does not release it), so the worker's event loop could not run"
    )
    return (
        f"forge: rollout worker {index} was stuck for {stuck.seconds:g}s at {stuck.where} "
        f"(env {env_name}, env.step_timeout_s={step_timeout_s:g}): {why}. The worker was ended (Ray restarts it, "
        f"up to async.max_worker_restarts times); its {lost} episodes count as lost. All its threads' stacks: "
        f"{stuck.path}"
    )


def idle_worker_death_note(index: int) -> str:
    """The console line for rollout worker `index`'s death between rollouts (while the trainer
    trained): no episode was lost, but each death counts toward async.max_worker_restarts."""
    return (
        f"forge: rollout worker {index} died between rollouts (its log above says why); Ray restarts it, "
        "up to async.max_worker_restarts times, and it is given the current weights again, so no episode is lost"
    )


def wait_until_alive(actor: Any, index: int, max_restarts: int, timeout_s: float = 300.0) -> None:
    """Block until restarting rollout worker `index` answers again; one that never comes
    back (it died more than `max_restarts` times, or did not restart within `timeout_s`)
    stops the run with a clear message instead of a hang."""
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get(actor.get_policy_version.remote(), timeout=max(deadline - time.monotonic(), 1.0))
            return
        except ActorUnavailableError:
            if time.monotonic() > deadline:
                raise RunStopped(
                    f"rollout worker {index} did not come back within {timeout_s:.0f}s of dying"
                ) from None
            time.sleep(0.2)
        except ActorDiedError as exc:
            raise RunStopped(worker_gone_message(index, max_restarts, exc)) from None


def worker_gone_message(index: int, max_restarts: int, exc: BaseException) -> str:
    """Why the run stops when rollout worker `index` is dead for good: it refused to restart
    (e.g. on a node whose sandbox level is below what the config allows: Ray does not restart
    an actor whose `__init__` raised), or it died more than `max_restarts` times."""
    if (refusal := known_refusal(exc)) is not None:
        return f"rollout worker {index} could not restart, so the run stopped: {refusal}"
    cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        f"rollout worker {index} died more than async.max_worker_restarts={max_restarts} times, so the run "
        f"stopped; the lines above say why it died ({cause})"
    )


def actor_death_message(
    exc: BaseException, output_dir: str | Path, config: str | None = None, checkpoint_every: int = 0
) -> str | None:
    """What to tell the user when a run stops because one of its actors died for good (the
    trainer, or a trainer rank: its state since the last checkpoint is gone), or None when
    `exc` is something else."""
    import re

    from ray.exceptions import RayActorError

    if not isinstance(exc, RayActorError):
        return None
    if (hub := actor_hub_message(exc)) is not None:  # it never started: its node lacks the model
        return hub
    found = re.search(r"class_name: (\w+)", str(exc))
    who = f"the {found.group(1)} actor" if found else "an actor of the run"
    if (cause := creation_error(exc)) is not None:  # it never started: say what its constructor raised
        message = f"{who} could not start, so the run stopped: {cause}."
    else:
        message = f"{who} died, so the run stopped (its log above says why: often out of memory)."
    return message + resume_hint(output_dir, config, checkpoint_every)


def resume_hint(
    output_dir: str | Path, config: str | None, checkpoint_every: int = 0, write_failed: bool = False
) -> str:
    """How a run that stopped early goes on: the command resuming its latest checkpoint, or
    why it wrote none (checkpoints off, stopped before the first, or a write failed: then
    setting train.checkpoint_every, already set, is no advice)."""
    from forge.train.checkpoint import CheckpointError, latest_checkpoint

    try:
        latest = latest_checkpoint(output_dir)
    except CheckpointError:
        if write_failed:
            turn_on = "" if checkpoint_every else "; set train.checkpoint_every to make runs resumable"
            return f" No checkpoint was complete before the write failed, so the run starts over{turn_on}."
        if not checkpoint_every:
            return " No checkpoint was written; set train.checkpoint_every to make runs resumable."
        return (
            f" No checkpoint was written: the run stopped before its first (train.checkpoint_every="
            f"{checkpoint_every}), so it starts over."
        )
    return f" Continue from {latest.name} with: forge train {config or 'CONFIG'} --resume {output_dir}"


def wait_for_trainer(trainer: Any) -> None:
    """Block until the trainer actor(s) have loaded the model; one that could not stops the
    run with its error (RunStopped), before anything is played for it to train on."""
    import ray
    from ray.exceptions import RayActorError

    actors = list(getattr(trainer, "actors", [trainer]))  # a TrainerGroup's ranks, or the one actor
    try:
        ray.get([actor.__ray_ready__.remote() for actor in actors])
    except RayActorError as exc:
        cause = actor_hub_message(exc) or creation_error(exc)
        if cause is None:
            raise
        raise RunStopped(
            f"the trainer could not start, so the run stopped before its first step: {cause}"
        ) from None
