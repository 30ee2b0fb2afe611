"""`forge export RUN_DIR [--step N] [--out FOLDER]`: a model folder (what a run's final/ holds)
from one of the run's resumable checkpoints, for a run that stopped before it wrote final/."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from forge.train.checkpoint import (
    LATEST,
    TRAINER_FILE,
    CheckpointError,
    check_checkpoint,
    checkpoint_root,
    checkpoint_step,
    step_name,
)

EXPORTS = "exports"  # RUN_DIR/exports/step-NNNNNN: where a checkpoint's model goes unless --out says


def export_command(run: Path, step: int) -> str:
    """The command that writes the model of `run`'s checkpoint at `step` (for messages)."""
    return f"forge export {run} --step {step}"


def default_out(run: Path, step: int) -> Path:
    return run / EXPORTS / step_name(step)


def find_checkpoint(given: Path, step: int | None) -> tuple[Path, Path]:
    """The run folder and the checkpoint folder `given` (a run, or one of its step-N checkpoints)
    and `step` (None: the latest) name; a clear error naming what the run holds otherwise."""
    if (given / TRAINER_FILE).is_file():  # RUN/checkpoints/step-N itself
        if step is None:
            return given.parent.parent, given
        given = given.parent.parent
    root = checkpoint_root(given)
    if not root.is_dir():
        raise CheckpointError(
            f"{given} holds no checkpoints/ folder: pass a run's output folder (one `forge train` wrote "
            "with train.checkpoint_every > 0), or one of its checkpoints/step-N folders"
        )
    kept = sorted(checkpoint_step(p) for p in root.glob("step-*") if p.is_dir())
    if step is None:
        pointer = root / LATEST
        if not pointer.is_file():
            raise CheckpointError(
                f"{pointer} is missing; pick one of the run's checkpoints with --step N: {kept}"
            )
        directory = root / pointer.read_text().strip()
    else:
        directory = root / step_name(step)
    if not (directory / TRAINER_FILE).is_file():
        raise CheckpointError(
            f"{directory / TRAINER_FILE} does not exist; the run kept checkpoints of steps {kept or 'none'} "
            "(train.keep_checkpoints sets how many a run keeps)"
        )
    return given, directory


def export_checkpoint(given: str | Path, step: int | None = None, out: str | Path | None = None) -> Path:
    """Write the model of a run's checkpoint as the trainer writes final/ (LoRA adapters merged),
    from the checkpoint's trainable weights over the run's model (its config.yaml's `model`)."""
    import yaml

    from forge.config import ConfigError, ModelConfig
    from forge.models.loading import load_model, load_tokenizer, resolve_model_path
    from forge.train.trainer import save_model_folder

    run, directory = find_checkpoint(Path(given), step)
    check_checkpoint(directory)  # a damaged trainer.pt is named, not loaded into the weights
    step = checkpoint_step(directory)
    out = Path(out) if out is not None else default_out(run, step)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} already holds files: remove it or pass another folder")
    written = run / "config.yaml"
    if not written.is_file():
        raise CheckpointError(f"{written} is missing: forge export reads the run's model settings from it")
    raw = yaml.safe_load(written.read_text()) or {}
    try:
        model_cfg = ModelConfig.model_validate(raw.get("model") or {})
    except ValueError as exc:
        raise ConfigError(f"{written}: its model section does not load ({exc})") from None
    # The model the run started from: model.path, or the tiny model it built into RUN/initial_model.
    model_path = resolve_model_path(model_cfg, run / "initial_model", seed=int(raw.get("seed", 0)))
    print(f"forge: exporting {directory} (step {step}) over {model_path}", file=sys.stderr)
    model = load_model(model_path, model_cfg, trainable=True, device="cpu")
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    # Mapped, not read: only the weights' pages are read; the optimizer's state (twice the
    # weights under Adam) stays on disk.
    saved = torch.load(directory / TRAINER_FILE, map_location="cpu", weights_only=False, mmap=True)[
        "trainable"
    ]
    missing, unexpected = sorted(trainable - set(saved)), sorted(set(saved) - trainable)
    if missing or unexpected:
        raise CheckpointError(
            f"{directory / TRAINER_FILE} does not match the model of {written} (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}): was config.yaml's model section changed after the run?"
        )
    model.load_state_dict(saved, strict=False)
    del saved  # unmapped before the model is written: its pages leave this process's memory
    return Path(save_model_folder(model, load_tokenizer(model_path), out))
