"""The rollout engine checked against fresh forwards through the loaded model, before it samples.

Families nobody has tested may keep in their cache something other than the keys their
attention reads (MLA's compressed latents), combine attention outputs in their own way
(differential attention), mask by a rule the engine's masks do not count by position, or
keep recurrent state (SSM / linear-attention layers) instead of KV. Behaviour logprobs would
then not be the policy's, silently or with an error from deep inside transformers. A few
tiny generate calls here (a group's shared prompt, ragged later turns with pad holes, an
episode joining, a turn that parts from its cache) are compared with fresh forwards: the shared prompt is dropped where it
disagrees, and a model the engine cannot sample exactly is refused, naming the setting.
Sliding windows are shrunk for the calls so that they bind, except those longer than the
engine's context, which never bind: those are played as declared (the engine shares the prompt
over them, and the check must see that path).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from forge.tree.agreement import Look, agreement, is_low_precision
from forge.tree.attention import layer_types_named
from forge.tree.self_check import CHECK_WINDOW, packed_logprobs, shrunk_windows

# Layer kinds the engine's KV cache serves (transformers' `layer_types`).
KV_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention"}
REFUSE_HINT = (
    "the in-process engine (rollout.engine: inprocess or server) cannot sample it exactly; "
    "use rollout.engine: remote with a vLLM or SGLang server (rollout.servers: vllm+http://...)"
)


def unsupported_reason(config: Any) -> str | None:
    """Why the engine's attention KV cache cannot serve a model of `config`, known from the
    config alone, or None."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    name = type(config).__name__
    if (
        getattr(config, "attention_chunk_size", None) is not None
        and getattr(config, "layer_types", None) is None
    ):
        return f"{name} uses chunked attention (attention_chunk_size={config.attention_chunk_size}) on unnamed layers"
    if "local" in (getattr(config, "attention_layers", None) or []):
        # GPT-Neo: the window is baked into each layer's mask buffer at init, in sequence
        # columns (pad holes would shorten it), and too long for the check's short sequences.
        return f"{name} has local attention layers (window_size={getattr(config, 'window_size', None)})"
    other = sorted(set(getattr(config, "layer_types", None) or []) - KV_LAYER_TYPES)
    if other:
        return (
            f"{name} has layers of type {layer_types_named(other)}, which the engine's attention KV cache "
            f"does not hold (it serves {', '.join(sorted(KV_LAYER_TYPES))})"
        )
    return None


POSITION_TABLES = {"wpe", "embed_positions", "position_embeddings"}  # GPT-2, GPT-Neo, OPT, BioGPT


def position_limit(model: Any) -> int | None:
    """The positions a model with a learned absolute position table can embed (GPT-2's wpe,
    OPT's embed_positions less its offset), or None for rotary, ALiBi and sinusoidal ones."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding) and name.rsplit(".", 1)[-1] in POSITION_TABLES:
            return module.num_embeddings - int(getattr(module, "offset", 0))
    return None


def rope_switch_limit(config: Any) -> tuple[int, str] | None:
    """(the longest sequence, rope type) for a RoPE whose frequencies transformers picks per
    forward from the largest position in it: longrope (Phi-3/3.5 long-context, Phi-4-mini)
    switches every position to its long factors once a forward reaches past
    original_max_position_embeddings, dynamic NTK rescales past max_position_embeddings. A
    padded or packed batch then scales a short sequence by its longest neighbour, and a cached
    turn's keys keep the scaling they were computed under: neither is that sequence's own
    forward, so the trainer's logprobs would not be the sampler's. None for every other RoPE."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    found = [parameters] if "rope_type" in parameters or "type" in parameters else list(parameters.values())
    for params in found:
        if not isinstance(params, dict):
            continue
        kind = params.get("rope_type", params.get("type", ""))
        if kind == "longrope":
            limit = params.get("original_max_position_embeddings") or getattr(
                config, "original_max_position_embeddings", None
            )
        elif "dynamic" in kind:
            limit = getattr(config, "max_position_embeddings", None)
        else:
            continue
        if limit:
            return int(limit), kind
    return None


def rope_switch_message(max_context_tokens: int, limit: int, kind: str, model_name: str) -> str:
    """Why rollout.max_context_tokens cannot be trained exactly on a model whose RoPE switches at `limit`."""
    return (
        f"rollout.max_context_tokens={max_context_tokens} runs past the {limit} tokens after which {model_name}'s "
        f"{kind} RoPE changes the frequencies of every position in a forward (transformers picks them by the "
        f"forward's longest sequence): a packed or padded batch, and a turn after a cached one, would score "
        f"tokens under another scaling than their own sequence's, so the trainer would not train the policy "
        f"that sampled; set rollout.max_context_tokens to at most {limit}"
    )


