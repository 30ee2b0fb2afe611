"""Resumable checkpoints: what a run must save to continue exactly, and publishing it atomically.

Layout under RUN_DIR/checkpoints: `step-000010/` holds `trainer.pt` (trainable weights,
optimizer, scheduler, RNG states, policy version) and `run_state.pkl` (step, task-stream
position, reward-shaper state, driver and worker RNG states); `latest` names the newest
complete one. A checkpoint is written under a temporary name, fsynced, renamed, and only
then does `latest` move to it, so a process killed at any point leaves the previous
checkpoint as the latest; one whose writing fails (a full disk) is removed at once, freeing
what it took. Resume checks the files `latest` names before anything starts.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from forge.config import ConfigError
from forge.disk import WholeWrites, naming

LATEST = "latest"
TRAINER_FILE = "trainer.pt"
CHECK_SAID_BYTES = 2**30  # checking a trainer.pt this large or larger (seconds) is said first
RUN_STATE_FILE = "run_state.pkl"


class CheckpointError(FileNotFoundError):
    """A run directory the user pointed at has no checkpoint to resume from."""


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def checkpoint_step(directory: Path) -> int:
    """The step a checkpoint directory (named by `step_name`) holds."""
    return int(directory.name.removeprefix("step-"))


def _fsync(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*"), reverse=True):
        _fsync(path)
    _fsync(directory)


def write_checkpoint(run_dir: str | Path, step: int, write: Callable[[Path], None], keep: int = 2) -> Path:
    """Call `write(tmp_dir)` to fill a checkpoint, then publish it as the latest.

    Keeps the newest `keep` checkpoints (0 keeps all)."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{step_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    final = root / step_name(step)
    try:
        write(tmp)
        _fsync_tree(tmp)
        if final.exists():
            # Left by a run that died after the rename but before moving `latest` to it.
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        # On a full disk the half-written checkpoint would hold the space the run needs next.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(root)
    pointer = root / f".{LATEST}.tmp"
    with open(pointer, "w") as handle:
        handle.write(final.name + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(pointer, root / LATEST)
    _fsync(root)
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep <= 0:
        return
    complete = sorted(p for p in root.glob("step-*") if p.is_dir())
    latest = root / (root / LATEST).read_text().strip()
    for old in complete[:-keep]:
        if old != latest:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The newest complete checkpoint of a run; a clear error when there is none."""
    root = checkpoint_root(run_dir)
    pointer = root / LATEST
    if not pointer.is_file():
        raise CheckpointError(
            f"{run_dir} has no checkpoint to resume from ({pointer} is missing); "
            "set train.checkpoint_every to a positive number of steps when you start a run"
        )
    directory = root / pointer.read_text().strip()
    for name in (TRAINER_FILE, RUN_STATE_FILE):
        if not (directory / name).is_file():
            raise CheckpointError(
                f"{directory / name} is missing, so {pointer} names a checkpoint that cannot be resumed."
                + _other_checkpoint(root, directory)
            )
    return directory


def check_resumed_model(run_dir: str | Path, model: dict[str, Any]) -> None:
    """Refuse to resume `run_dir` with a model (`model`: the config's model section as a dict)
    whose trainable parameters differ from the run's, by its config.yaml, before anything starts:
    else the trainer fails to load the checkpoint after Ray and every actor have started, and
    the run's config.yaml already names the wrong model."""
    import yaml

    written = Path(run_dir) / "config.yaml"
    if not written.is_file():
        return
    trained = (yaml.safe_load(written.read_text()) or {}).get("model") or {}
    settings = [("path", trained.get("path"), model.get("path"))]
    if model.get("path") is None:
        settings.append(("tiny", trained.get("tiny"), model.get("tiny")))
    trained_lora, lora = trained.get("lora") or {}, model.get("lora") or {}
    adapters = ("enabled", "r", "target_modules") if lora.get("enabled") else ("enabled",)
    settings += [(f"lora.{key}", trained_lora.get(key), lora.get(key)) for key in adapters]
    for key, before, now in settings:
        if before != now and not _same_folder(before, now):
            raise ConfigError(
                f"{run_dir} trained model.{key}={before!r} (its config.yaml), this config gives "
                f"model.{key}={now!r}: the checkpoint cannot load into another model. Resume with the "
                f"run's own settings: forge train {written} --resume {run_dir}"
            )


def _same_folder(before: Any, now: Any) -> bool:
    """Two spellings of one local folder (relative and absolute, `~`)."""
    if not isinstance(before, str) or not isinstance(now, str):
        return False
    return Path(before).expanduser().resolve() == Path(now).expanduser().resolve()


def check_checkpoint(directory: Path) -> None:
    """Refuse a checkpoint whose files were damaged after it was written (cut short, edited,
    bytes changed), naming the file: read here, before Ray starts, rather than failing inside
    the trainer actor after every actor started, or resuming from changed weights."""
    if (damage := _damage(directory)) is not None:
        raise CheckpointError(
            f"{damage}, so this checkpoint cannot be resumed."
            + _other_checkpoint(directory.parent, directory)
        )


def _damage(directory: Path) -> str | None:
    """What is wrong with a checkpoint's files, or None. trainer.pt is a zip: its index, at its
    end, finds a truncated file, and each record's CRC-32 finds bytes changed after it was
    written (torch.load does not check them: it would resume from the changed weights without
    an error). Checking reads the whole file, at several GB/s: less than loading it."""
    trainer_file, run_file = directory / TRAINER_FILE, directory / RUN_STATE_FILE
    if trainer_file.is_file() and (size := trainer_file.stat().st_size) >= CHECK_SAID_BYTES:
        print(f"forge: reading {trainer_file} ({size / 2**30:.1f} GiB) to check it is whole", file=sys.stderr)
    try:
        with zipfile.ZipFile(trainer_file) as archive:
            changed = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        return f"{trainer_file} is damaged ({type(exc).__name__}: {exc})"
    if changed is not None:
        return (
            f"{trainer_file} is damaged (its record {changed} fails its CRC check: its bytes changed after "
            "the checkpoint was written)"
        )
    try:
        with open(run_file, "rb") as handle:
            int(pickle.load(handle)["step"])
    except Exception as exc:  # unpickling damaged bytes raises nearly any error
        return f"{run_file} is damaged ({type(exc).__name__}: {exc})"
    return None


def _other_checkpoint(root: Path, bad: Path) -> str:
    """How to resume from the newest other checkpoint, if the run kept one."""
    for other in sorted((p for p in root.glob("step-*") if p != bad and p.is_dir()), reverse=True):
        if _damage(other) is not None:
            continue
        return (
            f" To resume from the newest other checkpoint instead, write its name into the pointer: "
            f"echo {other.name} > {root / LATEST}"
        )
    return (
        " The run kept no other checkpoint: start it again without --resume (--overwrite replaces this one)"
    )


# ---- trainer side (runs inside the trainer actor) ----


def trainer_state(trainer: Any) -> dict[str, Any]:
    """A trainer's whole state; its weights and optimizer state are keyed by parameter name,
    the same whether one process trained or several (sharded or not), so a checkpoint resumes
    under any `train.num_trainers` and `train.strategy`. Under data parallelism every process
    calls this (FSDP2 gathers the shards) and only the first gets the weights."""
    weights, optimizer = trainer.training_state()
    return {
        "trainable": weights,
        "optimizer": optimizer,
        "scheduler": trainer.scheduler.state_dict(),
        "policy_version": trainer.policy_version,
        "shuffle_rng": trainer._shuffle.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python_rng": random.getstate(),
    }


def restore_trainer_state(trainer: Any, state: dict[str, Any]) -> None:
    saved = state["trainable"]
    missing = sorted(set(trainer.trainable) - set(saved))
    unexpected = sorted(set(saved) - set(trainer.trainable))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the model's trainable parameters (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); resume with the model and model.lora settings the run used"
        )
    if any(isinstance(key, int) for key in state["optimizer"].get("state", {})):
        raise ValueError(
            "checkpoint keeps the optimizer state by parameter index, as forge wrote it before "
            "checkpoints were keyed by parameter name; it cannot be resumed by this version"
        )
    trainer.load_training_state(saved, state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    take_config_hyperparameters(trainer.optimizer, trainer.scheduler, trainer.train_cfg)
    trainer.policy_version = state["policy_version"]
    trainer._shuffle.set_state(state["shuffle_rng"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    random.setstate(state["python_rng"])


def take_config_hyperparameters(optimizer: Any, scheduler: Any, train_cfg: Any) -> None:
    """Give a restored optimizer the config's `train.learning_rate` and `train.weight_decay`:
    their saved state holds the values the run started with, so a resume that changed them
    would otherwise train on the old ones unsaid. The schedule (warmup, decay over the new
    `max_steps`) goes on from the optimizer steps taken."""
    scheduler.base_lrs = [train_cfg.learning_rate] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = train_cfg.learning_rate
        group["lr"] = train_cfg.learning_rate * factor(scheduler.last_epoch)
        group["weight_decay"] = train_cfg.weight_decay
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def save_trainer(trainer: Any, directory: str | Path) -> None:
    state = trainer_state(trainer)
    if trainer.writes_files:
        path = Path(directory) / TRAINER_FILE
        with naming(path), WholeWrites(path) as handle:
            torch.save(state, handle)


def load_trainer(trainer: Any, directory: str | Path) -> None:
    restore_trainer_state(trainer, torch.load(Path(directory) / TRAINER_FILE, weights_only=False))


# ---- driver side (forge.run.context.Run) ----


def _driver_rng() -> dict[str, Any]:
    import numpy as np

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _restore_driver_rng(state: dict[str, Any]) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_run(run: Any, step: int, keep: int = 2, pending_tasks: list[dict[str, Any]] | None = None) -> Path:
    """Checkpoint a run after `step` completed steps: trainer, task stream, reward shaper,
    RNG states. A sync run is between steps, so its workers' RNG states are saved too. An
    async run's workers are busy (and its episodes' order depends on timing anyway); it
    passes the tasks it had started and not trained on, which a resumed run plays first."""
    import ray

    worker_rng = (
        ray.get([worker.rng_state.remote() for worker in run.workers]) if pending_tasks is None else None
    )
    state = {
        "step": step,
        "tasks": {"rng": run.tasks.rng.getstate(), "order": run.tasks.order, "position": run.tasks.position},
        "requeued": [*(pending_tasks or []), *run.tasks.requeued],
        "task_baselines": dict(run.shaper.task_baselines),
        "driver_rng": _driver_rng(),
        "worker_rng": worker_rng,
    }

    def write(directory: Path) -> None:
        ray.get(run.trainer.save_state.remote(str(directory)))
        with naming(directory / RUN_STATE_FILE), open(directory / RUN_STATE_FILE, "wb") as handle:
            pickle.dump(state, handle)

    return write_checkpoint(run.output_dir, step, write, keep)


def restore_run(run: Any) -> int:
    """Load the run directory's latest checkpoint into a freshly built run; returns its step.
    The workers still hold the initial weights: the caller syncs them."""
    import ray

    directory = latest_checkpoint(run.output_dir)
    with open(directory / RUN_STATE_FILE, "rb") as handle:
        state = pickle.load(handle)
    worker_rng = state["worker_rng"]
    if worker_rng is not None and len(worker_rng) != len(run.workers):
        # A resume may change the rollout layout (a bigger machine, a smaller one): the workers
        # both layouts have take their saved state, a new one starts from its seed.
        print(
            f"forge: the checkpoint was written with rollout.num_workers={len(worker_rng)} and this run has "
            f"{len(run.workers)}: workers 0-{min(len(worker_rng), len(run.workers)) - 1} resume their episode "
            "and sampling streams, any other starts from its seed, so this run samples other episodes than "
            "an uninterrupted one would",
            file=sys.stderr,
        )
    ray.get(run.trainer.load_state.remote(str(directory)))
    if worker_rng is not None:
        ray.get([w.set_rng_state.remote(s) for w, s in zip(run.workers, worker_rng, strict=False)])
    run.tasks.rng.setstate(state["tasks"]["rng"])
    run.tasks.order = list(state["tasks"]["order"])
    run.tasks.position = state["tasks"]["position"]
    run.tasks.requeued = list(state["requeued"])
    run.shaper.task_baselines = dict(state["task_baselines"])
    _restore_driver_rng(state["driver_rng"])
    step = int(state["step"])
    for name in ("metrics.jsonl", "trajectories.jsonl"):
        drop_rows_after(run.output_dir / name, step)
    return step


def drop_rows_after(path: Path, step: int) -> None:
    """Remove the records a killed run logged after its last checkpoint, which a resume replays."""
    import json

    if not path.is_file():
        return

    def before(line: str) -> bool:
        try:
            return json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            return False  # a line cut short when the process died

    kept = [line for line in path.read_text().splitlines() if line.strip() and before(line)]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
