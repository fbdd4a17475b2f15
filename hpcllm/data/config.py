"""The `data` section of a job spec (filled in by the data layer)."""

from __future__ import annotations

from dataclasses import dataclass

from hpcllm.fields import path_field


@dataclass
class DataConfig:
    # dataset directory (manifest.json + shards): written by `prepare`, read by train and infer
    dataset: str = path_field("")
