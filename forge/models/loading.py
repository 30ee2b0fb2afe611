"""Model and tokenizer loading: a local Hugging Face checkpoint or hub id, or the tiny smoke model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from forge.config import ConfigError, ModelConfig


def quiet_transformers() -> None:
    """Per-file loading bars from every Ray actor drown the run's own progress bar; peft's
    check for gradient checkpointing warns, in each process wrapping LoRA, of transformers'
    renaming it (peft's call, nothing the user can change)."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings(
        "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
    )


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def checkpoint_folder(
    given: str | Path, revision: str = "main", settings: tuple[str, str] = ("model.path", "model.revision")
) -> Path:
    """The checkpoint folder `model.path` = `given` names: a local folder holding config.json,
    or for a hub id (`org/name`, no such local folder) the model's snapshot in this process's
    Hugging Face cache at `revision` (forge.models.hub, which downloads it when missing).
    Anything else is an error saying what to give instead, naming `settings` (the options that
    gave the path and the revision)."""
    from forge.models.hub import hub_snapshot, names_hub_model

    path = Path(given).expanduser()
    if (path / "config.json").is_file():
        return path
    if names_hub_model(str(given)):
        try:
            return hub_snapshot(str(given), revision, settings)
        except ConfigError as exc:
            raise ConfigError(f"{exc}{_local_folder_hint(str(given))}") from None
    run = run_model_hint(path)
    if run is not None:
        raise FileNotFoundError(
            f"{settings[0]}={str(given)!r} is not a Hugging Face checkpoint folder: {run}"
        )
    what = "has no config.json" if path.is_dir() else "is a file" if path.exists() else "does not exist"
    hint = "point it at a local folder saved with save_pretrained" + (
        ", or unset it for the tiny model" if settings[0] == "model.path" else ""
    )
    if not path.exists() and not path.is_absolute():  # a config run from another folder than its own
        hint = f"relative paths are read from the working directory, {os.getcwd()}; {hint}"
    raise FileNotFoundError(
        f"{settings[0]}={str(given)!r} is not a Hugging Face checkpoint folder (it {what}); {hint}"
    )


def run_model_hint(path: Path) -> str | None:
    """For a path into a Forge run's folder (the run itself, its checkpoints/, a step-N
    checkpoint or the `latest` pointer), where that run's model is and how to get it; else None."""
    if path.name == "latest" and path.parent.name == "checkpoints" and path.is_file():
        run, what = path.parent.parent, "the checkpoint pointer"
    elif path.is_dir() and ((path / "trainer.pt").is_file() or (path / "run_state.pkl").is_file()):
        run, what = path.parent.parent, "a resumable checkpoint"
    elif path.is_dir() and path.name == "checkpoints" and (path / "latest").is_file():
        run, what = path.parent, "the checkpoints"
    elif path.is_dir() and ((path / "metrics.jsonl").is_file() or (path / "checkpoints").is_dir()):
        run, what = path, "the folder"
    else:
        return None
    said = f"it is {what} of the run {run}"
    step = path.name if path.name.startswith("step-") and (path / "trainer.pt").is_file() else None
    export = f"forge export {run}" + (f" --step {int(step.removeprefix('step-'))}" if step else "")
    out = run / "exports" / (step or "step-N")
    if (run / "final" / "config.json").is_file():
        return f"{said}, whose trained model is {run / 'final'}: pass that" + (
            f" (or, for this step's model, run `{export}` and pass {out})" if step else ""
        )
    return (
        f"{said}, and a checkpoint holds the trainer's state for `forge train --resume`, not a model; the run "
        f"has no final/ yet (the model folder a run writes when it reaches train.max_steps): write the "
        f"{'checkpoint' if step else 'latest checkpoint'}'s model with `{export}` and pass the folder it "
        f"prints ({out}), or continue the run to its end with "
        f"`forge train {run / 'config.yaml'} --resume {run}`, then pass {run / 'final'}"
    )


