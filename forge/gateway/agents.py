"""Agent programs as episode players: one process per gateway episode, at most so many at
a time, killed at a timeout; an episode its agent left unfinished is closed as truncated
or errored."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from forge.gateway.server import GatewayServer
from forge.types import TIMEOUT


@dataclass
class AgentExit:
    returncode: int | None  # None: killed at the timeout
    stderr_tail: str


def agent_argv(command: str) -> list[str]:
    argv = [part.replace("{python}", sys.executable) for part in shlex.split(command)]
    if not argv:
        raise ValueError("gateway.agent_command is empty; give the command that runs one agent episode")
    return argv


def run_agents(
    argv: list[str],
    episode_ids: list[str],
    environment: dict[str, str],
    max_concurrent: int,
    timeout_s: float,
) -> dict[str, AgentExit]:
    """Run `argv` once per episode (FORGE_EPISODE_ID and OPENAI_API_KEY set to its id), at
    most `max_concurrent` at a time; kill the whole process group of any past `timeout_s`."""
    waiting = list(episode_ids)
    running: dict[str, tuple[subprocess.Popen, float, Any]] = {}
    exits: dict[str, AgentExit] = {}
    try:
        while waiting or running:
            while waiting and len(running) < max_concurrent:
                episode_id = waiting.pop(0)
                stderr = tempfile.TemporaryFile()
                env = {
                    **os.environ,
                    **environment,
                    "FORGE_EPISODE_ID": episode_id,
                    "OPENAI_API_KEY": episode_id,
                }
                try:
                    process = subprocess.Popen(
                        argv,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=stderr,
                        start_new_session=True,
                    )
                except OSError as exc:
                    raise RuntimeError(
                        f"gateway.agent_command {shlex.join(argv)!r} cannot start: {exc}"
                    ) from None
                running[episode_id] = (process, time.monotonic(), stderr)
            for episode_id, (process, started, stderr) in list(running.items()):
                returncode = process.poll()
                if returncode is None and time.monotonic() - started < timeout_s:
                    continue
                if returncode is None:
                    _kill_group(process)
                stderr.seek(0)
                exits[episode_id] = AgentExit(returncode, stderr.read()[-2000:].decode(errors="replace"))
                stderr.close()
                del running[episode_id]
            time.sleep(0.02)
    finally:
        for process, _, stderr in running.values():
            _kill_group(process)
            stderr.close()
    return exits


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def close_unfinished(server: GatewayServer, exits: dict[str, AgentExit]) -> None:
    """Episodes whose agent exited without finishing them: a timeout is a truncation, a
    crash is an error; their recorded calls are kept either way."""
    store = server.gateway.store
    for episode_id, agent in exits.items():
        if store.get(episode_id).finished:
            continue
        if agent.returncode is None:
            status, error = (
                "truncated",
                f"{TIMEOUT} the agent ran past gateway.agent_timeout_s and was killed",
            )
        else:
            status, error = (
                "error",
                f"the agent exited with code {agent.returncode} without finishing: "
                + (
                    agent.stderr_tail.strip().splitlines()[-1] if agent.stderr_tail.strip() else "(no stderr)"
                ),
            )
        server.call(server.gateway.abandon_episode(episode_id, status, error))
