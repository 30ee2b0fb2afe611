"""A group's prompt KV held once for all its rows: the cache layer that keeps it, and the
attention that reads it (registered with transformers under Forge's own name).

A group's samples start from one prompt. Its KV is computed once; copying it into every row
cost more per decode step, outside the model's forward, than `generate` spends there at long
prompts (P=4096: the engine's 8-row copy alone was 0.2-0.4 s a call). Here the rows keep
only what follows the prompt; each attention call scores the rows' queries against the one
prompt copy as a single matrix product (the rows become extra queries of it), scores their
own keys apart, and joins the two softmax parts exactly (a shared maximum and denominator).
Used for sdpa models without sliding windows (or with windows no row can reach past), where
every row sees the whole prompt; others keep the copy.
"""

from __future__ import annotations

from typing import Any

import torch

from forge.rollout.engines.kv import _RoomyLayer

SHARED_KWARG = "forge_shared_prompt"  # model(...) keyword carrying the cache to each attention call
SHARED_IMPLEMENTATION = "forge_engine_sdpa"


class SharedPromptLayer(_RoomyLayer):
    """A cache layer whose first `prompt_length` positions are one `[1, heads, P, dim]` copy that
    every row shares; the rows' own positions after it grow in place (`_RoomyLayer`, whose
    `keys`/`values` hold only them). `get_seq_length` counts both, as transformers' masks do."""

    def __init__(self, prompt_keys: torch.Tensor, prompt_values: torch.Tensor, room: int) -> None:
        super().__init__(room=room)
        self.prompt_keys, self.prompt_values = prompt_keys, prompt_values
        # The attention computes in fp32 (as sdpa's kernels accumulate); a bf16 prompt is
        # converted once here, not at every step.
        self.prompt_keys_fp32, self.prompt_values_fp32 = prompt_keys.float(), prompt_values.float()
        self.reads = 0  # attention calls that used the shared prompt (the engine checks it)

    @property
    def prompt_length(self) -> int:
        return self.prompt_keys.shape[2]

    def get_seq_length(self) -> int:
        return self.prompt_length + self.length

    def row(self, row: int, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row `row`'s keys and values at these columns of the whole layout (prompt first)."""
        if self.length:
            keys = torch.cat([self.prompt_keys, self.keys[row : row + 1]], dim=2)
            values = torch.cat([self.prompt_values, self.values[row : row + 1]], dim=2)
        else:
            keys, values = self.prompt_keys, self.prompt_values
        return keys[:, :, columns], values[:, :, columns]

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a shared-prompt layer is never cropped")


def _shared_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    layer: SharedPromptLayer,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
) -> torch.Tensor:
    """softmax over [prompt keys | the row's own keys] of `query` (rows, heads, q, dim), with
    the row's own part masked by the last columns of `attention_mask` (or causally)."""
    rows, heads, q_len, dim = query.shape
    prompt_k, prompt_v = layer.prompt_keys_fp32[0], layer.prompt_values_fp32[0]  # (kv_heads, P, dim)
    out_dtype, query = query.dtype, query.float()
    kv_heads = prompt_k.shape[0]
    groups = heads // kv_heads
    scale = scaling if scaling is not None else dim**-0.5
    grouped = query.reshape(rows, kv_heads, groups * q_len, dim)
    # Against the prompt: every row's queries in one product per kv head.
    folded = grouped.transpose(0, 1).reshape(kv_heads, rows * groups * q_len, dim)
    prompt_scores = torch.matmul(folded, prompt_k.transpose(-1, -2)).mul_(scale)
    prompt_scores = prompt_scores.view(kv_heads, rows, groups * q_len, -1).transpose(0, 1)
    maximum = prompt_scores.amax(-1, keepdim=True)
    own_k, own_v = layer.keys.float(), layer.values.float()
    own_scores = None
    if own_k.shape[2]:
        own_scores = torch.matmul(grouped, own_k.transpose(-1, -2)).mul_(scale)  # (rows, kv, g*q, own)
        own = own_k.shape[2]
        if attention_mask is not None:
            visible = attention_mask[..., -own:]
            if visible.dtype != torch.bool:
                visible = visible == 0
        else:  # transformers skipped the mask: no pads, causal within the new tokens
            key_index = torch.arange(own, device=query.device)
            query_index = torch.arange(own - q_len, own, device=query.device)
            visible = (key_index[None, :] <= query_index[:, None])[None, None]
        visible = visible.expand(rows, 1, q_len, own)[:, :, None].expand(rows, 1, groups, q_len, own)
        own_scores.masked_fill_(~visible.reshape(rows, 1, groups * q_len, own), float("-inf"))
        maximum = torch.maximum(maximum, own_scores.amax(-1, keepdim=True))
    prompt_weights = torch.exp(prompt_scores - maximum)
    total = prompt_weights.sum(-1, keepdim=True)
    folded_weights = prompt_weights.transpose(0, 1).reshape(kv_heads, rows * groups * q_len, -1)
    out = torch.matmul(folded_weights, prompt_v).view(kv_heads, rows, groups * q_len, dim).transpose(0, 1)
    if own_scores is not None:
        own_weights = torch.exp(own_scores - maximum)
        total = total + own_weights.sum(-1, keepdim=True)
        out = out + torch.matmul(own_weights, own_v)
    out = (out / total).to(out_dtype)
    return out.reshape(rows, heads, q_len, dim).transpose(1, 2).contiguous()


def shared_prompt_sdpa(module, query, key, value, attention_mask, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, except in a forward that passes the engine's cache under
    `SHARED_KWARG` and whose layer holds a shared prompt."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cache = kwargs.pop(SHARED_KWARG, None)
    layer = cache.layers[module.layer_idx] if cache is not None else None
    if not isinstance(layer, SharedPromptLayer):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    layer.reads += 1
    return _shared_attention(module, query, layer, attention_mask, kwargs.get("scaling")), None


_registered = False


def register_shared_prompt_attention() -> None:
    """Register `shared_prompt_sdpa` (and sdpa's mask builder) under `SHARED_IMPLEMENTATION`."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(SHARED_IMPLEMENTATION, shared_prompt_sdpa)
    AttentionMaskInterface.register(SHARED_IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    _registered = True


def can_share_prompt(model: Any, windows: Any) -> bool:
    """Whether `model` computes plain sdpa attention (no sliding window that can bind, soft-cap
    or sinks), so the shared-prompt attention reproduces it."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    implementation = getattr(config, "_attn_implementation", None)
    if (windows is not None and windows.binds) or implementation not in ("sdpa", SHARED_IMPLEMENTATION):
        return False
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return False
    if any(name.endswith("sinks") for name, _ in model.named_parameters()):
        return False
    return True


def loaded_attention(config: Any) -> str:
    """The transformers attention a model computes with (sdpa under the shared-prompt one)."""
    implementation = config._attn_implementation
    return "sdpa" if implementation == SHARED_IMPLEMENTATION else implementation


def use_shared_prompt_attention(model: Any) -> None:
    register_shared_prompt_attention()
    model.config._attn_implementation = SHARED_IMPLEMENTATION