def _local_folder_hint(given: str) -> str:
    """For a hub id the hub could not give whose org is a folder here (`ck/olmo` beside ./ck/olmo2):
    what that folder holds, as a likely typo of a local path."""
    import difflib

    parent = Path(given).parent
    if not parent.is_dir():
        return ""
    held = sorted(entry.name for entry in parent.iterdir() if entry.is_dir())
    close = difflib.get_close_matches(Path(given).name, held, n=3, cutoff=0.6)
    what = f"{', '.join(close)} (a typo?)" if close else (", ".join(held[:8]) or "no folders")
    return f"\nthere is no folder {given} in {os.getcwd()} either: {parent}/ holds {what}"


def node_checkpoint_folder(given: str | Path, revision: str, role: str) -> Path:
    """`checkpoint_folder` in a run's Ray actor (`role`: "rollout worker 1", "trainer", ...).
    A hub id that the driver resolved and this node cannot raises NodeHubError naming the role
    and the node, which the driver prints as it is (`forge.actor_errors.actor_hub_message`)
    instead of reporting a dead actor with its traceback."""
    from forge.models.hub import NodeHubError

    try:
        return checkpoint_folder(given, revision)
    except ConfigError as exc:  # only a hub id raises it (a missing folder is FileNotFoundError)
        raise NodeHubError(f"{role} on node {node_name()}: {exc}") from None


def node_name() -> str:
    """This machine as a Ray cluster's user knows it: host name and Ray's address for it."""
    import socket

    try:
        import ray

        return f"{socket.gethostname()} ({ray.util.get_node_ip_address()})"
    except Exception:  # no Ray here: the host name says enough
        return socket.gethostname()


def resolve_model_path(cfg: ModelConfig, cache_dir: str | Path, seed: int = 0) -> Path:
    """The checkpoint folder to load: `cfg.path` (a folder or a hub id, see `checkpoint_folder`),
    or a freshly built tiny checkpoint."""
    if cfg.path is not None:
        return checkpoint_folder(cfg.path, cfg.revision)
    from forge.models.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint(cfg.tiny, Path(cache_dir), seed=seed)


def actor_model_source(cfg: ModelConfig, folder: Path) -> str:
    """What a run's Ray actors are given to load, once this process resolved `cfg.path` to
    `folder`: for a hub id the id itself, each actor resolving it in its own node's cache, with
    `cfg.revision` pinned to the commit found here (`folder`'s name) so that every node loads the
    same weights even if the branch moves during the run; else the folder."""
    from forge.models.hub import names_hub_model

    if cfg.path is not None and names_hub_model(cfg.path):
        cfg.revision = folder.name
        return cfg.path
    return str(folder)


def actor_env(cfg: ModelConfig) -> dict[str, str]:
    """Environment variables a run's Ray actors need to resolve `cfg.path` as this process did:
    the huggingface_hub settings here (cache, offline mode, token, endpoint) for a hub id."""
    from forge.models.hub import hub_env, names_hub_model

    return hub_env() if names_hub_model(cfg.path) else {}


# Files of which a saved tokenizer has at least one (an exotic one, such as tiktoken's, at
# least its tokenizer_config.json); without any, transformers 5's AutoTokenizer builds an
# empty tokenizer of the model type's class rather than fail.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tokenizer_config.json")


def generation_end_ids(path: str | Path) -> list[int]:
    """The end-of-sequence ids the checkpoint folder's generation_config.json lists, often more
    than the tokenizer's one eos (Llama-3.x-Instruct: 128001, 128008, 128009; Qwen2.5-Instruct:
    151645, 151643): generation stops at each. None without that file."""
    path = Path(path)
    if not (path / "generation_config.json").is_file():
        return []
    from transformers import GenerationConfig

    ends = GenerationConfig.from_pretrained(str(path)).eos_token_id
    if ends is None:
        return []
    return [int(end) for end in ([ends] if isinstance(ends, int) else ends)]


class TokenizerError(ConfigError):
    """A checkpoint folder whose tokenizer Forge cannot train with: none saved, no chat
    template, no end-of-turn token. The message names the folder and what to save into it."""


