"""AdamW that keeps float32 master copies of low-precision (bfloat16) weights.

A bfloat16 weight keeps 8 significant bits: an AdamW step of about the learning rate rounds
away on every weight larger than 512 times it, so at RL's learning rates (1e-6) most of a
model's weights never move. This optimizer steps a float32 copy of each weight, kept in its
own state (saved and resumed with it, in float32), and writes the copy back rounded to the
weight's dtype: the model, its forwards and the weights the engines receive stay bfloat16,
exactly what the engines sample with, while the small steps add up in the copy until they
move the rounded weight. Its moments are float32 too.
"""

from __future__ import annotations

from typing import Any

import torch

MASTER = "master"  # the state key holding a parameter's float32 copy


class MasterWeightAdamW(torch.optim.AdamW):
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        swapped = []
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None or param.dtype == torch.float32:
                    continue
                # A first step's copy joins the state after AdamW's, which initializes its
                # moments only in an empty state.
                master = self.state[param].get(MASTER)
                if master is None:
                    master = param.detach().to(torch.float32)
                swapped.append((param, param.data, param.grad))
                param.data, param.grad = master, param.grad.to(torch.float32)
        try:
            return super().step(closure)
        finally:
            for param, low, grad in swapped:
                self.state[param][MASTER] = param.data  # AdamW updated it in place
                low.copy_(param.data)  # rounded to nearest
                param.data, param.grad = low, grad

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As AdamW's, but the master copies and the moments stay float32: torch casts a loaded
        state's floating tensors to their parameter's dtype, which would round them back to
        bfloat16 on every resume."""
        super().load_state_dict(state_dict)
        saved = [index for group in state_dict["param_groups"] for index in group["params"]]
        current = [param for group in self.param_groups for param in group["params"]]
        for index, param in zip(saved, current, strict=True):
            for key, value in state_dict["state"].get(index, {}).items():
                if key != "step" and torch.is_tensor(value) and value.is_floating_point():
                    self.state[param][key] = value.to(device=param.device, dtype=torch.float32, copy=True)
