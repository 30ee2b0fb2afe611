"""Find an env class by registered name (entry points `forge.envs`) or `module:Class`."""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

from forge.env.base import Env

ENTRY_POINT_GROUP = "forge.envs"


def _import_from_here(module_name: str):
    """Import `module_name`, also looking in the working directory (as `python -m` does),
    so `forge env check my_envs:MyEnv` finds a module next to the user's config."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name.split(".")[0] or os.getcwd() in sys.path:
            raise
    sys.path.insert(0, os.getcwd())
    return importlib.import_module(module_name)


def registered_envs() -> dict[str, str]:
    """Installed env names mapped to their `module:Class` targets."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _refuse_a_file_path(name: str, module_name: str, class_name: str) -> None:
    """A `path/to/file.py:Class` that did not import: say how to name it as a module."""
    if not (module_name.endswith(".py") or "/" in module_name or os.sep in module_name):
        return
    path = module_name.removesuffix(".py")
    folder, module = (os.path.dirname(path), os.path.basename(path)) if os.path.isabs(path) else ("", path)
    where = f"{module.replace(os.sep, '.').replace('/', '.').strip('.')}:{class_name}"
    raise ValueError(
        f"env {name!r}: {module_name!r} is a file path; name the module as Python imports it: "
        f"{where}" + (f", run from {folder} (or with it on PYTHONPATH)" if folder else "")
    )


def resolve_env(name: str) -> type[Env]:
    """`guess_number` or `my_pkg.my_env:MyEnv` -> the class."""
    if ":" in name:
        module_name, _, class_name = name.partition(":")
        try:
            module = _import_from_here(module_name)
        except ImportError as exc:
            _refuse_a_file_path(name, module_name, class_name)
            missing = isinstance(exc, ModuleNotFoundError) and module_name.startswith(exc.name or "\0")
            where = (  # the module itself is not found (not a missing import inside it): say where it was looked for
                f"; it is looked for in the working directory ({os.getcwd()}) and on PYTHONPATH: run from the "
                "folder that holds it, add that folder to PYTHONPATH, or pip install its package"
                if missing
                else ""
            )
            raise ValueError(f"env {name!r}: cannot import module {module_name!r} ({exc}){where}") from exc
        env_class = getattr(module, class_name, None)
        if env_class is None:
            raise ValueError(f"env {name!r}: module {module_name!r} has no attribute {class_name!r}")
    else:
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if not found:
            known = ", ".join(sorted(registered_envs())) or "none installed"
            close = difflib.get_close_matches(name.lower(), registered_envs(), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? Otherwise " if close else ""
            raise ValueError(
                f"env {name!r} is not registered (known: {known}); "
                f"{hint}name an installed env or give package.module:ClassName"
            )
        env_class = found[0].load()
    if not (isinstance(env_class, type) and issubclass(env_class, Env)):
        raise ValueError(f"env {name!r} resolves to {env_class!r}, which is not a forge.env.Env subclass")
    return env_class


def _installed(path: str) -> bool:
    return any(part in ("site-packages", "dist-packages") for part in os.path.abspath(path).split(os.sep))


def env_module_path(name: str) -> str | None:
    """Where env `name`'s top-level module lives (its package folder or its file) when it is
    a `module:Class` not installed as a package (a module next to the config, in a temp
    folder, found through PYTHONPATH or the working directory); None when another process
    finds it anyway (a registered or pip-installed env)."""
    if ":" not in name:
        return None
    module_name = name.partition(":")[0]
    resolve_env(name)  # imported here first, so its top-level module is known (and errors said)
    top: ModuleType = sys.modules[module_name.split(".")[0]]
    paths = list(getattr(top, "__path__", []))  # a package: its folder; else the module's file
    location = paths[0] if len(paths) == 1 else None if paths else getattr(top, "__file__", None)
    if location is None or _installed(location):
        return None
    return os.path.abspath(location)


def env_import_root(name: str) -> str | None:
    """The folder another process must have on its path to import env `name` (see
    `env_module_path`), or None."""
    location = env_module_path(name)
    return os.path.dirname(location) if location else None


def worker_runtime_env(name: str) -> dict[str, Any] | None:
    """The Ray runtime env of an actor that must import env `name` on this machine's
    filesystem: its import root prepended to PYTHONPATH (None when not needed)."""
    root = env_import_root(name)
    if root is None:
        return None
    inherited = os.environ.get("PYTHONPATH", "")
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (root, inherited) if p)}}
