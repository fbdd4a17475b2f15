"""The `metrics` section of a job spec."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MetricsConfig:
    # also write TensorBoard event files (run_dir/tensorboard) with the scalars of metrics.jsonl;
    # needs the `tensorboard` package (pip install 'hpcllm[tensorboard]')
    tensorboard: bool = False
