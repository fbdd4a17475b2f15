"""A checkpoint's files read safely: a safetensors file, and a .pt file through the weights-only
unpickler — each a one-line CheckpointError naming the file when it cannot be read. The readers
of the package (hpcllm.checkpoint, hpcllm.checkpoint.sharded) share them from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hpcllm.errors import CheckpointError

if TYPE_CHECKING:
    import torch


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, or a one-line CheckpointError naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        return load_file(str(file))
    except (OSError, SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({first_line(e)})") from None


def read_state_file(file: Path) -> dict:
    """A .pt file of a checkpoint through the weights-only unpickler. A file that needs anything else
    (arbitrary classes, code) is refused as untrusted: loading it unsafely is never offered."""
    import pickle

    import torch

    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{file}: not a trusted checkpoint (it holds objects other than tensors and plain "
                              "values, which hpcllm never unpickles); was it written by hpcllm?") from None
    except (OSError, RuntimeError, EOFError, ValueError, KeyError) as e:
        raise CheckpointError(f"{file}: unreadable checkpoint state ({first_line(e)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: not an hpcllm checkpoint state")
    return state


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
