"""The rollout engine on models whose sliding window is longer than any row can be (its
rollout.max_context_tokens, which it refuses past): such a window never binds, so a group
shares its prompt's KV as on a model without one (Phi-3-mini-128k's 262143), exactly; a window
that can bind keeps the copy and the position-counted masks, and the engine's check still
catches one that is mishandled."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from test_engine_families import fresh_logprobs, play_group

from forge.config import ModelConfig
from forge.models.families import FAMILIES, SHAPE, WINDOW
from forge.models.loading import load_model
from forge.rollout.engines.hf import HFEngine
from forge.rollout.engines.kv import _RoomyLayer
from forge.rollout.engines.protocol import GenerationRequest
from forge.rollout.engines.shared_prefix import SharedPromptLayer

TOLERANCE = 1e-5
CONTEXT = 64  # rollout.max_context_tokens in these tests; play_group's rows stay within it


def saved(tmp_path: Path, name: str, **config: object) -> torch.nn.Module:
    """A tiny random-init model of family `name` with `config` over the family's, saved and
    loaded back through model.path as a run loads it (sdpa)."""
    family = FAMILIES[name]
    built = getattr(transformers, family.config_class)(**{**SHAPE, **family.config, **config})
    torch.manual_seed(0)
    getattr(transformers, family.model_class)(built).save_pretrained(tmp_path)
    model = load_model(
        tmp_path,
        ModelConfig(path=str(tmp_path)),
        attn_implementation="sdpa",
        setting_key="rollout.attn_implementation",
    )
    return model.eval()


@pytest.mark.parametrize(("name", "window"), [("phi3", 262143), ("mistral", 1 << 17)])
def test_a_window_longer_than_the_context_shares_the_groups_prompt_exactly(tmp_path, name, window):
    model = saved(tmp_path, name, sliding_window=window)
    assert model.config.sliding_window == window  # declared, as the checkpoint says
    engine = HFEngine(model, [1], pad_token_id=0, seed=3, max_context_tokens=CONTEXT)
    assert engine.share_prompt  # the engine's check passed on the shared path, window as declared
    # A group of 4 on one prompt, then ragged turns with pad holes: every token's logprob is a
    # fresh forward's; the first turn's cache holds the prompt once for all the rows.
    assert play_group(engine, model, turns=4) is SharedPromptLayer
    contexts = [list(range(5, 5 + 3 * WINDOW))] * 8
    engine.generate([GenerationRequest(c, 3, episode_id=f"e{i}") for i, c in enumerate(contexts)])
    layer = engine._batch.cache.layers[0]
    assert layer.prompt_keys.shape[:3] == (1, 2, 3 * WINDOW) and layer.keys.shape[0] == 8


@pytest.mark.parametrize("chunk", [0, 5])
def test_a_window_shorter_than_the_context_still_copies_the_prompt_exactly(tmp_path, chunk):
    """Also with the prompt prefilled 5 tokens at a time: chunk edges inside the window."""
    model = saved(tmp_path, "phi3", sliding_window=2 * WINDOW)  # play_group's prompt is 3 windows long
    engine = HFEngine(
        model, [1], pad_token_id=0, seed=3, max_context_tokens=CONTEXT, prefill_chunk_tokens=chunk
    )
    assert not engine.share_prompt
    assert play_group(engine, model, turns=4) is _RoomyLayer


def test_qwen2_with_its_window_switched_off_shares_the_prompt(tmp_path):
    """Qwen2 checkpoints carry a sliding_window with use_sliding_window: false, which transformers
    reads as no window at all."""
    model = saved(tmp_path, "qwen2", use_sliding_window=False, sliding_window=4096, max_window_layers=0)
    assert HFEngine(model, [1], pad_token_id=0, max_context_tokens=CONTEXT * 1000).share_prompt


@pytest.mark.parametrize(("share", "chunk"), [(True, 0), (False, 0), (True, 6), (False, 6)])
def test_pad_holes_wider_than_a_window_that_cannot_bind_keep_full_attention(tmp_path, share, chunk):
    """A window of max_context_tokens + 1 binds in no row, but ragged turns leave pad holes that
    widen the kept batch past it; transformers counts windows in the batch's columns, so there
    the engine passes its own masks (full attention by position) instead of the 2-D one. With
    chunks of 6 tokens the long observations are prefilled 3 columns at a time, the first
    chunks of the short row all pads, the kept batch's columns crossing the window mid-turn."""
    window = CONTEXT + 1
    model = saved(tmp_path, "mistral", sliding_window=window)
    engine = HFEngine(
        model,
        [1],
        pad_token_id=0,
        seed=5,
        share_prompt=share,
        max_context_tokens=CONTEXT,
        prefill_chunk_tokens=chunk,
    )
    assert engine.share_prompt == share
    prompt = [5, 6, 7, 8]
    contexts = {"a": list(prompt), "b": list(prompt)}
    # Each turn one episode gets a long observation and the other a short one: the kept batch
    # grows by the longer, leaving holes in the other row, until its last columns' window (in
    # columns) would start past the shared prompt and a's first own tokens.
    observations = [{"a": 0, "b": 0}, {"a": 30, "b": 1}, {"a": 1, "b": 36}]
    for turn, lengths in enumerate(observations):
        for name, n in lengths.items():
            contexts[name] = contexts[name] + [30 + turn] * n
        requests = [GenerationRequest(contexts[name], 3, episode_id=name) for name in contexts]
        assert all(len(r.token_ids) + r.max_new_tokens <= CONTEXT for r in requests)
        for request, result in zip(requests, engine.generate(requests), strict=True):
            want = fresh_logprobs(model, request.token_ids, result.token_ids)
            assert (torch.tensor(result.logprobs) - want).abs().max().item() <= TOLERANCE, (
                turn,
                request.episode_id,
            )
            contexts[request.episode_id] = request.token_ids + result.token_ids
    assert engine._batch.mask.shape[1] > window + len(prompt) + 6  # more columns than the window reaches
    layers = engine._batch.cache.layers
    assert all(isinstance(layer, SharedPromptLayer) == share for layer in layers)


