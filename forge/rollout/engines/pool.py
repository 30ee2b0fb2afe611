"""`EnginePool`: the engines of a run with `rollout.engine: server | remote`, seen from the
driver: `forge serve` Ray actors that Forge starts itself (`server`), or servers someone else
runs (`remote`). Each weight sync reaches every live one (actor_sync.py, server_sync.py); an
engine that died or stalled is dropped with a console line, and a dropped one that answers
again (health.py) gets the current weights at a later sync and serves again."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from forge.actor_errors import actor_hub_message, known_refusal
from forge.config import Config, ConfigError
from forge.env.output import console
from forge.rollout.engines.actor import ask_metrics, engine_actor_name, start_engine
from forge.rollout.engines.actor_sync import ActorWeights, weight_sync_method
from forge.rollout.engines.engine_config import check_engine_config
from forge.rollout.engines.health import ProbeSchedule, actors_ready, drop_failed, servers_answer
from forge.rollout.engines.router import EngineView
from forge.rollout.engines.server_keys import ServerKeys
from forge.rollout.engines.server_sync import ServerWeights

# An engine actor answers a read of its counters at once, a weight update in it or not
# (`ask_metrics`), unless its process is stalled whole (GIL held, stopped); the step's metrics
# wait this long for a new read, then go on without its counts.
METRICS_WAIT_S = 5.0
PREFIX_CACHE_COUNTERS = (
    "prefix_cache_hit_tokens",
    "prompt_tokens",
    "prefix_cache_evictions",
    "prefix_cache_tokens",
)


class EnginePool:
    """The run's engines, seen from the driver."""

    def __init__(
        self, urls: list[str], actors: list[Any], cfg: Config, model_path: Path | str | None = None
    ) -> None:
        self.urls = urls
        self.actors = actors  # server mode: the EngineActors, same order as urls
        self.cfg = cfg
        self.model_path = model_path
        self.dead: dict[str, str] = {}
        self.held: dict[str, int] = {}  # url -> the weights version it last took from this pool
        self.readmitted = 0  # dropped engines that took the weights again
        self.stalled: set[str] = set()  # server mode: dropped engine actors still alive, asked again
        self.probes = ProbeSchedule()  # when each dropped engine is asked again
        self.actor_weights = ActorWeights(cfg.rollout.weight_dir, self.lost)  # server mode
        self.server_weights = ServerWeights(  # remote mode: weights to servers someone else runs
            cfg.model.path or "policy",
            cfg.model.lora.enabled,
            cfg.rollout.weight_dir,
            self.lost,
            ServerKeys.of(cfg.rollout),
        )
        self.restarts = 0
        self._metrics_asks: dict[str, Any] = {}  # url -> a read of its metrics not answered yet
        self._metrics_missing: set[str] = set()  # urls already named on the console for it

    @classmethod
    def start(cls, cfg: Config, model_path: Path | str) -> EnginePool:
        import ray

        check_engine_config(cfg)
        if cfg.rollout.engine == "remote":
            return cls(list(cfg.rollout.servers), [], cfg)
        actors = [
            start_engine(cfg, model_path, index, engine_actor_name(index))
            for index in range(cfg.rollout.num_engines)
        ]
        try:
            urls = ray.get([actor.url.remote() for actor in actors])
        except Exception as exc:
            for actor in actors:  # those still loading would hold their CPUs and GPUs until Ray stops
                ray.kill(actor)
            # A setting every engine refuses alike, whose traceback the actor kept off the
            # console; a hub id its node lacks is told as the trainer's (forge.run.faults).
            if actor_hub_message(exc) is None and (message := known_refusal(exc)) is not None:
                raise ConfigError(message) from None
            raise
        return cls(urls, actors, cfg, model_path)

    @property
    def live_urls(self) -> list[str]:
        return [url for url in self.urls if url not in self.dead]

    def holders(self, version: int) -> list[str]:
        """The servers that took weights `version` and are not lost since (workers take back a
        server they dropped only if it is one of these)."""
        if self.actors:  # Forge's own actors: every live one took it, or was lost
            return self.live_urls
        return [url for url in self.urls if url not in self.dead and self.held.get(url) == version]

    def view(self, version: int) -> EngineView:
        """What the routers route by after weights `version` were sent (`EngineView`): every
        engine, those started in place of lost ones included, and the ones that took it."""
        return EngineView(version, self.cfg.model.lora.enabled, self.holders(version), list(self.urls))

    def engine_metrics(self) -> dict[str, float]:
        """`engine_servers_live`: servers holding the last version sent; `engine_servers_readmitted`:
        servers taken back so far, lost ones and those restarted between two pushes
        (`ServerWeights.restarted`)."""
        if not self.held:
            return {}
        latest = max(self.held.values())
        return {
            "engine_servers_live": float(len(self.holders(latest))),
            "engine_servers_readmitted": float(self.readmitted),
        }

    def lost(self, url: str, reason: str, stalled: bool = False) -> None:
        """Drop engine `url` for `reason`. A dead engine actor is replaced (up to
        rollout.max_engine_restarts); one alive but `stalled` is not (it still holds its CPUs
        and GPU) and is asked again at later syncs (`_revive_actors`), as remote servers are."""
        if url in self.dead:
            return
        self.dead[url] = reason
        print(
            f"forge: engine {url} lost ({reason}); {len(self.live_urls)} of {len(self.urls)} engines remain",
            file=console(),
            flush=True,
        )
        if self.actors and stalled:
            self.stalled.add(url)
        elif self.actors and self.restarts < self.cfg.rollout.max_engine_restarts:
            try:
                self._restart(self.urls.index(url))
            except Exception as exc:  # the replacement failed to start: go on with the others
                print(
                    f"forge: a new engine in place of {url} did not start ({type(exc).__name__}: {exc})",
                    file=console(),
                    flush=True,
                )
        self.probes.dropped(url)
        if self.actors and not self.live_urls and not self.stalled:  # else `sync` waits for one to come back
            raise RuntimeError(
                f"all {len(self.urls)} inference engines are lost ({self.dead}); the run stops"
            )

    def _restart(self, index: int) -> None:
        """Start a new engine in place of lost engine `index` (it gets the weights at this sync)."""
        import ray

        self.restarts += 1
        name = f"{engine_actor_name(index)}-restart{self.restarts}"
        actor = start_engine(self.cfg, self.model_path, index, name)
        url = ray.get(actor.url.remote(), timeout=self.cfg.rollout.engine_timeout_s * 5)
        self.urls.append(url)
        self.actors.append(actor)
        print(
            f"forge: engine {url} started in place of {self.urls[index]} "
            f"({self.restarts} of rollout.max_engine_restarts={self.cfg.rollout.max_engine_restarts})",
            file=console(),
            flush=True,
        )

    def sync(
        self, wrapped: list[Any], version: int, trainer: Any = None, timeout_s: float | None = None
    ) -> None:
        """Get weights `version` to every live engine: engine actors by `weight_sync_method`
        (ActorWeights); remote forge servers as pushed tensors, SGLang servers from a folder
        (LoRA: an adapter folder, as vLLM servers in a LoRA run; ServerWeights). With every
        engine lost (some only stalled), waits up to rollout.engine_timeout_s for one to answer
        again, then raises RunStopped naming them."""
        timeout_s = timeout_s or self.cfg.rollout.engine_timeout_s
        if not self.actors:
            self._sync_servers(wrapped, version, trainer, timeout_s)
            return
        lost_wait_s = self.cfg.rollout.engine_timeout_s
        deadline = None
        while True:
            revived = self._revive_actors(every=deadline is not None)
            known = len(self.urls)
            method = weight_sync_method(self.cfg.rollout.weight_sync, self.cfg.train.mode, trainer)
            self.actor_weights.send(
                lambda: self._answering(timeout_s), method, wrapped, version, trainer, timeout_s
            )
            while len(self.urls) > known:  # engines started in place of ones lost during the sync
                fresh = list(zip(self.urls[known:], self.actors[known:], strict=True))
                known = len(self.urls)
                self.actor_weights.by_object_store(fresh, wrapped, version, timeout_s)
            for url in revived:
                if url not in self.dead:
                    self.readmitted += 1
                    print(
                        f"forge: engine {url} took weights version {version} and serves again "
                        f"({len(self.live_urls)} of {len(self.urls)} engines live)",
                        file=console(),
                        flush=True,
                    )
            if self.live_urls:
                return
            if deadline is None:
                print(
                    f"forge: every inference engine is lost; waiting up to {lost_wait_s:g}s "
                    "(rollout.engine_timeout_s) for a stalled one to answer again",
                    file=console(),
                    flush=True,
                )
                deadline = time.monotonic() + lost_wait_s
            elif time.monotonic() >= deadline:
                from forge.failures import RunStopped

                raise RunStopped(
                    f"all {len(self.urls)} inference engines are lost and none answered again within "
                    f"rollout.engine_timeout_s={lost_wait_s:g}s ({self.dead}); the run stops"
                )
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    def _revive_actors(self, every: bool) -> list[str]:
        """Ask the engine actors dropped as stalled that are due (all of them with `every`)
        whether they could take weights now (within READMIT_PROBE_S, at once); those that can
        count as live again, to get this sync's weights. One still stalled is asked at doubling
        waits; one that died meanwhile is not asked again."""
        due = self.probes.due([url for url in self.urls if url in self.stalled], every)
        if not due:
            return []
        answers = actors_ready([self.actors[self.urls.index(url)] for url in due])
        back = []
        for url, ready in zip(due, answers, strict=True):
            if ready is None:  # it died meanwhile
                self.stalled.discard(url)
            elif self._answered(url, ready):
                back.append(url)
        return back

    def _answering(self, timeout_s: float) -> list[tuple[str, Any]]:
        """The engines not known lost that still answer (a dead one would stall a broadcast)."""
        live = [
            (url, actor) for url, actor in zip(self.urls, self.actors, strict=True) if url not in self.dead
        ]
        probes = [(url, actor.get_policy_version.remote()) for url, actor in live]
        known = len(self.urls)
        drop_failed(probes, timeout_s, "it does not answer", self.lost)
        answering = [(url, actor) for url, actor in live if url not in self.dead]
        return answering + list(zip(self.urls[known:], self.actors[known:], strict=True))  # started meanwhile

    def _sync_servers(self, wrapped: list[Any], version: int, trainer: Any, timeout_s: float) -> None:
        """Remote servers: the live ones and those that answer again get `version`. With none
        taking it, every lost server is asked again each second for up to
        rollout.engine_timeout_s; then the run stops naming them."""
        deadline = time.monotonic() + self.cfg.rollout.engine_timeout_s
        waiting = False
        while True:
            revived = set(self._revive(every=waiting))
            targets = self.live_urls
            restarted: dict[str, int] = {}
            if targets:
                asked = [url for url in targets if url not in revived]
                restarted = asyncio.run(self.server_weights.restarted(asked, self.held))
                asyncio.run(self.server_weights.push(self.live_urls, wrapped, version, trainer, timeout_s))
            for url in targets:
                if url not in self.dead:
                    self.held[url] = version
                    if url in revived or url in restarted:
                        self.readmitted += 1
                        print(
                            f"forge: engine {url} took weights version {version} and serves again "
                            f"({len(self.holders(version))} of {len(self.urls)} engines live)",
                            file=console(),
                            flush=True,
                        )
            if self.holders(version):
                return
            if time.monotonic() >= deadline:
                from forge.failures import RunStopped

                raise RunStopped(
                    f"all {len(self.urls)} inference servers are lost and none answered again within "
                    f"rollout.engine_timeout_s={self.cfg.rollout.engine_timeout_s:g}s ({self.dead}); the run stops: "
                    "restart them, or check rollout.servers"
                )
            if not waiting:
                print(
                    f"forge: every inference server is lost; waiting up to {self.cfg.rollout.engine_timeout_s:g}s "
                    "(rollout.engine_timeout_s) for one to answer again",
                    file=console(),
                    flush=True,
                )
                waiting = True
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    def _revive(self, every: bool) -> list[str]:
        """Ask the lost remote servers that are due (all of them with `every`) whether they
        answer GET /health again (PROBE_TIMEOUT_S each, at once); those that do count as live
        again, to get this sync's weights. A server still down is asked at doubling waits."""
        due = self.probes.due(list(self.dead), every)
        if not due:
            return []
        answers = servers_answer(due, self.cfg.model.path or "policy", ServerKeys.of(self.cfg.rollout))
        return [url for url, healthy in zip(due, answers, strict=True) if self._answered(url, healthy)]

    def _answered(self, url: str, ready: bool) -> bool:
        """A lost engine's answer to a re-admission probe: ready -> live again, to get this
        sync's weights; not -> asked again after a doubled wait."""
        if not ready:
            self.probes.not_answered(url)
            return False
        del self.dead[url]
        self.stalled.discard(url)
        print(
            f"forge: engine {url} answers again; it gets the current weights now", file=console(), flush=True
        )
        return True

    def metrics(self) -> dict[str, dict[str, float]]:
        """Each live server-mode engine's prefix-cache counters (since it started), by url
        (remote ones report through the trajectories' own counts). An engine actor answers
        while a weight update holds it; one stalled whole is left out after METRICS_WAIT_S,
        with a console line the first time: a step's metrics never wait on it longer, nor stop
        the run; the sync drops it if it is still stuck then. Its unanswered read is not asked
        again but only looked at (no wait) at later steps, so a stalled engine costs the run
        one METRICS_WAIT_S, not one per step."""
        import ray

        live = [
            (url, actor) for url, actor in zip(self.urls, self.actors, strict=False) if url not in self.dead
        ]
        for url in self.dead:  # an engine taken back is asked afresh: an old answer predates its drop
            self._metrics_asks.pop(url, None)
            self._metrics_missing.discard(url)
        unanswered = {url: self._metrics_asks.pop(url) for url, _ in live if url in self._metrics_asks}
        fresh = {url: ask_metrics(actor) for url, actor in live if url not in unanswered}
        ended = []
        for asks, wait_s in ((fresh, METRICS_WAIT_S), (unanswered, 0)):
            if asks:
                ended += ray.wait(list(asks.values()), num_returns=len(asks), timeout=wait_s)[0]
        counters: dict[str, dict[str, float]] = {}
        for url, ask in {**fresh, **unanswered}.items():
            if ask not in ended:
                self._metrics_asks[url] = ask
                if url not in self._metrics_missing:
                    self._metrics_missing.add(url)
                    print(
                        f"forge: engine {url} gave no metrics within {METRICS_WAIT_S:g}s (its process is stalled); "
                        "its prefix-cache counts are missing from the step metrics until it answers",
                        file=console(),
                        flush=True,
                    )
                continue
            self._metrics_missing.discard(url)
            try:
                reply = ray.get(ask)
            except Exception:  # died: the next sync finds it lost and replaces it
                continue
            counters[url] = {key: float(reply[key]) for key in PREFIX_CACHE_COUNTERS}
        return counters

    def shutdown(self) -> None:
        import ray

        if not self.actors:  # remote servers are someone else's to stop
            return
        live = [actor for url, actor in zip(self.urls, self.actors, strict=True) if url not in self.dead]
        # Stop the HTTP servers first: killing an actor with its server thread running prints
        # abseil mutex noise on the console.
        ray.wait([actor.stop.remote() for actor in live], num_returns=len(live), timeout=5.0)
        for actor in self.actors:
            ray.kill(actor)

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        for url in self.live_urls:
            base = url.split("+", 1)[1] if "+" in url.split("://")[0] else url
            while True:
                try:
                    if httpx.get(f"{base}/health", timeout=5.0).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"engine {url} did not answer /health within {timeout_s:.0f}s")
                time.sleep(0.5)
