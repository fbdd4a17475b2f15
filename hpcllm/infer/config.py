"""The `infer` section of a job spec."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Literal

from hpcllm.fields import path_field


@dataclass
class InferConfig:
    mode: Literal["generate", "score"] = "generate"
    # an hpcllm run dir (its latest checkpoint) / checkpoint dir, or an HF GPT-2 safetensors file/dir
    model: str = path_field("")
    prompts: str = path_field("")  # prompt dataset (hpcllm prepare with data.output=prompts)
    batch_size: int = 16
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: list[int] = field(default_factory=list)  # the tokenizer's eos is always added
    stop_strings: list[str] = field(default_factory=list)  # output is cut at the first one
    seed: int = 0  # a record's random stream comes from (seed, record id)
    overflow: Literal["error", "truncate_left"] = "error"  # prompt + max_new_tokens > context
    schedule: Literal["dynamic", "static"] = "dynamic"  # shards handed out by rank 0, or i % ranks
    return_logprobs: bool = False
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU
    # weight-only quantization of the linear layers, done while loading (hpcllm.infer.quantize;
    # docs/inference.md "Quantized weights"): int8 per output channel, int4 in groups of 32
    quantize: Literal["none", "int8", "int4"] = "none"
    cuda_graphs: bool = True  # replay the decode step as a CUDA graph (GPU only)
    # prompts that begin alike (a system prompt) share its KV-cache blocks, computed once; outputs
    # are the same either way (up to float ties, docs/inference.md)
    prefix_sharing: bool = True
    # this job is task `array_task` of `array_tasks` (set by `hpcllm submit` for job arrays; in a
    # hand-written `sbatch --array` job SLURM_ARRAY_TASK_ID/COUNT are used): shards i % tasks == task
    array_task: int = 0
    array_tasks: int = 0

    def validate(self) -> None:
        # each message names its key: from_dict prefixes the file and the section ("infer")
        for key in ("batch_size", "max_new_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if not 0 < self.top_p <= 1:  # also false for nan
            raise ValueError(f"top_p must be in (0, 1] (1: off), got {self.top_p}")
        for i, t in enumerate(self.stop_token_ids):
            if t < 0:
                raise ValueError(f"stop_token_ids[{i}] must be a token id >= 0, got {t}")
        for i, s in enumerate(self.stop_strings):
            if not s:
                raise ValueError(f"stop_strings[{i}] is empty (it would stop every row at once)")


def array_slot(ic: InferConfig) -> tuple[int, int]:
    """(task, tasks) of a job array, or (0, 1) for a plain job. (Here, beside the config, not with the
    job: the batch script's last word asks it too, and must not import torch.)"""
    if ic.array_tasks > 1:
        return ic.array_task, ic.array_tasks
    env = os.environ
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        return int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"])
    return 0, 1
