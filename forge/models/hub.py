"""Hugging Face hub ids in `model.path`: each process finds (or downloads) the model's files in
its own node's Hugging Face cache with `huggingface_hub.snapshot_download`, once per process."""

from __future__ import annotations

import difflib
import functools
import os
import re
from pathlib import Path

from forge.config import ConfigError

# What transformers loads a causal LM and its tokenizer from; nothing else of the repo
# (ONNX, GGUF, original/ or consolidated weights, a second copy in .bin). Weights in
# `model*.safetensors` only: transformers reads model.safetensors or the shards its
# index names (model-00001-of-0000N.safetensors), never e.g. consolidated.safetensors.
CONFIG_AND_TOKENIZER = [
    "*.json",  # config, generation_config, tokenizer(_config), special_tokens_map, vocab, weight index
    "*.jinja",  # chat_template.jinja: transformers 5 saves the chat template beside the tokenizer
    "*.txt",  # merges.txt, vocab.txt
    "*.model",  # SentencePiece tokenizer.model
    "*.tiktoken",
]
SAFETENSORS = ["model*.safetensors"]
# Only for a repo without safetensors weights (older checkpoints).
PYTORCH_BIN = ["pytorch_model*.bin"]

# Variables huggingface_hub reads: passed to every Ray actor of a run whose model is a hub id,
# so each resolves it as this process does (a Ray that was already running, or another node,
# does not see this process's environment). Unset ones are left to each node. HF_TOKEN is not
# among them: a runtime_env's variables show in Ray's dashboard and job table, so a token is each
# node's own (a Ray that Forge starts here inherits this process's environment anyway).
HUB_ENV = (
    "HF_HOME",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_TOKEN_PATH",
    "HF_ENDPOINT",
    "HF_HUB_ETAG_TIMEOUT",
    "HF_HUB_DOWNLOAD_TIMEOUT",
    "HF_HUB_DISABLE_PROGRESS_BARS",
)

# The hub's own rule for a model repo id: `org/name`, letters, digits, `-`, `_`, `.`.
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def looks_local(given: str) -> bool:
    """A path the user meant as a folder on this disk (never tried on the hub): absolute,
    relative with ./ or ../, under ~, or more than one slash deep."""
    return (
        given.startswith(("/", ".", "~"))
        or given.count("/") > 1
        or (os.sep != "/" and os.sep in given)
        or "\\" in given
    )


def is_hub_id(given: str) -> bool:
    """Whether `given` can be a hub model id (`org/name`) rather than a local path."""
    return not looks_local(given) and REPO_ID.fullmatch(given) is not None and ".." not in given


def names_hub_model(given: str | None) -> bool:
    """Whether `model.path` = `given` is a hub id: hub-shaped, and no local file or folder of that name."""
    return given is not None and is_hub_id(given) and not Path(given).expanduser().exists()


def hub_env() -> dict[str, str]:
    """The huggingface_hub settings of this process's environment, for the run's Ray actors."""
    return {name: os.environ[name] for name in HUB_ENV if name in os.environ}


MODEL_SETTINGS = ("model.path", "model.revision")


class NodeHubError(ConfigError):
    """A run's Ray actor could not resolve the hub id the driver resolved (that node's cache
    lacks it offline, or its download failed); the message names the actor's role and node."""


@functools.cache
def hub_snapshot(repo_id: str, revision: str = "main", settings: tuple[str, str] = MODEL_SETTINGS) -> Path:
    """The local folder of hub model `repo_id` at `revision` (a branch, tag or commit): found
    in this node's Hugging Face cache, else downloaded into it (config, tokenizer and weights
    only). Once per process: every later call returns the same folder. Concurrent processes
    of a node share the download (huggingface_hub locks each file in the cache's .locks/).
    Errors name `settings`: the options that gave the id and the revision."""
    setting = f"{settings[0]}={repo_id!r} ({settings[1]}={revision!r})"
    folder = _snapshot(repo_id, revision, CONFIG_AND_TOKENIZER + SAFETENSORS, setting, settings[1])
    if not _has(folder, SAFETENSORS):  # an older repo: its weights as pytorch_model*.bin
        folder = _snapshot(repo_id, folder.name, CONFIG_AND_TOKENIZER + PYTORCH_BIN, setting, settings[1])
    if not (folder / "config.json").is_file() or not (_has(folder, SAFETENSORS) or _has(folder, PYTORCH_BIN)):
        raise ConfigError(
            f"{setting}: the snapshot {folder} has no config.json and model*.safetensors or "
            "pytorch_model*.bin weights, so it is not a transformers checkpoint Forge can load; "
            f"set {settings[0]} to a model repo or a local checkpoint folder"
        )
    return folder