def past_positions_message(max_context_tokens: int, limit: int, model_name: str) -> str:
    """Why rollout.max_context_tokens cannot be served by a model that learned `limit` positions."""
    return (
        f"rollout.max_context_tokens={max_context_tokens} runs past the {limit} positions {model_name} has "
        f"learned embeddings for (an episode's prompt, replies and observations must fit in them); set "
        f"rollout.max_context_tokens to at most {limit}"
    )


def refuse_context_past_positions(model_path: str, folder: Any, max_context_tokens: int) -> None:
    """Before Ray starts: a ConfigError when the checkpoint in `folder` learned fewer positions
    than rollout.max_context_tokens (GPT-2's wpe, OPT's embed_positions), or its RoPE changes
    scaling within them (`rope_switch_limit`). Every engine's
    trainer runs the model itself, so this holds for remote engines too; else the refusal
    came from each rollout worker's start, or an IndexError from the trainer's forward."""
    from pathlib import Path

    from transformers import AutoConfig, AutoModelForCausalLM

    from forge.config import ConfigError

    if not (Path(folder) / "config.json").is_file():
        return
    with torch.device("meta"):  # the module tree only: no weights read or allocated
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder)))
    limit = position_limit(model)
    if limit is not None and max_context_tokens > limit:
        raise ConfigError(
            f"model.path={model_path!r}: {past_positions_message(max_context_tokens, limit, type(model).__name__)}"
        )
    switch = rope_switch_limit(model.config)
    if switch is not None and max_context_tokens > switch[0]:
        message = rope_switch_message(max_context_tokens, *switch, type(model).__name__)
        raise ConfigError(f"model.path={model_path!r}: {message}")


def refuse_unservable(model_path: str | None, engine: str, folder: Any = None) -> None:
    """Before Ray starts: a ConfigError for a checkpoint at `model_path` (read from `folder`,
    its local folder, when given: a hub id's snapshot) that the in-process engine cannot serve,
    known from its config (rollout.engine: remote passes)."""
    from pathlib import Path

    from forge.config import ConfigError

    folder = Path(folder if folder is not None else model_path or "").expanduser()
    if model_path is None or engine == "remote" or not (folder / "config.json").is_file():
        return
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder))
    reason = unsupported_reason(config)
    if reason is not None:
        raise ConfigError(f"model.path={model_path!r}: {reason}; {REFUSE_HINT}")


def _fresh(model: Any, context: list[int], generated: list[int], device: torch.device) -> torch.Tensor:
    ids = torch.tensor([context + generated], device=device)
    logits = model(input_ids=ids, use_cache=False).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    rows = torch.arange(len(context) - 1, len(context) - 1 + len(generated), device=device)
    return logprobs[rows, torch.tensor(generated, device=device)].cpu()


# The probes' prefill chunk (rows x columns): a group's prompt in chunks of 2 windows less
# one, ragged later turns in chunks of a few columns, so chunk edges fall inside windows and pads.
CHECK_CHUNK = 2 * CHECK_WINDOW - 1
# The most tokens a row of `_play` holds: its prompt, then 3 turns of 3 new tokens and an
# observation of up to 4.
PLAY_TOKENS = 3 * CHECK_WINDOW + 3 * (3 + 4)


