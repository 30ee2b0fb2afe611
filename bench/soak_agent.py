"""A gateway agent on the standard library alone, for `bench.soak`'s gateway mode: the
reference agent's loop (forge/openai_agent.py: chat completions with a submit tool, the
env's steps through the episode API) without importing the openai SDK, whose ~1 s start
per episode would otherwise make a gateway soak too slow to fit a slope. The gateway sees
the same requests."""

from __future__ import annotations

import json
import os
import urllib.request

# The reference agent's submit tool (forge.openai_agent.SUBMIT, whose module imports the SDK).
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


def call(url: str, body: dict | None = None, key: str = "") -> dict:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    request = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read() or b"{}")


def main() -> None:
    episode_id = os.environ["FORGE_EPISODE_ID"]
    episode_url = f"{os.environ['FORGE_GATEWAY_URL']}/forge/episodes/{episode_id}"
    completions = f"{os.environ['OPENAI_BASE_URL'].rstrip('/')}/chat/completions"
    episode = call(episode_url)
    tools = episode["tools"] or [SUBMIT]
    messages = [{"role": "system", "content": episode["system_prompt"]}] if episode["system_prompt"] else []
    messages.append({"role": "user", "content": episode["observation"]})
    for _ in range(int(os.environ.get("FORGE_MAX_TURNS", "8"))):
        message = call(
            completions, {"model": "policy", "messages": messages, "tools": tools}, key=episode_id
        )["choices"][0]["message"]
        messages.append({key: value for key, value in message.items() if value is not None})
        result = {"done": False}
        for tool_call in message.get("tool_calls") or []:
            arguments = json.loads(tool_call["function"]["arguments"] or "{}")
            action = (
                str(arguments.get("answer", ""))
                if not episode["tools"]
                else "<tool_call>"
                + json.dumps({"name": tool_call["function"]["name"], "arguments": arguments})
                + "</tool_call>"
            )
            result = call(f"{episode_url}/step", {"action": action})
            messages.append(
                {"role": "tool", "tool_call_id": tool_call["id"], "content": result["observation"]}
            )
            if result["done"]:
                break
        if not message.get("tool_calls"):
            result = call(f"{episode_url}/step", {"action": message.get("content") or ""})
            messages.append({"role": "user", "content": result["observation"]})
        if result["done"]:
            break
    call(f"{episode_url}/finish", {})


if __name__ == "__main__":
    main()
