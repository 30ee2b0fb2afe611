"""The API keys Forge sends to the inference servers of a `rollout.engine: remote` run that were
started with one (`vllm serve --api-key`, SGLang's `--api-key` and `--admin-api-key`): the config
names the environment variables that hold them, never the keys, so a run's saved config.yaml
holds no secret. Each process (driver, rollout workers, gateway) reads them from its own
environment, as it does HF_TOKEN."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from forge.config import ConfigError

API_KEY_SETTING = "rollout.server_api_key_env"
ADMIN_KEY_SETTING = "rollout.server_admin_api_key_env"


@dataclass(frozen=True)
class ServerKeys:
    """Which variables hold the keys: `api_key_env` for every request, `admin_key_env` for an
    SGLang's admin routes (pause, weight updates, LoRA loads, abort). Names only: safe to pickle
    into Ray actors and to print."""

    api_key_env: str | None = None
    admin_key_env: str | None = None

    @classmethod
    def of(cls, rollout_cfg: Any) -> ServerKeys:
        return cls(
            getattr(rollout_cfg, "server_api_key_env", None),
            getattr(rollout_cfg, "server_admin_api_key_env", None),
        )

    def values(self) -> tuple[str | None, str | None]:
        """The keys from this process's environment; a variable named but unset is refused
        here, before any request, naming the setting and the variable (not its value)."""
        return (
            _read(self.api_key_env, API_KEY_SETTING),
            _read(self.admin_key_env, ADMIN_KEY_SETTING),
        )

    def refusal_hint(self, admin: bool, status: int) -> str:
        """What to fix when a server answered 401 / 403."""
        if admin and self.admin_key_env:
            return (
                f" (it refused the admin key in ${self.admin_key_env}, {ADMIN_KEY_SETTING}: give that "
                "variable the server's --admin-api-key)"
            )
        if admin and status == 401:
            admin_note = (
                f"; an SGLang started with --admin-api-key wants that key on this route: name its variable in "
                f"{ADMIN_KEY_SETTING}"
            )
        else:
            admin_note = ""
        if self.api_key_env:
            return (
                f" (it refused the key in ${self.api_key_env}, {API_KEY_SETTING}: give that variable the key "
                f"the server was started with, --api-key{admin_note})"
            )
        return (
            " (the server wants an API key and Forge sent none: export the key it was started with "
            f"(vllm serve --api-key, SGLang --api-key) in a variable on every node and name that variable in "
            f"{API_KEY_SETTING}{admin_note})"
        )


def key_in_env(name: str | None, missing: str) -> str | None:
    """The API key in environment variable `name` (None when no variable is named); a
    variable that is unset or empty is a ConfigError saying `missing`."""
    if name is None:
        return None
    value = os.environ.get(name)
    if not value:
        raise ConfigError(missing)
    return value


def _read(name: str | None, setting: str) -> str | None:
    import socket

    return key_in_env(
        name,
        f"{setting}={name}, but this process (on {socket.gethostname()}) has no {name} in its "
        "environment: export the server's API key as "
        f"{name} on every node of the run (where Ray was started), or unset {setting}",
    )


NO_KEYS = ServerKeys()  # servers that want no key
