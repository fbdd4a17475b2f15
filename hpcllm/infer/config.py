"""The `infer` section of a job spec (filled in by the inference job)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class InferConfig:
    mode: str = "generate"
