"""Training metrics: one JSON object per log interval in run_dir/metrics.jsonl (rank 0), and MFU
against the device's peak dense bf16 throughput."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from hpcllm.atomic import write_text
from hpcllm.errors import ConfigError
from hpcllm.provenance import cpu_seconds

log = logging.getLogger("hpcllm.train")

# dense bf16 tensor-core peak, FLOP/s
PEAK_FLOPS = {
    "H100 SXM": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200": 989e12,
    "A100": 312e12,
}


def device_peak(device) -> tuple[str, float | None]:
    """(name, peak FLOP/s), or (name, None) when the device (a torch.device) is not in the table (CPU
    included)."""
    import torch  # here, not at the top: `hpcllm report` and `hpcllm plan` read metrics without torch

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
    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool = False, start_id: str | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.start_id = start_id  # the job start (hpcllm.provenance) each record names
        self.tensorboard = TensorBoardLog(Path(run_dir) / "tensorboard") if enabled and tensorboard else None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        from hpcllm.paths import open_append

        record = dict(record, **utilisation(self.start_id))
        with open_append(self.path) as f:  # never through a link planted in the run dir
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            self.tensorboard.write(record)

    def truncate_after(self, step: int) -> None:
        """On resume, drop records past the checkpoint so the file reads as one uninterrupted run."""
        if not self.enabled or not self.path.exists():
            return
        keep = [json.dumps(r) for r in read_metrics(self.path.parent) if r.get("step", 0) <= step]
        write_text(self.path, "".join(line + "\n" for line in keep))


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of run_dir/metrics.jsonl. A line that is not a JSON record — the torn last line of
    a start killed while it wrote — is skipped with a warning naming it (the run resumes from its
    checkpoint and logs those steps again)."""
    p = Path(run_dir) / "metrics.jsonl"
    if not p.exists():
        return []
    out = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if not isinstance(rec, dict):
            log.warning("%s:%d: not a metrics record (a torn line of a killed start?), skipped", p, i)
            continue
        out.append(rec)
    return out


def utilisation(start_id: str | None) -> dict:
    """What each record carries for `hpcllm report`: the wall time it was written, the job start it
    belongs to, this process's CPU time, and on a GPU the device's utilisation and memory as NVML
    reports them (torch's pynvml binding; left out when it is missing or NVML fails)."""
    import torch

    out = {"time": time.time(), "start": start_id, "cpu_s": cpu_seconds()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        try:
            out["gpu_util_pct"] = torch.cuda.utilization()
            out["gpu_mem_used_bytes"] = torch.cuda.device_memory_used()
        except Exception:  # noqa: BLE001 - pynvml missing or NVML unusable: no device figures
            pass
    return out


# scalars that are not series worth plotting
_NOT_SCALARS = {"step", "time", "start"}


class TensorBoardLog:
    """The scalars of metrics.jsonl as TensorBoard event files, one series per key, continuous over
    restarts: a resumed start redoes the steps after its checkpoint, and those already in the event
    files are not written again (a resumed run logs the same numbers for them), so no step appears
    twice in a series."""

    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("metrics.tensorboard is true but the tensorboard package is not installed "
                              "(pip install tensorboard, or hpcllm[tensorboard])") from None
        self.last_step = last_tensorboard_step(log_dir)
        self.writer = SummaryWriter(str(log_dir))

    def write(self, record: dict) -> None:
        step = int(record["step"])
        if step <= self.last_step:
            return
        for key, value in record.items():
            if key not in _NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step, walltime=record.get("time"))
        self.writer.flush()  # a start killed outright loses nothing it logged
        self.last_step = step


def last_tensorboard_step(log_dir: Path) -> int:
    """The largest step in the event files under log_dir (-1: none)."""
    if not log_dir.is_dir():
        return -1
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    last = -1
    for f in sorted(log_dir.glob("events.out.tfevents.*")):
        try:
            for event in EventFileLoader(str(f)).Load():
                if event.HasField("summary"):
                    last = max(last, event.step)
        except Exception:  # noqa: BLE001 - a torn last event of a killed start: what was read counts
            continue
    return last
