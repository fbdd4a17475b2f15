"""Where a sharded checkpoint keeps its parts, and when it is whole — without torch, so that the
batch script's last word (hpcllm.launch.finish) can tell a finished run in a fraction of a second."""

from __future__ import annotations

from pathlib import Path

DCP_DIR = "dcp"
METADATA = ".metadata"


def is_complete_sharded(ckpt: Path) -> bool:
    return (ckpt / DCP_DIR / METADATA).is_file() and (ckpt / "state.pt").is_file() and (ckpt / "meta.json").is_file()