def _has(folder: Path, patterns: list[str]) -> bool:
    return any(any(folder.glob(pattern)) for pattern in patterns)


def _snapshot(repo_id: str, revision: str, patterns: list[str], setting: str, revision_key: str) -> Path:
    """snapshot_download with Forge's error messages, which name the setting to change."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except GatedRepoError:
        raise ConfigError(
            f"{setting}: the hub model is gated; accept its terms at "
            f"{constants.ENDPOINT}/{repo_id} and set HF_TOKEN to a token of that account on every node "
            "(or run `hf auth login` there)"
        ) from None
    except RepositoryNotFoundError:
        raise ConfigError(
            f"{setting}: the hub has no model {repo_id!r} that this process may read (404, or 401 for a "
            "private repo): check the spelling; for a private model set HF_TOKEN on every node; "
            f"for a local folder write it as ./{repo_id}"
        ) from None
    except RevisionNotFoundError:
        raise ConfigError(
            f"{setting}: {repo_id!r} has no branch, tag or commit {revision!r}; set {revision_key} to one it has "
            "(default main)"
        ) from None
    except IncompleteSnapshotError as exc:
        raise ConfigError(
            f"{setting}: the cached copy on this node is incomplete (an interrupted download?) and the hub "
            f"cannot be reached to finish it ({exc}); run `hf download {repo_id} --revision {revision}` on "
            "this node with network access, or set HF_HUB_OFFLINE=0"
        ) from None
    except LocalEntryNotFoundError as exc:
        raise ConfigError(_not_cached(repo_id, revision, setting, exc, constants)) from None
    except HfHubHTTPError as exc:
        if exc.response is not None and exc.response.status_code in (401, 403):
            raise ConfigError(
                f"{setting}: the hub refused access ({exc.response.status_code}); set HF_TOKEN to a token that "
                "may read this model, on every node"
            ) from None
        raise ConfigError(f"{setting}: the hub answered an error ({exc}); try again, or see the fixes below\n"
                          + _remedies(repo_id, revision)) from None  # fmt: skip


def _not_cached(repo_id: str, revision: str, setting: str, error: Exception, constants) -> str:
    """Not in this node's cache and the hub could not be asked: why, what the cache holds, the fixes."""
    cache = Path(constants.HF_HUB_CACHE)
    if constants.HF_HUB_OFFLINE:
        why = "HF_HUB_OFFLINE=1 forbids downloading it; set HF_HUB_OFFLINE=0 to download it, or"
    else:
        cause = error.__cause__ or error
        why = f"The hub could not be reached ({type(cause).__name__}: {str(cause).splitlines()[0][:200]}); either"
    cached = sorted(
        entry.name[len("models--"):].replace("--", "/", 1)
        for entry in (cache.iterdir() if cache.is_dir() else [])
        if entry.name.startswith("models--")
    )  # fmt: skip
    held = ""
    if repo_id in cached:
        folder = cache / ("models--" + repo_id.replace("/", "--"))
        revisions = sorted(
            {p.name for p in (folder / "refs").glob("*")} | {p.name for p in (folder / "snapshots").glob("*")}
        )
        held = f"; the cache holds {repo_id} at revisions {revisions}, not {revision!r}"
    elif close := difflib.get_close_matches(repo_id, cached, n=3, cutoff=0.6):
        held = f"; the cache holds {', '.join(close)} (a typo?)"
    return f"{setting} is not in this node's Hugging Face cache ({cache}){held}. {why}\n" + _remedies(
        repo_id, revision
    )


def _remedies(repo_id: str, revision: str) -> str:
    name = repo_id.split("/")[-1]
    at = "" if revision == "main" else f" --revision {revision}"
    return (
        f"  - fill the cache on every node (or once, in a cache all nodes share through HF_HUB_CACHE): "
        f"hf download {repo_id}{at}\n"
        f"  - or download it to a folder every node can read and point model.path there: "
        f"hf download {repo_id}{at} --local-dir /models/{name}, then model.path=/models/{name}"
    )
