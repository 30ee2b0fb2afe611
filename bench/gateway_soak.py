"""A long-running gateway's memory: many episodes' calls through the `openai` SDK on
loopback against a tiny real model, with each finished episode recorded to disk. Resident
memory is read every `--every` calls; with episodes' KV freed at their end, live episodes
capped (least recently used ended) and finished ones kept only on disk, it levels off.

Every 10th episode is left unfinished by its agent (the cap has to end it). Prints one
JSON object and writes bench/results/gateway_soak.json.

    python -m bench.gateway_soak --calls 10000
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai
import torch

from bench.memory import resident_mb
from bench.report import save_result
from forge.config import ModelConfig, TinyModelConfig
from forge.gateway import Gateway, GatewayServer
from forge.gateway.recording import standalone_store
from forge.models.loading import load_model, load_tokenizer
from forge.models.tiny import save_tiny_checkpoint
from forge.rollout.engines.hf import HFEngine

CALLS_PER_EPISODE, AGENTS = 5, 4


def soak(
    calls: int, every: int = 500, max_live: int = 32, keep_finished: int = 16, workdir: Path | None = None
) -> dict:
    """Play `calls` model calls; resident MB and the gateway's sizes every `every` calls."""
    torch.set_num_threads(1)
    workdir = Path(workdir or tempfile.mkdtemp(prefix="forge-soak-"))
    checkpoint = save_tiny_checkpoint(TinyModelConfig(), workdir / "tiny")
    tokenizer = load_tokenizer(checkpoint)
    engine = HFEngine(load_model(checkpoint, ModelConfig()), [tokenizer.eos_token_id], tokenizer.pad_token_id)
    store = standalone_store(workdir / "recorded", max_live_episodes=max_live, keep_finished=keep_finished)
    gateway = Gateway(engine, tokenizer, store, max_new_tokens=4, max_context_tokens=512, batch_wait_s=0.002)
    done, lock, series, errors = [0], threading.Lock(), [], []

    def agent(server: GatewayServer, number: int) -> None:
        http = httpx.Client(timeout=60)
        episode_number = 0
        while True:
            with lock:
                if done[0] >= calls:
                    return
            episode_number += 1
            episode = http.post(
                f"{server.root_url}/forge/episodes", json={"task": {"task_id": f"a{number}"}}
            ).json()
            client = openai.OpenAI(
                base_url=server.base_url, api_key=episode["episode_id"], max_retries=0, http_client=http
            )
            messages = [{"role": "user", "content": "guess a number"}]
            for _ in range(CALLS_PER_EPISODE):
                try:
                    reply = client.chat.completions.create(model="p", messages=messages, max_tokens=4)
                except openai.ConflictError:  # the cap ended this (idle) episode: its agent moves on
                    break
                messages += [
                    {"role": "assistant", "content": reply.choices[0].message.content or ""},
                    {"role": "user", "content": "higher"},
                ]
                with lock:
                    done[0] += 1
                    if done[0] % every == 0:
                        gc.collect()
                        series.append(
                            {
                                "calls": done[0],
                                "resident_mb": round(resident_mb("VmRSS"), 1),
                                "episodes_in_memory": len(store.episodes),
                                "engine_cached_episodes": engine.cached_episodes,
                            }
                        )
                        print(json.dumps(series[-1]), file=sys.stderr, flush=True)  # progress
                    if done[0] >= calls:
                        break
            if episode_number % 10:  # every 10th agent walks away without finishing
                http.post(
                    f"{server.root_url}/forge/episodes/{episode['episode_id']}/finish", json={"reward": 1.0}
                )

    started = time.perf_counter()
    with GatewayServer(gateway) as server:
        threads = [
            threading.Thread(target=lambda n=n: _guard(errors, agent, server, n)) for n in range(AGENTS)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
    recorded = store.on_finished.written if store.on_finished is not None else 0
    half = [point["resident_mb"] for point in series if point["calls"] >= calls // 2]
    return {
        "calls": done[0],
        "agents": AGENTS,
        "calls_per_episode": CALLS_PER_EPISODE,
        "max_live_episodes": max_live,
        "keep_finished": keep_finished,
        "episodes_recorded": recorded,
        "seconds": round(time.perf_counter() - started, 1),
        "resident_mb_at_half": half[0] if half else None,
        "resident_mb_max_second_half": max(half) if half else None,
        "growth_second_half_mb": round(max(half) - half[0], 1) if half else None,
        "max_episodes_in_memory": max(p["episodes_in_memory"] for p in series),
        "max_engine_cached_episodes": max(p["engine_cached_episodes"] for p in series),
        "series": series,
    }


def _guard(errors: list, function, *args) -> None:
    try:
        function(*args)
    except Exception as exc:  # re-raised by the caller
        errors.append(exc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--every", type=int, default=500)
    parser.add_argument("--output", default="bench/results/gateway_soak.json")
    args = parser.parse_args()
    result = soak(args.calls, args.every)
    print(json.dumps({k: v for k, v in result.items() if k != "series"}))
    save_result(result, Path(args.output))


if __name__ == "__main__":
    main()
