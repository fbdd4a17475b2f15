"""Learning rate: linear warmup, then cosine decay to min_lr at max_steps (a function of the step,
so resuming needs no scheduler state)."""

import math


def lr_at(step: int, lr: float, min_lr: float, warmup: int, max_steps: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    if step >= max_steps:
        return min_lr
    progress = (step - warmup) / max(1, max_steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
