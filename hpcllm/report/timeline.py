"""`hpcllm report RUN_DIR --plot PNG`: each start as a bar on the wall-clock axis (startup hatched,
steps solid, coloured by how it ended), the training loss over the same axis above."""

from __future__ import annotations

from pathlib import Path

from hpcllm.atomic import atomic_path


def plot_timeline(rep: dict, out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hpcllm.train.metrics import read_metrics

    starts = rep["starts"]
    t0 = min(r.get("began", 0) or 0 for r in starts) if starts and "began" in starts[0] else 0
    fig, (ax_loss, ax_bar) = plt.subplots(2, 1, figsize=(11, 5), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    metrics = [m for m in read_metrics(rep["run_dir"]) if m.get("time")] if rep["kind"] == "train" else []
    if metrics:
        ax_loss.plot([m["time"] - t0 for m in metrics], [m["loss"] for m in metrics], ".-", label="train loss")
        ax_loss.set_ylabel("loss")
        ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    for i, r in enumerate(starts):
        began = (r.get("began") or t0) - t0
        colour = "tab:green" if r["ending"] == "finished" else "tab:orange" if r["ending"].startswith("stopped") \
            else "tab:red"
        startup = r.get("startup_s") or 0
        ax_bar.barh(i, startup, left=began, color=colour, alpha=0.4, hatch="//")
        ax_bar.barh(i, r["allocated_s"] - startup, left=began + startup, color=colour)
        ax_bar.text(began, i, f" {i}: {r['ending'].split(' (')[0]}", va="center", fontsize=8)
    ax_bar.set_yticks(range(len(starts)))
    ax_bar.set_xlabel("seconds since the first start")
    ax_bar.set_ylabel("start")
    ax_bar.invert_yaxis()
    fig.suptitle(f"hpcllm report: {Path(rep['run_dir']).name}"
                 + (f" — goodput {rep['goodput']:.1%}" if rep.get("goodput") is not None else ""))
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return out
