"""Weights to the servers of a `rollout.engine: remote` run, each kind by its own path: pushed
tensors to `forge serve`, a checkpoint folder to SGLang, vLLM's NCCL weight transfer, and in a
LoRA run each version's adapter folder to vLLM and SGLang; a server whose update fails is
dropped, naming why."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from forge.env.output import console
from forge.rollout.engines.health import Drop
from forge.rollout.engines.router import said_version
from forge.rollout.engines.server_keys import NO_KEYS, ServerKeys

# SGLang servers in a LoRA run keep this many of Forge's adapter versions loaded: the newest
# and the one before, which workers not yet told of the newest still name.
KEPT_ADAPTERS = 2


class ServerWeights:
    """The driver's side of weight updates to remote servers; it keeps what it loaded where
    (SGLang's adapter versions, the vLLM transfer group) from one sync to the next."""

    def __init__(
        self, model: str, lora: bool, weight_dir: str | None, lost: Drop, keys: ServerKeys = NO_KEYS
    ) -> None:
        self.model = model  # the name requests give the base model (model.path)
        self.keys = keys  # the servers' API keys (rollout.server_api_key_env, ...)
        self.lora = lora
        self.weight_dir = weight_dir
        self.lost = lost
        self.adapters: dict[str, list[int]] = {}  # SGLang url -> the adapter versions loaded on it here
        self._vllm: Any = None

    async def restarted(self, urls: list[str], held: dict[str, int]) -> dict[str, int]:
        """The servers among `urls` that say they hold an older version than the driver last
        gave them (`held`; each asked at once, within VERSION_PROBE_TIMEOUT_S), with what they say.
        Such a server restarted since with no push failing, so the driver never saw it
        lost, while a worker's rollout-start check dropped it; this sync takes it back. One
        that cannot say, or does not answer in time, is not counted. In a LoRA run vLLM and
        SGLang servers say whether they still list the adapter (a restart drops it); forge
        serve servers are not asked."""
        from forge.rollout.engines.clients import make_client
        from forge.rollout.engines.remote import Sampling

        given = {url: held[url] for url in urls if held.get(url, 0) > 0}
        clients = [make_client(url, self.model, Sampling(), keys=self.keys) for url in given]
        asked = [client for client in clients if not self.lora or client.kind in ("vllm", "sglang")]
        for client in asked:
            if self.lora:  # it holds the version if it still lists the adapter its requests name
                client.use_adapter(given[client.spec])
        try:
            said = await asyncio.gather(*(said_version(client) for client in asked))
        finally:
            for client in clients:
                await client.close()
        restarted = {}
        for client, says in zip(asked, said, strict=True):
            if says is not None and says < given[client.spec]:
                restarted[client.spec] = says
                print(
                    f"forge: engine {client.spec} says it holds weights version {says}, not "
                    f"{given[client.spec]}: it restarted since the last push",
                    file=console(),
                    flush=True,
                )
        return restarted

    async def push(
        self, urls: list[str], wrapped: list[Any], version: int, trainer: Any, timeout_s: float
    ) -> None:
        """Weights `version` to the servers `urls`, all at once, each kind by its own path."""
        import ray

        from forge.rollout.engines.clients import make_client
        from forge.rollout.engines.remote import EngineLost, ForgeClient, ProtocolError, Sampling
        from forge.rollout.engines.updates import tensors_to_bytes
        from forge.weights import unpack_weights

        # Each client's `spec` is its rollout.servers entry (vllm+http://...), which the pool knows it by.
        clients = [make_client(url, self.model, Sampling(), timeout_s, self.keys) for url in urls]
        # vLLM and SGLang servers in a LoRA run load each version's adapter; vLLM servers
        # otherwise take full weights by NCCL; forge serves the pushed tensors, SGLang a folder.
        adapters = [c for c in clients if self.lora and c.kind in ("vllm", "sglang")]
        nccl = [c for c in clients if c.kind == "vllm" and c not in adapters]
        pushed = [c for c in clients if c not in adapters and c not in nccl]
        try:
            if adapters:
                from forge.rollout.engines.updates import trainer_save_adapter

                target = str(Path(self.weight_dir) / f"v{version:06d}-adapter")
                path = ray.get(trainer.__ray_call__.remote(trainer_save_adapter, target))
                await self.load_adapters(adapters, path, version)
            if nccl:
                await self._vllm_update(nccl, version, trainer, timeout_s)
            blob = folder = None
            if any(isinstance(c, ForgeClient) for c in pushed):
                blob = tensors_to_bytes(unpack_weights(ray.get(wrapped[0])))
            if any(not isinstance(c, ForgeClient) for c in pushed):
                target = Path(self.weight_dir) / f"v{version:06d}"
                folder = ray.get(trainer.save.remote(str(target)))

            async def push(client: Any) -> None:
                try:
                    if isinstance(client, ForgeClient):
                        await client.push_tensors(blob, version)
                    else:
                        await client.load_checkpoint(folder, version)
                except (EngineLost, ProtocolError) as exc:
                    self.lost(getattr(client, "spec", client.url), f"weight update failed: {exc}")

            await asyncio.gather(*(push(client) for client in pushed))  # a stuck one costs the others nothing
        finally:
            for client in clients:
                await client.close()

    async def load_adapters(self, clients: list[Any], path: str, version: int) -> None:
        """LoRA to vLLM and SGLang servers, all at once: each loads this version's adapter
        folder `path` (under rollout.weight_dir), paused around it; a server that fails it is
        dropped. vLLM loads it under one name in place of the last. SGLang keys adapters by
        name (forge-v{version}): the last version stays loaded beside the new one, for the
        workers' requests that still name it (told of this version only after this sync, or
        sent just before), and the one before that is unloaded (`_retire_adapters`)."""
        from forge.rollout.engines.remote import EngineLost, ProtocolError

        async def load(client: Any) -> None:
            try:
                await client.load_adapter(path, version)
            except (EngineLost, ProtocolError) as exc:
                self.lost(getattr(client, "spec", client.url), f"LoRA adapter load failed: {exc}")
                return
            if client.kind == "sglang":
                await self._retire_adapters(client, version)

        await asyncio.gather(*(load(client) for client in clients))

    async def _retire_adapters(self, client: Any, version: int) -> None:
        """After SGLang server `client` loaded `version`: unload every adapter the driver loaded
        on it but the last two. A request naming an unloaded adapter is refused, while SGLang's
        unload itself waits for the requests still running on it, so only an adapter no worker
        names any more goes: workers are told each version before their next rollout, so by
        the time version N+1 loads none names N-1. A failed unload (a restarted server lost
        its adapters; one still draining past PROBE_TIMEOUT_S) costs memory, not correctness."""
        from forge.rollout.engines.remote import PROBE_TIMEOUT_S, EngineLost, ProtocolError

        spec = getattr(client, "spec", client.url)
        loaded = [*self.adapters.get(spec, []), version]
        self.adapters[spec] = loaded[-KEPT_ADAPTERS:]
        for old in loaded[:-KEPT_ADAPTERS]:
            try:
                await client.unload_adapter(old, PROBE_TIMEOUT_S)
            except (EngineLost, ProtocolError):
                pass

    async def _vllm_update(self, clients: list[Any], version: int, trainer: Any, timeout_s: float) -> None:
        """Full weights to vLLM servers by vLLM's NCCL weight transfer (trainer on a GPU,
        vllm installed beside it). A server that does not answer GET /health is dropped first
        (it would fail the shared update for all). Every step of the update, the trainer's
        NCCL rendezvous and broadcast included, ends within `timeout_s` (rollout.engine_timeout_s).
        An update that fails leaves its servers' weights part old, part new: those of them it is
        put down to (`_transfer_causes`: no answer to GET /health, a refusal, their own call
        failing, or no answer where the others' calls ended) are dropped as its cause, and the
        others take the version at once in a group without them; with no cause found, every
        server in it is dropped (and asked again: EnginePool._sync_servers)."""
        from forge.rollout.engines import vllm_transfer
        from forge.rollout.engines.broadcast import trainer_address

        if self._vllm is None:
            if hasattr(trainer, "actors"):
                raise RuntimeError(
                    "vllm+ servers take weights from one trainer process; this run's trainer is a "
                    "data-parallel group (train.num_gpus > 1): use forge or sglang+ servers"
                )
            self._vllm = vllm_transfer.VLLMWeightTransfer(
                join=lambda host, port, world: trainer.__ray_call__.remote(
                    vllm_transfer.trainer_join, host, port, world, timeout_s
                ),
                send=lambda: trainer.__ray_call__.remote(vllm_transfer.trainer_send, timeout_s),
                address=lambda: trainer.__ray_call__.remote(trainer_address),
            )
        clients = await self._answering_health(clients, "no answer to GET /health before the weight update")
        while clients:  # each failed round drops at least one server, or all of them
            try:
                await self._vllm.update(clients, version)
                return
            except vllm_transfer.WeightTransferFailed as exc:
                failure: Exception = exc
                causes = await self._transfer_causes(exc, clients)
            except Exception as exc:  # the trainer's side could not run at all (e.g. no vllm there)
                failure, causes = exc, {}
            if not causes:
                for client in clients:
                    self.lost(
                        getattr(client, "spec", client.url),
                        f"vLLM weight transfer failed: {type(failure).__name__}: {str(failure)[:300]}",
                    )
                return
            for client, reason in causes.items():
                self.lost(
                    getattr(client, "spec", client.url),
                    f"{reason}; the others take version {version} in a new NCCL group without it",
                )
            clients = [client for client in clients if client not in causes]

    async def _transfer_causes(self, failure: Any, clients: list[Any]) -> dict[Any, str]:
        """The servers a failed vLLM weight transfer is put down to, and why: those that no
        longer answer GET /health (dead, or stalled whole); those that refused their part;
        at a step each server takes alone (pause, finish, resume, ...), each whose call
        failed; at a step taken together (the group's forming, the broadcast), each that gave
        no answer while the others' calls ended (a vLLM serves GET /health apart from its
        engine, so a stuck engine still answers it). The others waited in the collective the
        causes left, and get the update again."""
        from forge.rollout.engines.remote import NoAnswer, ProtocolError

        answering = await asyncio.gather(*(client.healthy() for client in clients))
        silent = [isinstance(failure.failed.get(client.url), NoAnswer) for client in clients]
        causes = {}
        for client, ok, quiet in zip(clients, answering, silent, strict=True):
            error = failure.failed.get(client.url)
            said = f" ({type(error).__name__}: {str(error)[:200]})" if error is not None else ""
            if not ok:
                causes[client] = (
                    f"it stalled the vLLM weight transfer at {failure.step}{said} and does not answer GET /health"
                )
            elif isinstance(error, ProtocolError):
                causes[client] = f"it refused its part of the vLLM weight transfer at {failure.step}{said}"
            elif error is not None and not failure.collective:
                causes[client] = (
                    f"it failed its own call of the vLLM weight transfer at {failure.step}{said}, "
                    "though it answers GET /health"
                )
            elif quiet and not all(silent):
                causes[client] = (
                    f"it gave no answer at {failure.step}{said} while the others' calls ended: its engine "
                    "is stuck, though it answers GET /health"
                )
        return causes

    async def _answering_health(self, clients: list[Any], reason: str) -> list[Any]:
        """The clients that answer GET /health; each other one is dropped for `reason`."""
        answering = await asyncio.gather(*(client.healthy() for client in clients))
        for client, ok in zip(clients, answering, strict=True):
            if not ok:
                self.lost(getattr(client, "spec", client.url), reason)
        return [client for client, ok in zip(clients, answering, strict=True) if ok]