def load_tokenizer(path: str | Path):
    import json

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise TokenizerError(
            f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save the model's "
            f"tokenizer into it, tokenizer.save_pretrained({str(path)!r})"
        )
    config_file = path / "tokenizer_config.json"
    declared = json.loads(config_file.read_text()).get("tokenizer_class") if config_file.is_file() else None
    if declared in ("TokenizersBackend", "PreTrainedTokenizerFast") and (path / "tokenizer.json").is_file():
        # transformers 5's AutoTokenizer picks the model type's tokenizer class (e.g.
        # Qwen2Tokenizer), which rebuilds the pre-tokenizer and would silently change a
        # generic tokenizer.json; honour the class the checkpoint declares instead.
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.eos_token is None:
        raise TokenizerError(
            f"the tokenizer at {path} has no eos_token, which ends the model's turns: set "
            "tokenizer.eos_token to the token its chat template ends a turn with and save_pretrained it there"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise TokenizerError(
            f"the tokenizer at {path} has no chat template, which Forge renders every turn through: "
            "set tokenizer.chat_template (a Jinja template) and save_pretrained it there, or use the chat "
            "(instruct) version of the model"
        )
    return tokenizer


def refuse_tokenizer_past_embeddings(tokenizer: Any, config: Any, folder: str | Path) -> None:
    """A TokenizerError when the tokenizer gives ids the model has no embedding for: its own
    vocabulary (any text may tokenize to any of it) or its eos / pad token at or past the
    model's `vocab_size`. Else every episode whose text holds such a token errors with an
    IndexError from deep inside torch's embedding, read as the env's fault. Added tokens past
    the table that no text needs (a spare special token) are left alone."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    rows = getattr(text_config, "vocab_size", None)
    if not isinstance(rows, int):
        return
    needed = {"its vocabulary": tokenizer.vocab_size - 1}
    needed |= {
        f"its {name} {getattr(tokenizer, name)!r}": getattr(tokenizer, f"{name}_id")
        for name in ("eos_token", "pad_token")
    }
    past = [
        (what, token_id)
        for what, token_id in needed.items()
        if isinstance(token_id, int) and token_id >= rows
    ]
    if past:
        said = ", ".join(f"{what} (id {token_id})" for what, token_id in past)
        raise TokenizerError(
            f"the tokenizer at {folder} gives ids the model there has no embedding for: {said}, while its "
            f"embedding table has {rows} rows (config.json vocab_size), so any text holding such a token fails "
            "in the model's forward: save the tokenizer the model was trained with into that folder, or grow the "
            f"model's embeddings to it (model.resize_token_embeddings(len(tokenizer)), then model.save_pretrained({str(folder)!r}))"
        )


class GpuUnavailable(ConfigError, RuntimeError):
    """`model.device` (or a GPU reservation) asks for a GPU torch cannot see: a setting the
    user fixes, so the command says it in one line (a ConfigError), not a traceback."""


def resolve_device(setting: str, reserved_gpus: float | None = None) -> torch.device:
    """The device a model runs on for `model.device` = `setting`.

    `auto` follows the process's reservation when it has one (`reserved_gpus`: the trainer's
    `train.num_gpus`, a rollout worker's `rollout.num_gpus_per_worker`): CUDA when it includes
    a GPU, else CPU, so the placement never depends on what Ray leaves visible to an actor that
    reserved none. Without a reservation (`None`: a script, a benchmark), CUDA when torch sees one.
    """
    if setting == "cpu":
        return torch.device("cpu")
    if setting not in ("auto", "cuda"):
        raise ValueError(f"model.device must be 'auto', 'cpu' or 'cuda', got {setting!r}")
    wants_gpu = setting == "cuda" or (
        torch.cuda.is_available() if reserved_gpus is None else reserved_gpus > 0
    )
    if not wants_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise GpuUnavailable(
            f"model.device={setting!r} needs a GPU in this process"
            + (f" (it reserved {reserved_gpus:g})" if reserved_gpus else "")
            + f", but torch sees none (torch {torch.__version__}, CUDA_VISIBLE_DEVICES={visible!r}); "
            "install a CUDA build of torch, or set model.device: cpu"
        )
    return torch.device("cuda", torch.cuda.current_device())


def choose_attn_implementation(config, setting: str, device: str | torch.device, key: str) -> str:
    """The transformers attention to load a model of `config` with, for the setting `key` = `setting`.

    `auto` picks what the family supports: sdpa, else flex_attention on a GPU, else eager. An
    explicit choice the family lacks is Forge's error (a ConfigError: the `forge` command prints it
    and exits 2), naming `key`, before transformers' own."""
    from transformers import AutoModelForCausalLM

    model_class = AutoModelForCausalLM._model_mapping.get(type(config), None)
    supports = {
        "sdpa": getattr(model_class, "_supports_sdpa", True),
        "flex_attention": getattr(model_class, "_supports_flex_attn", True),
        "eager": True,
    }
    if setting == "auto":
        if supports["sdpa"]:
            return "sdpa"
        if supports["flex_attention"] and torch.device(device).type == "cuda":
            return "flex_attention"
        return "eager"
    if setting not in supports:
        raise ConfigError(f"{key} must be auto, sdpa, eager or flex_attention, got {setting!r}")
    if not supports[setting]:
        family = model_class.__name__ if model_class is not None else type(config).__name__
        others = ", ".join(name for name, ok in supports.items() if ok)
        raise ConfigError(
            f"{family} has no {setting} attention in transformers {_transformers_version()} (for instance "
            f"soft-capped attention logits, which sdpa cannot compute); set {key} to auto or one of: {others}"
        )
    return setting


