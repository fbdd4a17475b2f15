"""Next-token choice: greedy, temperature, top-k, top-p — with one random stream per record.

Each record's generator is seeded from (seed, record id) and draws exactly one uniform number per
generated token, whatever else is in the batch, and the nucleus and the draw are computed in
float64. What a batch can still change is the logits themselves: another batch shape changes them
by float rounding (about 1e-6 relative in fp32), and that changes a token only when two candidates
are that close — the top two logits for greedy, the draw and a boundary of the cumulative
distribution or the top-p/top-k cut for sampling. So a record's output does not depend on its
batch, its position there, the batch size, the rank count or the schedule, up to such float ties
(docs/inference.md: how often they occur).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int = 0

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def record_seed(seed: int, record_id: int) -> int:
    # splitmix64-style mixing so neighbouring ids get unrelated streams
    z = (seed * 0x9E3779B97F4A7C15 + record_id + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


def filtered_logprobs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """(B, V) logits -> log-probabilities after temperature, top-k and top-p (masked = -inf), in
    float64: the nucleus and the draw are decided with no rounding of their own beyond the logits'."""
    logits = logits.double() / p.temperature
    if p.top_k and p.top_k < logits.size(-1):
        kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= p.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.log_softmax(logits, dim=-1)


def choose(logits: torch.Tensor, p: SamplingParams, generators: list[torch.Generator] | None) -> torch.Tensor:
    """Pick one token per row. Sampling is inverse-CDF on one uniform per row from the row's own
    generator (drawn on the CPU so the stream is the same on any device)."""
    if p.greedy:
        return torch.argmax(logits, dim=-1)
    probs = filtered_logprobs(logits, p).exp()
    u = torch.tensor([torch.rand((), generator=g, dtype=torch.float64).item() for g in generators],
                     dtype=torch.float64, device=probs.device)
    cdf = torch.cumsum(probs, dim=-1)
    cdf = cdf / cdf[:, -1:]
    idx = torch.searchsorted(cdf, u[:, None]).squeeze(1)
    return idx.clamp(max=probs.size(-1) - 1)


def make_generators(seed: int, record_ids: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(record_seed(seed, r)) for r in record_ids]
