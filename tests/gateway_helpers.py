"""What gateway tests share: a scripted engine, a served gateway, episodes and clients."""

from __future__ import annotations

import time
from contextlib import contextmanager

import httpx
import openai
import torch

from forge.gateway import Gateway, GatewayServer
from forge.gateway.episodes import EpisodeStore
from forge.rollout.engines.protocol import GenerationResult
from forge_envs.guess_number import GuessNumberEnv

# Two function tools the gateway tests offer: one with an argument, one without.
GUESS = {
    "type": "function",
    "function": {
        "name": "guess",
        "description": "Guess the number.",
        "parameters": {"type": "object", "properties": {"number": {"type": "integer"}}},
    },
}
HINT = {"type": "function", "function": {"name": "hint", "parameters": {"type": "object", "properties": {}}}}


class ScriptedEngine:
    """Replies with fixed token ids after an optional delay (and `token_delay_s` per token),
    reporting each token to the request's callback as HFEngine does and ending where it
    says stop, or where the request's `cancel` is set."""

    def __init__(self, reply: list[int], delay_s: float = 0.0, token_delay_s: float = 0.0) -> None:
        self.reply = reply
        self.delay_s = delay_s
        self.token_delay_s = token_delay_s
        self.policy_version = 7
        self.temperature, self.top_p = 1.0, 1.0
        self.requests = []
        self.generated: list[int] = []  # tokens produced per request (before any stop)
        self.finished_at = 0.0

    def generate(self, requests):
        self.requests.extend(requests)
        time.sleep(self.delay_s)
        results = []
        for request in requests:
            reply = list(self.reply[: request.max_new_tokens])
            finished = len(reply) == len(self.reply)  # else max_new_tokens cut it
            for end, token in enumerate(reply, 1):
                time.sleep(self.token_delay_s)
                top = [(token, -0.5)][: request.top_logprobs]
                if request.on_token is not None and request.on_token(token, -0.5, top):
                    reply, finished = reply[:end], True
                    break
                if request.cancel is not None and request.cancel.is_set():  # given up: cut here
                    reply, finished = reply[:end], False
                    break
            self.generated.append(len(reply))
            tops = [[(t, -0.5)][: request.top_logprobs] for t in reply] if request.top_logprobs else None
            results.append(
                GenerationResult(
                    reply, [-0.5] * len(reply), finished, self.policy_version, len(request.token_ids), tops
                )
            )
        self.finished_at = time.monotonic()
        return results

    def load_weights(self, state_dict, version):
        self.policy_version = version

    def release(self, episode_id):
        pass


@contextmanager
def serve(
    engine,
    tokenizer,
    max_new_tokens: int = 6,
    max_context_tokens: int = 1024,
    env_factory=lambda: GuessNumberEnv(n=8),
    **gateway_options,
):
    store = EpisodeStore(env_factory)
    gateway = Gateway(engine, tokenizer, store, max_new_tokens, max_context_tokens, **gateway_options)
    # The gateway runs batches on a worker thread; torch's thread pool spinning there
    # against the server's threads made decoding ~20x slower on a loaded 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with GatewayServer(gateway) as server:
            yield server
    finally:
        torch.set_num_threads(threads)


def start(server: GatewayServer, secret: int = 3, task_id: str = "t0") -> dict:
    response = httpx.post(
        f"{server.root_url}/forge/episodes", json={"task": {"task_id": task_id, "secret": secret, "n": 8}}
    )
    response.raise_for_status()
    return response.json()


def client(server: GatewayServer, episode_id: str, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=episode_id, max_retries=0, **kwargs)


def async_client(server: GatewayServer, episode_id: str, **kwargs) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base_url, api_key=episode_id, max_retries=0, **kwargs)


def calls_of(server: GatewayServer, episode: dict) -> list:
    return server.gateway.store.get(episode["episode_id"]).calls


def with_byte_runs_made_valid(tokenizer, ids: list[int]) -> list[int]:
    """`ids` with each run of byte pieces as its UTF-8 decode (a byte that cannot be part of a
    character as U+FFFD), which byte fallback then decodes byte for byte."""
    out, run = [], b""
    for token in ids + [None]:
        piece = tokenizer.convert_ids_to_tokens(token) if token is not None else None
        if piece is not None and len(piece) == 6 and piece.startswith("<0x"):
            run += bytes([int(piece[3:5], 16)])
            continue
        valid = run.decode("utf-8", errors="replace").encode("utf-8")
        out += tokenizer.convert_tokens_to_ids([f"<0x{byte:02X}>" for byte in valid])
        out += [] if token is None else [token]
        run = b""
    return out
