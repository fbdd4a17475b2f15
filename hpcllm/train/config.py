"""The `train` section of a job spec."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class StragglerConfig:
    """train.stragglers: when a rank is named slow (hpcllm.train.stragglers)."""

    threshold: float = 0.2  # slow: busy seconds per step over the median of the other ranks' by this fraction
    steps: int = 50  # named once slow in consecutive log windows covering at least this many steps

    def validate(self) -> None:
        if self.threshold <= 0:
            raise ValueError(f"threshold must be > 0 (a fraction: 0.2 is 20% over the peers' median), got "
                             f"{self.threshold}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


@dataclass
class TrainConfig:
    max_steps: int = 100
    seed: int = 1337
    batch_size: int = 8  # sequences per rank per micro-step
    seq_len: int = 256
    grad_accum: int = 1  # micro-steps per optimizer step (no communication on all but the last)
    # sequences per optimizer step over all ranks (0: batch_size x grad_accum x ranks). Set, it fixes
    # the run's optimisation whatever the number of ranks: grad_accum becomes
    # global_batch_size / (ranks x batch_size), so a run resumes exactly on another number of ranks
    global_batch_size: int = 0
    activation_checkpointing: bool = False  # recompute each block's activations in backward
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
    # each node's mean time between failures, for the checkpoint interval advice of `hpcllm plan` and
    # `hpcllm report` (hpcllm.report.interval); 0: estimated from the run's own starts
    node_mtbf_hours: float = 0.0
    stragglers: StragglerConfig = field(default_factory=StragglerConfig)  # ranks persistently slower than their peers
    keep_checkpoints: int = 2
    # write checkpoints in the background (PyTorch DCP's async save): training stalls only while the
    # state is copied to host memory; at most one save in flight; stops wait for it
    async_checkpoint: bool = False
    resume: bool = True  # continue from the latest complete checkpoint in run_dir
    nan_policy: Literal["abort", "skip"] = "abort"
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    compile: bool = False  # torch.compile the model
    end_time_margin_s: float = 120.0  # checkpoint and stop this long before SLURM_JOB_END_TIME
    sample_prompt: str = "def "  # the demo's sample at the end
    progress: bool = True  # tqdm bar on rank 0

    def accumulation(self, ranks: int) -> int:
        """Micro-steps per optimizer step on `ranks` ranks."""
        if not self.global_batch_size:
            return self.grad_accum
        per_micro = ranks * self.batch_size
        if self.global_batch_size % per_micro:
            raise ValueError(f"train.global_batch_size={self.global_batch_size} is not a multiple of {ranks} data-parallel rank(s) x "
                             f"train.batch_size={self.batch_size} = {per_micro}: choose a global batch that every "
                             "rank count you run on divides, or another batch_size")
        return self.global_batch_size // per_micro

    def validate(self) -> None:
        for k in ("max_steps", "batch_size", "seq_len", "grad_accum", "log_interval", "keep_checkpoints"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.global_batch_size < 0:
            raise ValueError(f"global_batch_size must be >= 0 (0: batch_size x grad_accum x ranks), got "
                             f"{self.global_batch_size}")
        if self.global_batch_size and self.grad_accum != 1:
            raise ValueError("set global_batch_size or grad_accum, not both: with global_batch_size the "
                             "accumulation is global_batch_size / (ranks x batch_size)")
        if self.node_mtbf_hours < 0:
            raise ValueError(f"node_mtbf_hours must be >= 0 (0: estimated from the run's history), got "
                             f"{self.node_mtbf_hours}")
        if len(self.betas) != 2:
            raise ValueError(f"betas must be two numbers, got {self.betas}")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must be <= lr ({self.lr})")
