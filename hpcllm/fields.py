"""Field helpers shared by the job-spec sections (kept apart from hpcllm.config to avoid cycles)."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def path_field(default: Any = "", **kw: Any) -> Any:
    """A str field holding a filesystem path: `~` and $VARS are expanded and the path made absolute
    when the spec is loaded, so it means the same on the login node and inside the Slurm job."""
    return field(default=default, metadata={"path": True}, **kw)
