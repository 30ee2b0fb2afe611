"""Weights to Forge's own engine actors (`rollout.engine: server`): through the object store,
a checkpoint folder the trainer writes, or a gloo broadcast group of the trainer and the
engines; an engine whose part fails is dropped, naming why."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from forge.env.output import console
from forge.rollout.engines.health import Drop, drop_failed, said

# A weight broadcast's every side (trainer, engines) ends by gloo's own timeout
# (rollout.engine_timeout_s); the driver waits this much longer for them to say so before it
# counts an engine that has not answered as stalled whole.
BROADCAST_GRACE_S = 10.0
# An engine actor's weight update gives up by itself after rollout.engine_timeout_s (a
# generation batch it cannot pause); the driver waits this much longer to hear it say so.
UPDATE_GRACE_S = 2.0

# rollout.weight_sync: auto, the fastest in bench/results/weight_sync.json (0.5B Qwen2
# shape, 2 engines, CPU, 5 alternated rounds, idle machine): the object store for every case.
# Full weights fp32 0.55 s (a folder 0.89 s, a gloo broadcast 1.62 s), bf16 0.32 s (0.44 s,
# 0.84 s); LoRA adapters (8.6 MB) about 0.02 s by the object store or a folder alike, broadcast
# 0.16-0.19 s (its cost is per-tensor latency). Engines on GPUs (num_gpus_per_engine > 0)
# take the object store too: the broadcast group is gloo (forge/rollout/engines/broadcast.py),
# so it also passes every tensor through host memory, and it was the slower of the two.


def weight_sync_method(chosen: str, train_mode: str, trainer: Any) -> str:
    """How weights travel to server-mode engines: `chosen` (rollout.weight_sync), or with `auto`
    the fastest path measured for this case (bench/results/weight_sync.json)."""
    if train_mode == "async":
        # The published (packed) weights are exactly this version's; the trainer's own
        # may be a queued step further by the time it would write or send them.
        return "object_store"
    if chosen == "auto":
        chosen = "object_store"
    if chosen == "broadcast" and hasattr(trainer, "actors"):
        return "object_store"  # a data-parallel trainer group (one rank would have to send)
    return chosen


class ActorWeights:
    """The driver's side of weight updates to engine actors; it keeps the broadcast group (its
    members and the weight names it sends) from one sync to the next."""

    def __init__(self, weight_dir: str | None, lost: Drop) -> None:
        self.weight_dir = weight_dir  # rollout.weight_dir: where the folder path writes
        self.lost = lost
        self._group_members: list[str] | None = None
        self._names: list[str] = []

    def send(
        self,
        answering: Callable[[], list[tuple[str, Any]]],
        method: str,
        wrapped: list[Any],
        version: int,
        trainer: Any,
        timeout_s: float,
    ) -> None:
        """Weights `version` by `method` to the engines (url, actor) that `answering` finds
        still answering (asked again when a broadcast fails with no engine to blame, and the
        version goes through the object store instead)."""
        import ray
        from ray.exceptions import RayError

        from forge.rollout.engines.broadcast import BroadcastFailed

        live = answering()
        if not live:
            return
        if method == "broadcast":
            try:
                self._broadcast(live, trainer, version, timeout_s)
                calls = []
            except (
                BroadcastFailed,
                RayError,
            ) as exc:  # no engine to blame: regroup next time, send this one plainly
                print(
                    f"forge: weight broadcast failed ({type(exc).__name__}: {str(exc)[:200]}); "
                    "this version goes through the object store",
                    file=console(),
                    flush=True,
                )
                self._group_members = None
                live = answering()
                calls = self._set_weights(live, wrapped, version, timeout_s)
        elif method == "folder":
            from forge.rollout.engines.broadcast import trainer_save

            folder = self._weight_folder(version)
            path = ray.get(trainer.__ray_call__.remote(trainer_save, folder), timeout=timeout_s)
            calls = [(url, actor.load_weight_folder.remote(path, version, timeout_s)) for url, actor in live]
        else:
            calls = self._set_weights(live, wrapped, version, timeout_s)
        drop_failed(calls, timeout_s + UPDATE_GRACE_S, "weight update failed", self.lost)
        if method == "folder":
            import shutil

            shutil.rmtree(self._weight_folder(version), ignore_errors=True)

    def by_object_store(
        self, live: list[tuple[str, Any]], wrapped: list[Any], version: int, timeout_s: float
    ) -> None:
        """Weights `version` through the object store to the engines `live` (url, actor)."""
        drop_failed(
            self._set_weights(live, wrapped, version, timeout_s),
            timeout_s + UPDATE_GRACE_S,
            "weight update failed",
            self.lost,
        )

    def _set_weights(
        self, live: list[tuple[str, Any]], wrapped: list[Any], version: int, timeout_s: float
    ) -> list[tuple[str, Any]]:
        return [(url, actor.set_weights.remote(wrapped[0], version, timeout_s)) for url, actor in live]

    def _weight_folder(self, version: int) -> str:
        import tempfile

        root = self.weight_dir or str(Path(tempfile.gettempdir()) / f"forge-weights-{os.getpid()}")
        return str(Path(root) / f"v{version:06d}")

    def _broadcast(self, live: list[tuple[str, Any]], trainer: Any, version: int, timeout_s: float) -> None:
        """Broadcast from the trainer to every live engine, in a group formed at the first
        sync (and again whenever its members change: a group cannot shrink). Every step ends
        within `timeout_s` (rollout.engine_timeout_s), gloo enforcing it on every side. A round
        that fails is put down to the engines that stalled it (no answer by then, or a
        generation batch they could not pause), died, or failed their part: each is dropped,
        naming why, and the others take the version at once in a new group without them.
        Raises BroadcastFailed when no engine is to blame (the caller sends it another way)."""
        while live:
            causes = self._broadcast_round(live, trainer, version, timeout_s)
            for url, (reason, stalled) in causes.items():
                self.lost(
                    url,
                    f"{reason}; the others take version {version} in a new broadcast group without it",
                    stalled,
                )
            if not causes:
                return
            live = [(url, actor) for url, actor in live if url not in causes]

    def _broadcast_round(
        self, live: list[tuple[str, Any]], trainer: Any, version: int, timeout_s: float
    ) -> dict[str, tuple[str, bool]]:
        """One try of `_broadcast`: the engines that made it fail, each with why and whether it
        is alive (stalled) rather than dead; empty when every engine took the version."""
        import ray

        from forge.rollout.engines.broadcast import trainer_address, trainer_join, trainer_send

        members = [url for url, _ in live]
        if self._group_members != members:
            # A fresh group, on a fresh port, also after a failed round: a gloo group whose
            # collective failed or timed out cannot be used again (see BroadcastFailed).
            self._group_members = None
            host, port = ray.get(trainer.__ray_call__.remote(trainer_address), timeout=timeout_s)
            world = len(live) + 1
            joins = [
                actor.join_weight_group.remote(host, port, rank + 1, world, timeout_s)
                for rank, (_, actor) in enumerate(live)
            ]
            joined = trainer.__ray_call__.remote(trainer_join, host, port, world, timeout_s)
            names, causes = self._await_group(
                "forming the weight broadcast group", joined, members, joins, timeout_s
            )
            if causes:
                return causes
            self._names, self._group_members = names, members
        receiving = [actor.receive_weights.remote(self._names, version, timeout_s) for _, actor in live]
        sent = trainer.__ray_call__.remote(trainer_send, self._names)
        _, causes = self._await_group("the weight broadcast", sent, members, receiving, timeout_s)
        if causes:
            self._group_members = None
        return causes

    def _await_group(
        self, step: str, trainer_ref: Any, members: list[str], refs: list[Any], timeout_s: float
    ) -> tuple[Any, dict[str, tuple[str, bool]]]:
        """Wait for the trainer's side of `step` and each member's, all at once, up to
        `timeout_s` + BROADCAST_GRACE_S: (the trainer's result, the members to blame for a
        failure: {url: (why, stalled)}). A member whose own side failed in the collective
        (BroadcastFailed) waited on another and is not to blame; with a failure and nobody to
        blame, raises BroadcastFailed."""
        import ray
        from ray.exceptions import RayActorError

        from forge.rollout.engines.broadcast import BroadcastFailed

        wait_s = timeout_s + BROADCAST_GRACE_S
        ended, _ = ray.wait([trainer_ref, *refs], num_returns=len(refs) + 1, timeout=wait_s)
        causes: dict[str, tuple[str, bool]] = {}
        failures: list[str] = []
        for url, ref in zip(members, refs, strict=True):
            if ref not in ended:
                causes[url] = (
                    f"it stalled {step}: no answer within {wait_s:g}s (rollout.engine_timeout_s)",
                    True,
                )
                continue
            try:
                ray.get(ref)
            except BroadcastFailed as exc:
                failures.append(f"{url}: {said(exc)}")
            except RayActorError as exc:
                causes[url] = (f"it died during {step} ({type(exc).__name__})", False)
            except Exception as exc:  # its own part failed, e.g. a generation batch it could not pause
                causes[url] = (f"it failed its part of {step} ({said(exc)})", True)
        result = None
        if trainer_ref not in ended:
            failures.append(f"the trainer did not end its side within {wait_s:g}s")
        else:
            try:
                result = ray.get(trainer_ref)
            except Exception as exc:
                failures.append(f"trainer: {said(exc)}")
        if failures and not causes:
            raise BroadcastFailed(f"{step} failed with no engine to blame ({'; '.join(failures)})")
        return result, causes
