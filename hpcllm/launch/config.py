"""The `slurm` section of a job spec (filled in by the launch layer)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SlurmConfig:
    nodes: int = 1
    tasks_per_node: int = 1
    time: str = "01:00:00"
