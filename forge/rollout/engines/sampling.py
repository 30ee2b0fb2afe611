"""Per-row sampling for a batch: each request's temperature, top-p, seed and top-k
logprobs, falling back to the engine's settings."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from forge.rollout.engines.protocol import GenerationRequest


@dataclass
class RowSampling:
    temperature: torch.Tensor  # [rows]; 0 is greedy
    top_p: torch.Tensor  # [rows]
    generators: list[tuple[int, torch.Generator]]  # (row, its own stream) for each seeded request
    top_k_logprobs: int  # the most any row asked for
    truncates: bool  # some row has top_p < 1
    any_greedy: bool
    tempered: bool  # some row samples at a temperature other than 0 or 1

    @classmethod
    def of(
        cls, requests: list[GenerationRequest], temperature: float, top_p: float, device: torch.device
    ) -> RowSampling:
        for request in requests:
            if request.temperature is not None and request.temperature < 0:
                raise ValueError(f"temperature={request.temperature}: use 0 (greedy) or more")
            if request.top_p is not None and not 0 < request.top_p <= 1:
                raise ValueError(f"top_p={request.top_p}: use a value in (0, 1]")
        temperatures = [temperature if r.temperature is None else r.temperature for r in requests]
        top_ps = [top_p if r.top_p is None else r.top_p for r in requests]
        generators = [
            (row, torch.Generator(device=device).manual_seed(r.seed))
            for row, r in enumerate(requests)
            if r.seed is not None
        ]
        return cls(
            torch.tensor(temperatures, device=device)[:, None],
            torch.tensor(top_ps, device=device)[:, None],
            generators,
            max(r.top_logprobs for r in requests),
            min(top_ps) < 1,
            min(temperatures) == 0,
            any(t not in (0, 1) for t in temperatures),
        )

    def sample(
        self, logits: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sampled tokens, their logprobs under the row's tempered distribution, and that
        distribution's log-softmax (for top logprobs). Greedy rows report the model's own
        (temperature 1) logprobs, since their sampling distribution is a point mass."""
        scaled = logits.float()
        if self.tempered:  # at temperature 1 (and greedy) the logits are used as they are
            scaled = scaled / torch.where(self.temperature == 0, 1.0, self.temperature)
        logprobs = torch.log_softmax(scaled, dim=-1)
        probs = logprobs.exp()
        if self.truncates:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs > self.top_p
            sorted_probs = sorted_probs.masked_fill(outside, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        for row, own in self.generators:  # seeded rows only: no Python loop over the batch per token
            tokens[row] = torch.multinomial(probs[row], 1, generator=own)[0]
        if self.any_greedy:
            tokens = torch.where((self.temperature == 0).squeeze(-1), logits.argmax(-1), tokens)
        return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1), logprobs