def check_lora_targets(model: torch.nn.Module, targets: list[str]) -> None:
    """Refuse LoRA targets the model has no module for, naming the ones it has. peft adapts
    whichever targets exist without a word (Forge's q/k/v/o default on Phi3, whose attention is
    qkv_proj + o_proj, would train o_proj alone) and, when none exist, raises an error that
    names no Forge setting."""
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(name == t or name.endswith("." + t) for name in names)]
    if missing:
        linear = sorted(
            {
                name.rsplit(".", 1)[-1]
                for name, module in model.named_modules()
                if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")
            }
        )
        raise ConfigError(
            f"model.lora.target_modules names {missing}, which {type(model).__name__} has no module for; "
            f"its linear layers are {linear}: set model.lora.target_modules to some of them"
        )


def refuse_missing_lora_targets(config: Any, cfg: ModelConfig) -> None:
    """`check_lora_targets` before anything loads: on the model `config` describes, built on the
    meta device (its modules, no weights), so `forge train` and its dry run refuse the targets
    before Ray starts rather than in the trainer's process."""
    if not cfg.lora.enabled:
        return
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - a model transformers cannot build here is refused where it loads
        return
    check_lora_targets(model, list(cfg.lora.target_modules))


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def load_model(
    path: str | Path,
    cfg: ModelConfig,
    trainable: bool = False,
    device: str | torch.device = "cpu",
    attn_implementation: str = "auto",
    setting_key: str = "trainer.attn_implementation",
):
    """Load a causal LM with `from_pretrained` onto `device`; wrap it in LoRA adapters when configured.

    `attn_implementation` is the role's setting (`setting_key`: trainer.attn_implementation or
    rollout.attn_implementation), resolved by `choose_attn_implementation`.
    `device="meta"` reads only the checkpoint's config: the model has its shapes and no data
    (a data-parallel process that receives its weights from the first one, forge.train.distributed)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    quiet_transformers()
    config = AutoConfig.from_pretrained(str(path))
    implementation = choose_attn_implementation(config, attn_implementation, device, setting_key)
    if torch.device(device).type == "meta":
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                config, dtype=DTYPES[cfg.dtype], attn_implementation=implementation
            )
    else:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=DTYPES[cfg.dtype], attn_implementation=implementation
        ).to(device)
    if cfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        check_lora_targets(model, list(cfg.lora.target_modules))

        lora = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=list(cfg.lora.target_modules),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    model.train(trainable)
    if not trainable:
        model.requires_grad_(False)
    return model
