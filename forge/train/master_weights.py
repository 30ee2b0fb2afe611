"""AdamW that keeps float32 master copies of low-precision (bfloat16) weights, and sums their
micro-batch gradients in float32.

A bfloat16 weight keeps 8 significant bits: an AdamW step of about the learning rate rounds
away on every weight larger than 512 times it, so at RL's learning rates (1e-6) most of a
model's weights never move. This optimizer steps a float32 copy of each weight, kept in its
own state (saved and resumed with it, in float32), and writes the copy back rounded into the
weight, in place: the model, its forwards and the weights the engines receive stay bfloat16,
exactly what the engines sample with, while the small steps add up in the copy until they
move the rounded weight. Its moments are float32 too.

The parameter tensors are never swapped, only written, so the same optimizer steps the
parameters DDP holds in its gradient buckets and FSDP2's sharded DTensor parameters (each
process's copy is then of its shard).

Gradients summed over a step's micro-batches in bfloat16 lose what a micro-batch adds below
1/512 of the running sum; `accumulate_gradients`, called after each backward, moves each
micro-batch's gradient into a float32 sum the step then uses.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.adamw import adamw

MASTER = "master"  # the state key holding a parameter's float32 copy


class MasterWeightAdamW(torch.optim.AdamW):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # This step's float32 gradient sums, by parameter (`accumulate_gradients`); not saved.
        self.float_gradients: dict[torch.Tensor, torch.Tensor] = {}

    def parameters(self) -> list[torch.Tensor]:
        return [param for group in self.param_groups for param in group["params"]]

    @torch.no_grad()
    def accumulate_gradients(self) -> None:
        """Move every parameter's gradient (one micro-batch's) into its float32 sum, leaving
        `.grad` None for the next backward to fill."""
        for param in self.parameters():
            if param.grad is None:
                continue
            summed = self.float_gradients.get(param)
            if summed is None:
                self.float_gradients[param] = param.grad.to(torch.float32)
            else:
                summed.add_(param.grad)
            param.grad = None

    def gradients(self) -> list[torch.Tensor]:
        """The gradients the next step takes: the float32 sums, or `.grad` where none was summed."""
        out = (self.float_gradients.get(param, param.grad) for param in self.parameters())
        return [grad for grad in out if grad is not None]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.float_gradients.clear()
        super().zero_grad(set_to_none)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            copies, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], []
            written_back = []
            for param in group["params"]:
                grad = self.float_gradients.get(param, param.grad)
                if grad is None:
                    continue
                state = self.state[param]
                copy = self._float32_copy(param, state)
                if "step" not in state:  # as AdamW's lazy state, over the copy
                    on_device = group["capturable"] or group["fused"]
                    state["step"] = torch.zeros(
                        (), dtype=torch.float32, device=param.device if on_device else "cpu"
                    )
                    state["exp_avg"] = torch.zeros_like(copy, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(copy, memory_format=torch.preserve_format)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(copy, memory_format=torch.preserve_format)
                copies.append(copy)
                grads.append(grad.to(torch.float32))
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                if group["amsgrad"]:
                    max_exp_avg_sqs.append(state["max_exp_avg_sq"])
                steps.append(state["step"])
                if copy is not param:
                    written_back.append((param, copy))
            beta1, beta2 = group["betas"]
            adamw(
                copies,
                grads,
                exp_avgs,
                exp_avg_sqs,
                max_exp_avg_sqs,
                steps,
                foreach=group["foreach"],
                capturable=group["capturable"],
                differentiable=group["differentiable"],
                fused=group["fused"],
                amsgrad=group["amsgrad"],
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=group["maximize"],
            )
            for param, copy in written_back:
                param.copy_(copy)  # rounded to nearest, in place
        return loss

    def _float32_copy(self, param: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """What the step updates: a float32 parameter itself, else its copy in the state (made
        from the weight at its first step, or after a resume from a state saved without one)."""
        if param.dtype == torch.float32:
            return param
        if MASTER not in state:
            state[MASTER] = param.detach().to(torch.float32)
        return state[MASTER]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As AdamW's, but the master copies and the moments stay float32: torch casts a loaded
        state's floating tensors to their parameter's dtype, which would round them back to
        bfloat16 on every resume."""
        super().load_state_dict(state_dict)
        saved = [index for group in state_dict["param_groups"] for index in group["params"]]
        for index, param in zip(saved, self.parameters(), strict=True):
            for key, value in state_dict["state"].get(index, {}).items():
                if key != "step" and torch.is_tensor(value) and value.is_floating_point():
                    self.state[param][key] = value.to(device=param.device, dtype=torch.float32, copy=True)
