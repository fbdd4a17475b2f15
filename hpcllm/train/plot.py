"""`hpcllm plot RUN_DIR`: loss / val loss and throughput from metrics.jsonl, as one PNG."""

from __future__ import annotations

from pathlib import Path

from hpcllm.atomic import atomic_path
from hpcllm.errors import HpcllmError
from hpcllm.train.metrics import read_metrics


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(run_dir)
    if not recs:
        raise HpcllmError(f"{Path(run_dir) / 'metrics.jsonl'}: no metrics to plot (has the run logged a step?)")
    out = Path(out) if out else Path(run_dir) / "training.png"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in recs]
    ax1.plot(steps, [r["loss"] for r in recs], label="train loss")
    val = [(r["step"], r["val_loss"]) for r in recs if r.get("val_loss") is not None]
    if val:
        ax1.plot(*zip(*val), "o-", label="val loss")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss (nats/token)")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(steps, [r["tokens_per_s"] for r in recs], color="tab:green")
    ax2.set_xlabel("step")
    ax2.set_ylabel("tokens/s (all ranks)")
    ax2.grid(alpha=0.3)
    fig.suptitle(f"hpcllm: {Path(run_dir).name}")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return out