def _play(engine: Any, vocab: int, noise: bool, seed: int = 0) -> Look:
    """Four calls through `engine`: a group of 3 on one prompt, two of them back with
    observations of different lengths (pad holes), then those and a new episode (a new
    layout from the kept caches), then the third back with a token of its first reply changed
    (a client that re-rendered it: its cache is kept up to there). Per sampled token, its behaviour logprob's error against a
    fresh forward; with `noise`, also that of a padded batch of the same sequences (two exact
    computations: how far the dtype alone moves them). Episodes are named by `seed`, so a
    second play on the same engine starts its own."""
    from forge.rollout.engines.protocol import GenerationRequest

    generator = torch.Generator().manual_seed(seed)

    def tokens(n: int) -> list[int]:
        return torch.randint(2, vocab, (n,), generator=generator).tolist()

    prompt = tokens(3 * CHECK_WINDOW)
    contexts = {f"{seed}c{i}": list(prompt) for i in range(3)}
    calls = [
        [f"{seed}{name}" for name in call]
        for call in (["c0", "c1", "c2"], ["c0", "c2"], ["c2", "c0", "new"], ["c1"])
    ]
    errors: list[float] = []
    noises: list[float] = []
    for turn, names in enumerate(calls):
        if f"{seed}new" in names:
            contexts[f"{seed}new"] = tokens(CHECK_WINDOW + 3)
        if names == [f"{seed}c1"]:
            parted = contexts[f"{seed}c1"]
            parted[len(prompt) + 1] = 2 + (parted[len(prompt) + 1] - 1) % (vocab - 2)  # another token
        requests = [GenerationRequest(contexts[n], 3, episode_id=n) for n in names]
        sampled = []
        for i, (request, result) in enumerate(zip(requests, engine.generate(requests), strict=True)):
            if result.token_ids:
                want = _fresh(engine.model, request.token_ids, result.token_ids, engine.device)
                errors += (torch.tensor(result.logprobs) - want).abs().tolist()
                sampled.append((request.token_ids + result.token_ids, len(result.token_ids), want))
            contexts[request.episode_id] = (
                request.token_ids + result.token_ids + tokens(1 + (2 * i + turn) % 4)
            )
        if noise and sampled:
            padded = packed_logprobs(engine.model, [tokens_ for tokens_, _, _ in sampled], "padded")
            for logprobs, (_, n, want) in zip(padded, sampled, strict=True):
                noises += (logprobs[-n:].cpu() - want).abs().tolist()
    return errors, noises


def check_engine(
    engine_class: type,
    model: Any,
    pad_token_id: int,
    share_prompt: bool,
    longest: int | None = None,
    chunked: bool = True,
) -> bool:
    """Whether an `engine_class` (HFEngine, passed in: it calls this) engine may share a group's
    prompt KV on `model` (it asked to and the check agrees); raises ValueError, naming the
    setting, where the engine cannot sample it exactly. `longest`: the engine's context
    (max_context_tokens); windows longer than it are checked as declared, not shrunk.
    `chunked`: the engine prefills in chunks, which the check's probes then do at CHECK_CHUNK."""
    # What it finds is the model's structure, not its weights: once per model object (a
    # worker's engine is built once; a test builds many over one model).
    memo = model.__dict__.setdefault("_forge_engine_check", {})
    key = (share_prompt, longest, chunked)
    if key not in memo:
        try:
            memo[key] = _check(engine_class, model, pad_token_id, share_prompt, longest, chunked)
        except ValueError as error:
            memo[key] = str(error)  # not the exception: its traceback holds the probe's caches
    if isinstance(memo[key], str):
        raise ValueError(memo[key])
    return memo[key]


def _check(
    engine_class: type, model: Any, pad_token_id: int, share_prompt: bool, longest: int | None, chunked: bool
) -> bool:
    name = type(model).__name__
    reason = unsupported_reason(model.config)
    if reason is not None:
        raise ValueError(f"{name}: {reason}; {REFUSE_HINT}")
    dtype = model.get_input_embeddings().weight.dtype
    vocab = int(model.get_input_embeddings().weight.shape[0])
    was_training = model.training
    model.eval()
    findings = []
    # The probe holds the play's rows: a window between the engine's context and the play's
    # (a context under PLAY_TOKENS) then binds in the probe and is checked on the copy.
    context = max(longest, PLAY_TOKENS) if longest is not None else None
    try:
        for share in [True, False] if share_prompt else [False]:
            with torch.no_grad(), shrunk_windows(model, CHECK_WINDOW, longest):
                # Temperature 1: behaviour logprobs are then the model's own, as a fresh forward's.
                probe = engine_class(
                    model,
                    [],
                    pad_token_id,
                    temperature=1.0,
                    share_prompt=share,
                    self_check=False,
                    max_context_tokens=context,
                    prefill_chunk_tokens=CHECK_CHUNK if chunked else 0,
                )
                if share and not probe.share_prompt:
                    continue
                try:
                    verdict = agreement(partial(_play, probe, vocab, is_low_precision(dtype)), dtype)
                except Exception as failure:  # noqa: BLE001 - any failure of the engine's path is the finding
                    findings.append(f"{type(failure).__name__}: {failure}")
                    continue
                finally:
                    probe.restore_attention()
            if verdict.ok:
                return share
            findings.append(
                f"behaviour logprobs differ from a fresh forward's: {verdict.describe('difference')}"
            )
    finally:
        model.train(was_training)
    raise ValueError(f"{name}: {findings[-1]}; {REFUSE_HINT}")
