"""The `infer` section of a job spec."""

from __future__ import annotations

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
    cuda_graphs: bool = True  # replay the decode step as a CUDA graph (GPU only)
    # this job is task `array_task` of `array_tasks` (set by `hpcllm submit` for job arrays; in a
    # hand-written `sbatch --array` job SLURM_ARRAY_TASK_ID/COUNT are used): shards i % tasks == task
    array_task: int = 0
    array_tasks: int = 0

    def validate(self) -> None:
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be >= 1")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError("need temperature >= 0, top_k >= 0, 0 < top_p <= 1")
