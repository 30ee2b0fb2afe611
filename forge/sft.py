"""`forge sft CONFIG`: supervised warm start on chat transcripts through the RL trainer:
each transcript is one sample whose assistant tokens carry the loss (advantage 1 under
the `pg` loss is their negative log-likelihood); tree packing, LoRA, metrics as in RL."""

from __future__ import annotations

import inspect
import json
import random
import time
from pathlib import Path
from typing import Any

from forge.config import Config, ConfigError
from forge.types import NO_VERSION, Sample


def _encode(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def transcript_sample(tokenizer: Any, messages: list[dict[str, Any]]) -> Sample:
    """One transcript as a training sample: the tokens of each assistant message (its
    text and end of turn) have loss mask 1, every other token 0. The transcript is
    rendered through the model's chat template one message at a time, so the assistant
    spans are exactly the tokens the template adds for them."""
    ids: list[int] = []
    mask: list[int] = []
    for index, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = _encode(tokenizer, messages[:index], generation_prompt=True)
        after = _encode(tokenizer, messages[: index + 1], generation_prompt=False)
        if after[: len(before)] != before or before[: len(ids)] != ids:
            raise ValueError(
                "the chat template does not render a conversation as a prefix of its continuation; "
                "forge sft cannot tell the assistant's tokens apart"
            )
        mask += [0] * (len(before) - len(ids)) + [1] * (len(after) - len(before))
        ids = after
    if not any(mask):
        raise ValueError("a transcript has no assistant message to learn from")
    return Sample(ids, mask, [0.0] * len(ids), [NO_VERSION] * len(ids), advantage=1.0)


def read_transcripts(path: str | Path) -> list[list[dict[str, Any]]]:
    """`messages` lists from a jsonl file, one transcript a line."""
    transcripts = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"sft.data {path}: line {number} is not JSON ({exc})") from None
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise ConfigError(f"sft.data {path}: line {number} needs a 'messages' list of {{role, content}}")
        transcripts.append(messages)
    if not transcripts:
        raise ConfigError(f"sft.data {path} holds no transcripts")
    return transcripts


def env_demonstrations(cfg: Config) -> list[list[dict[str, Any]]]:
    """Transcripts from the configured env's `demonstrations(tasks, **env.kwargs)`
    classmethod; with swarm.enabled, `spawn=True` too when it takes that argument."""
    from forge.env.registry import resolve_env
    from forge.run.tasks import load_task_rows

    env_class = resolve_env(cfg.env.name)
    demonstrate = getattr(env_class, "demonstrations", None)
    if demonstrate is None:
        raise ConfigError(
            f"{env_class.__name__} has no demonstrations(tasks) classmethod; give a jsonl of 'messages' (--data)"
        )
    kwargs = dict(cfg.env.kwargs)
    # A team's demonstrations (spawn calls and sub-agent turns) for an env that has them.
    if cfg.swarm.enabled and "spawn" in inspect.signature(demonstrate).parameters:
        kwargs["spawn"] = True
    return list(demonstrate(load_task_rows(cfg), **kwargs))


def sft(cfg: Config, data: str | None, output_dir: str | Path, epochs: int = 1, batch_size: int = 16) -> Path:
    """Train on the transcripts (`data`, or the env's demonstrations) for `epochs`, in
    steps of `batch_size` transcripts; write metrics.jsonl and final/. Returns final/."""
    from forge.metrics import MetricsLogger, claim_output_dir
    from forge.models.loading import resolve_model_path
    from forge.train.trainer import Trainer

    output = Path(output_dir)
    claim_output_dir(output)
    output.mkdir(parents=True, exist_ok=True)
    transcripts = read_transcripts(data) if data else env_demonstrations(cfg)
    model_path = resolve_model_path(cfg.model, output / "initial_model", seed=cfg.seed)
    steps = epochs * -(-len(transcripts) // batch_size)
    # Plain negative log-likelihood of the assistant tokens: pg at advantage 1, one
    # optimizer step per batch, no importance weights (there is no behaviour policy).
    train_cfg = cfg.train.model_copy(update={
        "loss": "pg", "tis_cap": None, "kl_coef": 0.0, "entropy_coef": 0.0, "minibatches_per_step": 1,
        "max_steps": steps,
    })  # fmt: skip
    trainer = Trainer(model_path, cfg.model, train_cfg, cfg.trainer, cfg.seed)
    samples = [transcript_sample(trainer.tokenizer, messages) for messages in transcripts]
    logger = MetricsLogger(output, cfg.logging.tensorboard, None, cfg.to_dict())
    order = random.Random(cfg.seed)
    started = time.perf_counter()
    step = 0
    try:
        for _ in range(epochs):
            order.shuffle(samples)
            for first in range(0, len(samples), batch_size):
                step += 1
                metrics = trainer.train_step(samples[first : first + batch_size])
                metrics["wall_seconds"] = time.perf_counter() - started
                logger.log(step, metrics)
    finally:
        logger.close()
    return Path(trainer.save(output / "final"))
