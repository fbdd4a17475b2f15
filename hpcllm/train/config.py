"""The `train` section of a job spec."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class TrainConfig:
    max_steps: int = 100
    seed: int = 1337
    batch_size: int = 8  # sequences per rank per micro-step
    seq_len: int = 256
    grad_accum: int = 1  # micro-steps per optimizer step (no communication on all but the last)
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0  # 0: off
    eval_interval: int = 50  # 0: no evaluation
    eval_batches: int = 8  # val batches per rank per evaluation
    log_interval: int = 10
    ckpt_interval: int = 100  # 0: only at the end / on signals
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the latest complete checkpoint in run_dir
    nan_policy: Literal["abort", "skip"] = "abort"
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    compile: bool = False  # torch.compile the model
    end_time_margin_s: float = 120.0  # checkpoint and stop this long before SLURM_JOB_END_TIME
    sample_prompt: str = "def "  # the demo's sample at the end
    progress: bool = True  # tqdm bar on rank 0

    def validate(self) -> None:
        for k in ("max_steps", "batch_size", "seq_len", "grad_accum", "log_interval", "keep_checkpoints"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if len(self.betas) != 2:
            raise ValueError(f"betas must be two numbers, got {self.betas}")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must be <= lr ({self.lr})")
