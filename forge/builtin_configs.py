"""Built-in configs by name (`forge train smoke`): the repository's configs/ folder, which an
installed wheel carries as forge/configs (setup.py maps the folder; there is no second copy)."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def configs_dir() -> Path | None:
    """forge/configs in an installed wheel; in a source checkout (an editable install, or the
    tree on PYTHONPATH) the checkout's own configs/, so a checkout never reads another's files."""
    installed = _PACKAGE / "configs"
    if installed.is_dir():
        return installed
    checkout = _PACKAGE.parent
    # pyproject.toml beside forge/ tells a checkout from site-packages, whose configs/ could be
    # any other distribution's folder.
    if (checkout / "pyproject.toml").is_file() and (checkout / "configs").is_dir():
        return checkout / "configs"
    return None


def builtin_configs() -> dict[str, Path]:
    """Built-in config names (file stems, e.g. `smoke`) mapped to their files."""
    folder = configs_dir()
    return {} if folder is None else {path.stem: path for path in sorted(folder.glob("*.yaml"))}


def describe(path: Path) -> str:
    """A config's one-line summary: its first comment line."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


def listing() -> str:
    """What `forge configs` prints: one line per built-in config, then where the files are."""
    configs = builtin_configs()
    if not configs:
        return "no built-in configs found (forge/configs is missing from this install)"
    width = max(map(len, configs))
    lines = [f"{name:<{width}}  {describe(path)}" for name, path in configs.items()]
    lines.append(
        f"(files in {configs_dir()}: train one with `forge train NAME`, or copy one and pass its path)"
    )
    return "\n".join(lines)
