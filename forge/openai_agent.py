"""The reference black-box agent: a plain tool-calling loop on the official `openai` SDK.

Forge's gateway trains on it unchanged; `gateway.agent_command` runs it by default
(`{python} -m forge.openai_agent`), and it is the place to start an agent program of your
own. It lives outside forge.gateway so that each agent process imports only the SDK (not
the gateway's server). The harness runs it once per episode with
OPENAI_BASE_URL (the gateway), OPENAI_API_KEY (= the episode id, which ties each call to
the episode), FORGE_GATEWAY_URL, FORGE_EPISODE_ID and FORGE_MAX_TURNS in the environment.
The env acts through the gateway's episode API: `/step` runs an action, `/finish` scores.
"""

from __future__ import annotations

import json
import os

import httpx
from openai import OpenAI

# Offered when the env has no tools of its own: the agent's answer goes to the env.
SUBMIT = {
    "type": "function",
    "function": {
        "name": "submit",
        "description": "Submit an answer to the task.",
        "parameters": {
            "type": "object",
            "properties": {"answer": {"type": "string"}},
            "required": ["answer"],
        },
    },
}


def act(episode_api: httpx.Client, episode_url: str, action: str) -> dict:
    response = episode_api.post(f"{episode_url}/step", json={"action": action})
    response.raise_for_status()
    return response.json()


def as_action(call, env_has_tools: bool) -> str:
    """A tool call as the env's action: the submitted answer, or a Hermes call for an env tool."""
    arguments = json.loads(call.function.arguments or "{}")
    if not env_has_tools and call.function.name == "submit":
        return str(arguments.get("answer", ""))
    return "<tool_call>" + json.dumps({"name": call.function.name, "arguments": arguments}) + "</tool_call>"


def main() -> None:
    episode_url = f"{os.environ['FORGE_GATEWAY_URL']}/forge/episodes/{os.environ['FORGE_EPISODE_ID']}"
    max_turns = int(os.environ.get("FORGE_MAX_TURNS", "8"))
    client = OpenAI()  # base URL and API key from the environment
    # One client for every episode call, not httpx.get/post's new one (and new TLS context,
    # ~40 ms of CPU each) per call: agents are a gateway step's main CPU cost.
    with httpx.Client(timeout=60) as episode_api:
        play(client, episode_api, episode_url, max_turns)


def play(client: OpenAI, episode_api: httpx.Client, episode_url: str, max_turns: int) -> None:
    episode = episode_api.get(episode_url).json()
    tools = episode["tools"] or [SUBMIT]
    messages = [{"role": "system", "content": episode["system_prompt"]}] if episode["system_prompt"] else []
    messages.append({"role": "user", "content": episode["observation"]})

    for _ in range(max_turns):
        reply = client.chat.completions.create(model="policy", messages=messages, tools=tools)
        message = reply.choices[0].message
        messages.append(message.model_dump(exclude_none=True))
        if message.tool_calls:
            for call in message.tool_calls:
                result = act(episode_api, episode_url, as_action(call, bool(episode["tools"])))
                messages.append({"role": "tool", "tool_call_id": call.id, "content": result["observation"]})
                if result["done"]:
                    break
        else:  # no tool call: the reply itself is the action (a small model often does this)
            result = act(episode_api, episode_url, message.content or "")
            messages.append({"role": "user", "content": result["observation"]})
        if result["done"]:
            break
    # No reward of our own: the env's verifier decides from the steps it saw.
    episode_api.post(f"{episode_url}/finish", json={}).raise_for_status()


if __name__ == "__main__":
    main()
