"""The settings of a run's engine servers (`rollout.engine: server | remote`, `rollout.servers`,
`rollout.weight_sync`) that cannot work together, refused before any actor starts."""

from __future__ import annotations

from forge.config import Config, ConfigError


def check_engine_config(cfg: Config) -> None:
    """Refuse settings that cannot work before any actor starts."""
    rollout = cfg.rollout
    if rollout.engine != "inprocess" and cfg.train.mode == "async":
        if rollout.weight_sync in ("folder", "broadcast"):
            raise ConfigError(
                f"rollout.weight_sync={rollout.weight_sync} with train.mode=async: the trainer may already be a step "
                "further when it writes or sends, so the engines would get weights newer than the version they "
                "stamp; use rollout.weight_sync=object_store (or auto, which picks it for async runs)"
            )
        if any(s.startswith("sglang+") for s in rollout.servers):
            raise ConfigError(
                "SGLang servers load each version from a folder the trainer writes, which in "
                "train.mode=async may already hold a later step; use train.mode=sync with them"
            )
    if rollout.engine == "remote":
        if not rollout.servers:
            raise ConfigError(
                "rollout.engine=remote needs rollout.servers: [http://host:port, ...] "
                "(forge serve, or vllm+http://... / sglang+http://...)"
            )
        if any(s.startswith("vllm+") for s in rollout.servers):
            if cfg.model.lora.enabled:
                if not rollout.weight_dir:
                    raise ConfigError(
                        "rollout.servers has vLLM servers and model.lora.enabled: each version's adapter "
                        "is written to a folder they load it from (/v1/load_lora_adapter); set "
                        "rollout.weight_dir to a folder the trainer and those servers both see"
                    )
                if cfg.train.mode != "sync" or cfg.train.num_gpus > 1:
                    raise ConfigError(
                        "rollout.servers: vllm+ servers load each adapter version from a folder one "
                        "trainer process writes after its step: use train.mode=sync and "
                        "train.num_gpus <= 1 with them"
                    )
            elif cfg.train.num_gpus < 1 or cfg.train.mode != "sync":
                raise ConfigError(
                    "rollout.servers: vllm+ servers get new weights by an NCCL broadcast from the "
                    "trainer, which needs train.num_gpus=1 (vllm installed beside the trainer) and "
                    "train.mode=sync (an async trainer would send a later step's weights)"
                )
        if any(s.startswith("sglang+") for s in rollout.servers):
            if not rollout.weight_dir:
                raise ConfigError(
                    "rollout.servers has SGLang servers, which load weights from a folder: set "
                    "rollout.weight_dir to a folder the trainer and those servers both see"
                )
            if cfg.model.lora.enabled and cfg.train.num_gpus > 1:
                raise ConfigError(
                    "rollout.servers: sglang+ servers in a LoRA run load each adapter version from a "
                    "folder one trainer process writes after its step: use train.num_gpus <= 1 with them"
                )
    elif rollout.servers:
        raise ConfigError(
            f"rollout.servers is set but rollout.engine={rollout.engine}; set rollout.engine=remote"
        )
