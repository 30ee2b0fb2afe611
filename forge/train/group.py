"""Several data-parallel trainer processes driven as one trainer.

Each rank is a Ray actor (placed by `train.num_cpus` / `train.num_gpus`) running a
`DistributedTrainer`; rank 0's node hosts the torch.distributed rendezvous. The group
answers the calls the run loop (forge.run) makes of a single trainer actor
(`group.train_step.remote(samples)` and so on), so the run loop does not change.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from forge.types import Sample


class TrainerRank:
    """One process of the group; the trainer is built in `setup`, once the rendezvous
    address is known."""

    def __init__(self) -> None:
        self.trainer: Any = None

    def address(self) -> tuple[str, int]:
        import ray

        with socket.socket() as probe:
            probe.bind(("", 0))
            port = probe.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(
        self,
        rank: int,
        world_size: int,
        master_addr: str,
        master_port: int,
        trainer_args: tuple,
        trainer_kwargs: dict[str, Any],
    ) -> int:
        from forge.train.distributed import DistributedTrainer

        # Ray gives each actor its own visible devices, so the local device is always 0.
        os.environ.update(
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK="0",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
        )
        self.trainer = DistributedTrainer(*trainer_args, **trainer_kwargs)
        return self.trainer.world_size

    def train_step(self, samples: list[Sample]) -> dict[str, float]:
        return self.trainer.train_step(samples)

    def publish_weights(self) -> tuple[list[Any], int]:
        return self.trainer.publish_weights()

    def train_and_publish(self, samples: list[Sample]) -> tuple[dict[str, float], list[Any], int]:
        return self.trainer.train_and_publish(samples)

    def save(self, directory: str) -> str:
        return self.trainer.save(directory)

    def save_state(self, directory: str) -> None:
        self.trainer.save_state(directory)

    def load_state(self, directory: str) -> int:
        return self.trainer.load_state(directory)


class _Call:
    def __init__(self, launch: Any) -> None:
        self.remote = launch


class TrainerGroup:
    """`world_size` data-parallel ranks behind the interface of one trainer actor.

    Every rank gets the whole batch (one `ray.put`) and trains on its shard; rank 0 answers
    for the group. Every call goes to every rank: under FSDP2 each holds a shard of the
    weights and optimizer state, and publishing, saving and checkpointing gather them
    (rank 0 alone then publishes or writes). A restore loads the whole state into every
    rank, which keeps its own shard.
    """

    def __init__(
        self,
        world_size: int,
        num_cpus: float,
        num_gpus: float,
        trainer_args: tuple,
        trainer_kwargs: dict[str, Any],
        env_vars: dict[str, str] | None = None,
    ) -> None:
        """`env_vars`: set in every rank's process (forge.models.loading.actor_env)."""
        import ray

        rank_class = ray.remote(TrainerRank)
        runtime_env = {"runtime_env": {"env_vars": env_vars}} if env_vars else {}
        self.actors = [
            rank_class.options(num_cpus=num_cpus, num_gpus=num_gpus, **runtime_env).remote()
            for _ in range(world_size)
        ]
        master_addr, master_port = ray.get(self.actors[0].address.remote())
        setups = [
            actor.setup.remote(rank, world_size, master_addr, master_port, trainer_args, trainer_kwargs)
            for rank, actor in enumerate(self.actors)
        ]
        try:
            joined = _all_or_first_error(setups)
        except Exception:
            # A rank that failed (rank 0 reading the checkpoint, say) leaves the others waiting
            # in a collective for it (FSDP2's broadcast of the weights): end them all.
            for actor in self.actors:
                ray.kill(actor)
            raise
        if joined != [world_size] * world_size:
            raise RuntimeError(
                f"trainer ranks joined process groups of sizes {joined}, expected {world_size} each"
            )
        self.world_size = world_size
        self.train_step = _Call(lambda samples: self._on_every_rank("train_step", ray.put(samples)))
        self.train_and_publish = _Call(
            lambda samples: self._on_every_rank("train_and_publish", ray.put(samples))
        )
        self.publish_weights = _Call(lambda: self._on_every_rank("publish_weights"))
        self.save = _Call(lambda directory: self._on_every_rank("save", directory))
        self.save_state = _Call(lambda directory: self._on_every_rank("save_state", directory))
        self.load_state = _Call(lambda directory: self._on_every_rank("load_state", directory))

    def _on_every_rank(self, method: str, *args: Any) -> Any:
        """Call `method` on every rank; the reference answers with rank 0's result once all
        have finished."""
        return _when_all.remote(*[getattr(actor, method).remote(*args) for actor in self.actors])


def _all_or_first_error(refs: list[Any]) -> list[Any]:
    """The results of `refs`, or the first error as soon as any fails (not once all end)."""
    import ray

    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        ray.get(done)
    return ray.get(refs)


def _first_result(*results: Any) -> Any:
    """Rank 0's answer, once every rank has answered (Ray resolves the arguments first)."""
    return results[0]


class _LazyRemote:
    """`ray.remote` at first use, so importing this module does not need Ray started."""

    def __init__(self, function: Any) -> None:
        self.function = function
        self.wrapped: Any = None

    def remote(self, *args: Any) -> Any:
        import ray

        if self.wrapped is None:
            self.wrapped = ray.remote(num_cpus=0)(self.function)
        return self.wrapped.remote(*args)


_when_all = _LazyRemote(_first_result)
