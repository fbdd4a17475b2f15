"""Training metrics: one JSON object per log interval in run_dir/metrics.jsonl (rank 0), and MFU
against the device's peak dense bf16 throughput."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hpcllm.atomic import write_text

# dense bf16 tensor-core peak, FLOP/s
PEAK_FLOPS = {
    "H100 SXM": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200": 989e12,
    "A100": 312e12,
}


def device_peak(device: torch.device) -> tuple[str, float | None]:
    """(name, peak FLOP/s), or (name, None) when the device is not in the table (CPU included)."""
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    if "H200" in name:
        return name, PEAK_FLOPS["H200"]
    if "H100" in name:
        if "PCIe" in name:
            return name, PEAK_FLOPS["H100 PCIe"]
        if "NVL" in name:
            return name, PEAK_FLOPS["H100 NVL"]
        return name, PEAK_FLOPS["H100 SXM"]
    if "A100" in name:
        return name, PEAK_FLOPS["A100"]
    return name, None


class MetricsLog:
    def __init__(self, run_dir: str | Path, enabled: bool):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume, drop records past the checkpoint so the file reads as one uninterrupted run."""
        if not self.enabled or not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        write_text(self.path, "".join(line + "\n" for line in keep))


def read_metrics(run_dir: str | Path) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