def test_the_engine_refuses_a_request_that_would_grow_past_its_context(tmp_path):
    """The bound the windows are judged by is enforced: a row never holds more."""
    model = saved(tmp_path, "mistral", sliding_window=CONTEXT + 1)
    engine = HFEngine(model, [1], pad_token_id=0, max_context_tokens=CONTEXT)
    engine.generate([GenerationRequest(list(range(2, CONTEXT - 2)), 4)])  # exactly the context: fine
    with pytest.raises(ValueError, match=r"context of 64 tokens \(rollout.max_context_tokens\)"):
        engine.generate([GenerationRequest(list(range(2, CONTEXT - 2)), 5)])
    with pytest.raises(ValueError, match="max_context_tokens"):
        HFEngine(model, [1], pad_token_id=0, max_context_tokens=0)


def test_the_engine_check_catches_a_mishandled_window_that_binds_and_passes_one_that_cannot(
    tmp_path, monkeypatch
):
    """With the engine's position-counted masks replaced by the 2-D mask (transformers then
    counts the window in columns, pad holes included), a window within the context is shrunk
    by the check until it binds, and the check refuses the model; one longer than the context
    is left as declared, binds nowhere, and passes on the shared path."""
    monkeypatch.setattr(HFEngine, "_attention", lambda self, mask, new_tokens: mask)
    binding = saved(tmp_path / "binding", "mistral", sliding_window=CONTEXT)
    with pytest.raises(ValueError, match="behaviour logprobs differ from a fresh forward"):
        HFEngine(binding, [1], pad_token_id=0, max_context_tokens=CONTEXT)
    unbound = saved(tmp_path / "unbound", "mistral", sliding_window=CONTEXT + 1)
    assert HFEngine(unbound, [1], pad_token_id=0, max_context_tokens=CONTEXT).share_prompt
    assert unbound.config.sliding_window == CONTEXT + 1  # restored
