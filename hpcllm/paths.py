"""Files that a directory names, and files hpcllm appends to: nothing outside is read, no link followed.

A dataset's manifest.json names its shards and tokenizer; an HF model directory's
model.safetensors.index.json names its weight files, and the directory implies config.json and the
tokenizer files. Those names come from whoever made the directory, so `inside` resolves each one
(`..`, an absolute path, symbolic links) and refuses, before anything opens it, a file that is not
inside the directory: a manifest cannot make a job train on, hash or parse `/etc/passwd`.

A model directory may be a snapshot of the Hugging Face hub cache, whose files are links into the
repo's `blobs/` folder (`<cache>/models--org--name/snapshots/<rev>/config.json -> ../../blobs/<sha>`);
`model_file` accepts those, and only those: links that stay inside that one repo folder.

The check is of the directory as it is when the file is named; whoever can rewrite the directory
between the check and the read can rewrite the file itself anyway.

Files hpcllm appends to (provenance.jsonl, metrics.jsonl, jobs.jsonl, the rank logs) are opened by
`open_append`: never through a symbolic link, and only when they are regular files.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import IO

from hpcllm.errors import DataError


def inside(directory: str | os.PathLike, name, *, what: str, root: str | os.PathLike | None = None) -> Path:
    """`directory / name`, once `name` — symbolic links resolved — is known to be a file inside
    `root` (default: the directory itself). Otherwise a DataError naming `what`, the entry and the
    directory, raised before the file is opened. The path returned keeps the entry's own name (error
    messages then name the shard, not a blob it links to)."""
    d = Path(directory)
    if not isinstance(name, str) or not name or "\0" in name:
        raise DataError(f"{what} {name!r} is not a file name inside {d}")
    allowed = Path(os.path.realpath(root if root is not None else d))
    try:
        real = Path(os.path.realpath(d / name))
    except (OSError, ValueError, RuntimeError) as e:  # a link loop, an unreadable component
        raise DataError(f"{what} '{name}' in {d} cannot be resolved ({e})") from None
    if allowed not in real.parents:
        where = str(d) if root is None else f"{d} (nor in its Hugging Face cache repo {allowed})"
        raise DataError(f"{what} '{name}' resolves to {real}, which is not in {where}: refused — hpcllm reads only "
                        "files inside the directory (copy the file in, or name the directory that holds it)")
    return d / name


def hf_cache_repo(directory: str | os.PathLike) -> Path | None:
    """The repo folder of a Hugging Face hub cache snapshot (`<cache>/models--org--name/snapshots/<rev>`,
    the layout huggingface_hub writes, with its `blobs/` beside `snapshots/`), else None."""
    real = Path(os.path.realpath(directory))
    snapshots, repo = real.parent, real.parent.parent
    if snapshots.name == "snapshots" and repo.name.startswith("models--") and (repo / "blobs").is_dir():
        return repo
    return None


def model_file(directory: str | os.PathLike, name, *, what: str | None = None) -> Path:
    """A file of a model (or tokenizer) directory, checked by `inside`: in the directory, or — for a
    Hugging Face cache snapshot — in its repo folder, where the snapshot's links point."""
    return inside(directory, name, what=what or f"model directory {directory}: file", root=hf_cache_repo(directory))


def open_append(path: str | os.PathLike, error=DataError) -> IO[str]:
    """`path` opened to append text, created if missing — never through a symbolic link (O_NOFOLLOW)
    and only if it is a regular file: a link planted in a run dir cannot make hpcllm write into
    another file, nor a FIFO stall it (O_NONBLOCK: opening one without a reader fails at once)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        fd, failure = None, e
    mode = os.fstat(fd).st_mode if fd is not None else _lstat_mode(path)
    if fd is None or not stat.S_ISREG(mode):
        if fd is not None:
            os.close(fd)
        if mode is not None and stat.S_ISLNK(mode):
            raise error(f"{path}: a symbolic link — hpcllm appends only to a regular file, never through a link "
                        "(remove the link)")
        if mode is not None and not stat.S_ISREG(mode):
            raise error(f"{path}: not a regular file — hpcllm appends only to a regular file (remove it)")
        raise error(f"{path}: cannot be opened to append ({failure.strerror or failure})")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "a", encoding="utf-8")


def _lstat_mode(path) -> int | None:
    try:
        return os.lstat(path).st_mode
    except OSError:
        return None
