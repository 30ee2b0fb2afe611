"""New weights for a serving engine: read from a checkpoint folder, a LoRA adapter folder
(peft's `save_pretrained` layout), or safetensors bytes pushed over HTTP; and the trainer's
side of an adapter folder (`trainer_save_adapter`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


class WeightUpdateError(ValueError):
    """An update the server cannot apply; the message names what to fix."""


def checkpoint_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the `*.safetensors` files in a Hugging Face checkpoint folder."""
    from safetensors.torch import load_file

    folder = Path(path)
    if not folder.is_dir():
        raise WeightUpdateError(f"checkpoint folder {str(folder)!r} does not exist on the server")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightUpdateError(
            f"{folder} holds no *.safetensors files; save the model with save_pretrained(safe_serialization=True)"
        )
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def tensors_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """A state dict sent as one safetensors blob (`safetensors.torch.save`)."""
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise WeightUpdateError(
            f"the body is not a safetensors blob ({exc}); send safetensors.torch.save(state)"
        ) from None


def tensors_to_bytes(state: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({name: tensor.detach().to("cpu").contiguous() for name, tensor in state.items()})


def apply_adapter(model: Any, path: str | Path) -> Any:
    """Load a peft LoRA adapter folder into `model`: wrapped with peft on the first adapter,
    its adapter weights replaced afterwards. Returns the model to generate with."""
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(path)
    config_file, weights_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise WeightUpdateError(
            f"{folder} is not a LoRA adapter folder (needs adapter_config.json and adapter_model.safetensors, "
            "as peft's save_pretrained writes them)"
        )
    if isinstance(model, PeftModel):
        new = json.loads(config_file.read_text())
        old = model.peft_config["default"]
        if int(new.get("r", old.r)) != old.r or sorted(new.get("target_modules") or []) != sorted(
            old.target_modules
        ):
            raise WeightUpdateError(
                f"adapter {folder} (r={new.get('r')}, targets {new.get('target_modules')}) does not match the "
                f"loaded one (r={old.r}, targets {sorted(old.target_modules)}); restart the server to change it"
            )
        result = set_peft_model_state_dict(model, load_file(str(weights_file)))
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise WeightUpdateError(
                f"adapter {folder} has {len(unexpected)} tensors the model lacks, e.g. {unexpected[:3]}"
            )
        return model
    wrapped = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    wrapped.eval()
    return wrapped


def trainer_save_adapter(trainer: Any, path: str) -> str:
    """Run inside the trainer actor (`__ray_call__`): its LoRA adapters as a peft adapter
    folder (adapter_config.json, adapter_model.safetensors) at `path`, the layout vLLM's
    `/v1/load_lora_adapter` and `apply_adapter` read."""
    from peft import PeftModel

    model = trainer.model
    if not isinstance(model, PeftModel):
        raise WeightUpdateError(
            "the trainer holds no LoRA adapters (model.lora.enabled is false): send full weights"
        )
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    return str(folder)
