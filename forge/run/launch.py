"""`train`: checks what can be checked before anything starts, then runs the configured
mode (`forge.run.sync`, `forge.run.async_`, or `forge.run.gateway` for agent programs)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from forge.config import Config, ConfigError
from forge.metrics import claim_output_dir
from forge.run.async_ import train_async
from forge.run.context import RunResult
from forge.run.sync import train_sync
from forge.train.checkpoint import check_checkpoint, check_resumed_model, latest_checkpoint


def train(
    cfg: Config,
    output_dir: str | Path | None = None,
    progress: bool | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> RunResult:
    """Run `cfg.train.max_steps` steps of RL; write metrics and a final checkpoint.

    With `resume`, continue from the latest checkpoint in the output directory. Without it,
    an output directory holding an earlier run is refused, or with `overwrite` emptied of it."""
    if resume:
        check_resumable(cfg, output_dir)
    else:
        claim_output_dir(Path(output_dir or cfg.output_dir), overwrite)
    preflight(cfg)
    if cfg.gateway.enabled:  # agent programs play the episodes through the HTTP gateway
        from forge.run.gateway import train_gateway  # imported here: it loads the web server

        return train_gateway(cfg, output_dir, progress, resume)
    if cfg.train.mode == "async":
        return train_async(cfg, output_dir, progress, resume)
    return train_sync(cfg, output_dir, progress, resume)


def check_resumable(cfg: Config, output_dir: str | Path | None = None) -> None:
    """What `--resume` of `output_dir` (default `cfg.output_dir`) needs, checked without
    starting anything (`forge train --dry-run` and the run alike): a checkpoint to continue
    from, with its files whole, of the model this config gives."""
    folder = Path(output_dir or cfg.output_dir)
    check_checkpoint(latest_checkpoint(folder))
    check_resumed_model(folder, cfg.to_dict()["model"])


def preflight(cfg: Config, wait_for_servers: bool = True) -> str:
    """Refuse what cannot run, before Ray starts (also what `forge train --dry-run` checks):
    engine settings, remote vLLM / SGLang servers (each answers, serves model.path and holds
    rollout.max_context_tokens), model.path (a folder the in-process engine can serve, with a tokenizer Forge can use), the
    gateway's mode, the env built with its kwargs and reset once, and the sandbox level its
    code needs (`sandbox.min_level`, level 1 for untrusted code unless `sandbox.allow_level_0`).
    A dry run (`wait_for_servers` false) does not wait for remote servers still starting.
    Returns the env check's one-line summary."""
    from transformers import AutoConfig

    from forge.env.preflight import preflight_env
    from forge.env.registry import resolve_env
    from forge.env.tokens import first_prompt_check, load_check_tokenizer
    from forge.metrics import require_wandb
    from forge.models.loading import (
        checkpoint_folder,
        load_tokenizer,
        refuse_missing_lora_targets,
        refuse_tokenizer_past_embeddings,
        resolve_device,
    )
    from forge.models.tiny import build_model_config
    from forge.rollout.chat import check_chat_format
    from forge.rollout.engines.engine_check import refuse_context_past_positions, refuse_unservable
    from forge.rollout.engines.engine_config import check_engine_config
    from forge.rollout.engines.server_check import check_servers
    from forge.run.held_out import held_out_tasks
    from forge.sandbox.policy import configure_for_env
    from forge.train.trainer import (
        bfloat16_weights_note,
        check_trainable_dtype,
        learning_rate_note,
        off_policy_note,
    )

    check_engine_config(cfg)
    check_trainable_dtype(cfg.model)
    if cfg.logging.wandb_project:
        require_wandb()
    held_out_tasks(cfg)  # a wrong eval.tasks file: before anything starts
    for note in (bfloat16_weights_note(cfg.model, cfg.train), off_policy_note(cfg.train)):
        if note:
            print(f"forge: {note}", file=sys.stderr)
    if cfg.model.device == "cuda" and not os.environ.get("RAY_ADDRESS"):
        # A local Ray runs every actor on this machine: without a GPU torch can see here, each
        # would fail its start, each with its own traceback on the console.
        resolve_device("cuda")
    for line in check_servers(cfg, wait=wait_for_servers):
        print(f"forge: {line}", file=sys.stderr)
    if cfg.model.path is None:  # the tiny model's tokenizer, as the run will build it
        tokenizer, model_name = load_check_tokenizer(None, cfg.model.tiny.extra_words)
        refuse_missing_lora_targets(build_model_config(cfg.model.tiny, tokenizer), cfg.model)
    else:
        # A wrong folder, or a hub id not in this node's cache that cannot be downloaded: before
        # anything starts (downloaded here, the run's actors on this node find it in the cache).
        folder = checkpoint_folder(cfg.model.path, cfg.model.revision)
        refuse_unservable(cfg.model.path, cfg.rollout.engine, folder)
        # No tokenizer, chat template or eos token, or a template that ends a turn with another
        # token: said here, not by each actor or each episode.
        tokenizer, model_name = load_tokenizer(folder), cfg.model.path
        check_chat_format(tokenizer, folder)
        refuse_context_past_positions(cfg.model.path, folder, cfg.rollout.max_context_tokens)
        model_config = AutoConfig.from_pretrained(str(folder))
        refuse_tokenizer_past_embeddings(tokenizer, model_config, folder)
        refuse_missing_lora_targets(model_config, cfg.model)
        if note := learning_rate_note(cfg.train, cfg.model, model_config):
            print(f"forge: {note}", file=sys.stderr)
    prompt_check = first_prompt_check(
        tokenizer, model_name, cfg.env.name, cfg.rollout.max_context_tokens, cfg.rollout.max_new_tokens
    )
    if cfg.gateway.enabled and cfg.train.mode != "sync":
        raise ConfigError("gateway runs train in sync mode only; set train.mode: sync")
    summary = preflight_env(cfg.env, cfg.seed, prompt_check)  # a wrong env name, kwargs or reset: one message
    if cfg.swarm.enabled:
        from forge.rollout.spawn import swarm_env_problem

        problem = swarm_env_problem(resolve_env(cfg.env.name), cfg.env.name)
        if problem:  # said by every rollout worker's start otherwise, after Ray started
            raise ConfigError(problem)
    # The sandbox floor the run applies at start: an env that runs model code on a host that
    # gives only level 0 is refused by a dry run too, not only once the run starts.
    configure_for_env(cfg.sandbox, resolve_env(cfg.env.name), cfg.env.name)
    return summary
