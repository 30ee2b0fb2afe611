"""The Ray cluster a run uses: starting or joining it, and checking it can hold the
run's trainer, rollout workers and engines before anything waits on it."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

from forge.config import Config, ConfigError
from forge.rollout.stuck_watch import RUN_MARK

# Ray's GCS server keeps the status and profile events of the last 100,000 tasks (its
# default). A run makes ~5 Ray calls a step, ~3.6 KB of events each, so the GCS grew by
# ~18 KB a step, 350 MB over 20,000 steps, before that cap. 2,000 tasks (the last few
# hundred steps, still listed by `ray list tasks`) bound it at a few MB.
TASK_EVENTS_IN_GCS = 2000
# A weights object the run no longer references stays in Ray's shared-memory object store
# until the raylet's next batch of frees, every second by default; a smoke run publishes
# 3-30 weights a second, so 10-40 of them (1.2 MB each) waited there, and the store's pages
# that every worker and the trainer map grew with them: the "growth" of 2.6-8 MB per 1,000
# steps bench.soak saw in each of those processes. Freed every 100 ms, the pages mapped
# plateau at 2.6 MB instead of 11.5 (same loaded machine, 2,000 sync steps side by side).
FREE_OBJECTS_PERIOD_MS = 100


def start_ray(num_cpus: int | None = None, env_name: str | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS, or start a local Ray once per process. On a
    cluster, the folder of env `env_name` (a `module:Class` not installed as a package) is
    shipped to every node (Ray's `py_modules`)."""
    import ray

    if ray.is_initialized():
        return
    with _callers_sigterm_kept():
        _init(num_cpus, env_name)


@contextlib.contextmanager
def _callers_sigterm_kept() -> Iterator[None]:
    """Ray's init puts its own SIGTERM handling in place (the driver aborts with a C++ stack
    dump); a handler the caller had set (`forge train`'s, which stops the run as Ctrl-C does)
    is put back."""
    caller = (
        signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    )
    try:
        yield
    finally:
        if callable(caller):
            signal.signal(signal.SIGTERM, caller)


def _init(num_cpus: int | None, env_name: str | None) -> None:
    import ray

    named = os.environ.get("RAY_ADDRESS", "")
    if (named and named != "local") or (not named and local_cluster_running()):
        from forge.env.registry import env_module_path

        shipped = env_module_path(env_name) if env_name else None
        try:
            ray.init(
                # None: Ray finds the `ray start` cluster itself, and takes its token auth
                address=named or None,
                log_to_driver=True,
                runtime_env={"py_modules": [shipped]} if shipped else None,
            )
        except ConnectionError as exc:
            raise ConfigError(
                f"could not join the Ray cluster at {named or 'this machine'} ({exc}). Check RAY_ADDRESS "
                "names the head's GCS (host:6379 by default); a cluster with Ray's token authentication on "
                "takes a driver that names its address only with RAY_AUTH_MODE=token and the cluster's "
                "token (RAY_AUTH_TOKEN, or ~/.ray/auth_token)"
            ) from exc
        return
    # Every process of this local Ray inherits the mark, so what a run that was ended
    # abruptly left can be found (forge.rollout.stuck_watch). This process's own, never
    # one inherited from the process that started it.
    os.environ[RUN_MARK] = f"{os.getpid()}-{time.time_ns()}"
    # Ray's agents retitle themselves with setproctitle, which by default writes the title over
    # the environment /proc/PID/environ shows, the mark with it: the watcher could not find
    # them, and they outlived a run ended abruptly. With SPT_NOENV a title stays in argv's room.
    os.environ["SPT_NOENV"] = "1"
    ray.init(
        address="local",  # a new one, never a cluster whose record outlived it
        num_cpus=num_cpus or os.cpu_count() or 1,
        include_dashboard=False,
        log_to_driver=True,
        configure_logging=False,
        _system_config=ray_system_config(),
    )


def local_cluster_running() -> bool:
    """Whether `ray start` runs a cluster on this machine: Ray itself joins one when RAY_ADDRESS
    is unset, so a run on a cluster's head node uses the cluster (said); RAY_ADDRESS=local
    starts a Ray of Forge's own beside it."""
    from ray._private.services import find_bootstrap_address, find_gcs_addresses

    recorded = find_bootstrap_address(None)  # what `ray start` wrote (`ray stop` removes it)
    if recorded is None or recorded not in find_gcs_addresses():  # none, or it outlived its cluster
        return False
    print(
        f"forge: joining the Ray cluster `ray start` runs on this machine ({recorded}); RAY_ADDRESS=local "
        "starts a Ray of Forge's own instead",
        file=sys.stderr,
    )
    return True


def ray_system_config() -> dict[str, int]:
    """Ray settings for a local cluster Forge starts; a RAY_<name> the user set wins."""
    config = {
        "task_events_max_num_task_in_gcs": TASK_EVENTS_IN_GCS,
        "free_objects_period_milliseconds": FREE_OBJECTS_PERIOD_MS,
    }
    return {name: value for name, value in config.items() if f"RAY_{name}" not in os.environ}


def check_resources(cfg: Config, rollout_workers: int) -> None:
    """Fail fast when the trainer processes and rollout workers ask for more CPUs or GPUs
    than the Ray cluster has in total: Ray would otherwise wait forever to place them."""
    import ray

    from forge.config import ConfigError

    trainers = cfg.train.num_trainers
    engines = cfg.rollout.num_engines if cfg.rollout.engine == "server" else 0
    wanted = {
        "CPU": trainers * cfg.train.num_cpus
        + rollout_workers * worker_cpus(cfg)
        + engines * cfg.rollout.num_cpus_per_engine,
        "GPU": trainers * cfg.train.num_gpus
        + rollout_workers * cfg.rollout.num_gpus_per_worker
        + engines * cfg.rollout.num_gpus_per_engine,
    }
    have = ray.cluster_resources()
    for kind, amount in wanted.items():
        if amount > have.get(kind, 0.0) + 1e-9:
            message = (
                f"this run needs {amount:g} {kind}s (train.num_trainers={trainers} x train.num_{kind.lower()}s="
                f"{getattr(cfg.train, f'num_{kind.lower()}s'):g} + {rollout_workers} rollout workers x "
                f"rollout.num_{kind.lower()}s_per_worker={getattr(cfg.rollout, f'num_{kind.lower()}s_per_worker'):g}) "
                f"but the Ray cluster has {have.get(kind, 0.0):g}; lower those settings or add nodes"
            )
            if os.environ.get("RAY_ADDRESS"):  # an autoscaling cluster may still grow: say so, go on
                logging.getLogger("forge").warning(message)
            else:
                raise ConfigError(message)


def worker_cpus(cfg: Config) -> float:
    """A rollout worker's CPU reservation: none when engines generate for it (it runs envs only)."""
    return cfg.rollout.num_cpus_per_worker if cfg.rollout.engine == "inprocess" else 0.0
