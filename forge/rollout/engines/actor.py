"""`EngineActor`: `forge serve` inside a Ray actor, one of the engines Forge starts itself
(`rollout.engine: server`), and how the driver starts one (its resources, seed and Ray name)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from forge.config import Config

# Every call to an engine actor runs on one thread, one at a time (so weight updates never
# overlap), except these reads, which must answer while a weight update holds that thread
# waiting for the running generation batch to end: they run on a thread of their own.
READS = "reads"


class EngineActor:
    """`forge serve` inside a Ray actor: the HTTP server runs on a thread; weights arrive
    through the object store (the trainer's packed tensors) without an HTTP hop."""

    def __init__(self, model_path: str, cfg: Config, seed: int, num_threads: int = 1) -> None:
        import torch

        from forge.actor_errors import quiet_known_creation_errors
        from forge.models.loading import node_checkpoint_folder
        from forge.rollout.engines.server import EngineServer, make_service

        quiet_known_creation_errors()  # the driver says a refusal here in one line (EnginePool.start)
        torch.set_num_threads(num_threads)
        # A hub id this node cannot resolve fails here with the hub's message (make_service's
        # own resolution is then a cached look-up).
        node_checkpoint_folder(model_path, cfg.model.revision, "inference engine")
        rollout = cfg.rollout
        self.service = make_service(
            model_path,
            max_new_tokens=rollout.max_new_tokens,
            max_context_tokens=rollout.max_context_tokens,
            prefill_chunk_tokens=rollout.prefill_chunk_tokens,
            temperature=rollout.temperature,
            top_p=rollout.top_p,
            cache_tokens=rollout.prefix_cache_tokens,
            seed=seed,
            model_cfg=cfg.model,
            attn_implementation=rollout.attn_implementation,
        )
        self.server = EngineServer(self.service, host=rollout.engine_host, port=0).start()

    def url(self) -> str:
        return self.server.url

    def get_policy_version(self) -> int:
        # On the calls' thread, not READS: the sync asks it to learn whether that thread, the
        # one a weight update needs, answers (EnginePool._answering).
        return self.service.served.policy_version

    def set_weights(self, weights: Any, version: int, timeout_s: float | None = None) -> int:
        """New weights from the object store, between batches (TimeoutError if a batch still
        runs after `timeout_s`: nothing is loaded, and the actor is free again)."""
        from forge.weights import unpack_weights

        self.service.served.update(lambda: unpack_weights(weights), version, timeout_s)
        return version

    def metrics(self) -> dict[str, Any]:
        """The served engine's counters; asked on the READS thread (`ask_metrics`), this reads
        them under ServedEngine's lock, as its HTTP server's /forge/metrics does."""
        return self.service.served.metrics()

    def model_bytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for t in self.service.served.engine.model.state_dict().values()
        )

    def join_weight_group(
        self, host: str, port: int, rank: int, world_size: int, timeout_s: float = 600.0
    ) -> None:
        from forge.rollout.engines.broadcast import WeightGroup

        self.weight_group = None  # the last group is never used again
        self.weight_group = WeightGroup(host, port, rank, world_size, timeout_s)

    def receive_weights(self, names: list[str], version: int, timeout_s: float | None = None) -> int:
        """New weights broadcast by the trainer, straight into the model, between batches
        (TimeoutError if a batch still runs after `timeout_s`: the broadcast is left to fail)."""
        served = self.service.served
        served.update(
            lambda: self.weight_group.receive(served.engine.model.state_dict(), names), version, timeout_s
        )
        return version

    def can_take_weights(self, wait_s: float) -> bool:
        """Whether a weight update could start within `wait_s` (no generation batch stuck)."""
        try:
            self.service.served.pause(wait_s)
        except TimeoutError:
            return False
        self.service.served.resume()
        return True

    def load_weight_folder(self, path: str, version: int, timeout_s: float | None = None) -> int:
        from forge.rollout.engines.updates import checkpoint_state

        self.service.served.update(lambda: checkpoint_state(path), version, timeout_s)
        return version

    def next_token_logprobs(self, token_ids: list[int]) -> list[float]:
        return self.service.served.next_token_logprobs(token_ids).tolist()

    def stop(self) -> None:
        self.server.stop()


def start_engine(cfg: Config, model_path: Path | str | None, index: int, name: str) -> Any:
    """Engine actor `index`, serving `model_path` (a folder, or a hub id it resolves itself)."""
    import ray

    from forge.models.loading import actor_env

    env_vars = actor_env(cfg.model)
    return (
        ray.remote(concurrency_groups={READS: 1})(EngineActor)
        .options(
            num_cpus=cfg.rollout.num_cpus_per_engine,
            num_gpus=cfg.rollout.num_gpus_per_engine,
            name=name,
            **({"runtime_env": {"env_vars": env_vars}} if env_vars else {}),
        )
        .remote(
            str(model_path), cfg, cfg.seed + 7919 * (index + 1), max(1, int(cfg.rollout.num_cpus_per_engine))
        )
    )


def ask_metrics(actor: Any) -> Any:
    """A read of engine actor `actor`'s counters (`EngineActor.metrics`) that a weight update
    holding the actor does not queue behind: an ObjectRef."""
    return actor.metrics.options(concurrency_group=READS).remote()


def engine_actor_name(index: int) -> str:
    """The Ray name of this driver's engine actor `index` (unique per driver process)."""
    return f"forge-engine-{os.getpid()}-{index}"
