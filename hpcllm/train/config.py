"""The `train` section of a job spec (filled in by the trainer)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    max_steps: int = 100
    seed: int = 1337
