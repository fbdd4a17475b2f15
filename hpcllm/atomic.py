"""The one way hpcllm writes a file or directory that someone else may read: atomically.

Everything is written under a temporary name beside its final path, fsynced, and renamed onto the
final path (then the directory is fsynced so the rename itself survives a crash). A reader sees
either the old file or the complete new one — never half of one — and a crash leaves only a
`*.tmp` file that the next writer removes. Shards, checkpoints, inference outputs, manifests,
exports, rendered scripts and plots all go through here.

    with atomic_path(out / "shard.h5") as tmp:      # a library that wants a path (h5py, safetensors)
        write_with_h5py(tmp)
    write_json(out / "manifest.json", manifest)
    with atomic_dir(root / "step_00000100") as tmp:  # a directory of files, renamed as a whole
        ...
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

TMP_SUFFIX = ".tmp"


def tmp_path_for(final: Path) -> Path:
    # the pid keeps two writers of the same file (a rerun racing a dying job) off each other's temp
    return final.with_name(f"{final.name}.{os.getpid()}{TMP_SUFFIX}")


def fsync_path(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir_quiet(path: Path) -> None:
    try:
        fsync_path(path)
    except OSError:  # some filesystems refuse fsync on a directory; the rename is still atomic
        pass


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsynced and renamed onto `final`."""
    final = Path(final)
    tmp = tmp_path_for(final)
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        fsync_path(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir_quiet(final.parent)


@contextlib.contextmanager
def atomic_open(final: str | os.PathLike, mode: str = "w", **kw: Any) -> Iterator[Any]:
    """open() on a temporary file that becomes `final` when the block ends without an error."""
    with atomic_path(final) as tmp, open(tmp, mode, **kw) as f:
        yield f
        f.flush()


def write_bytes(final: str | os.PathLike, data: bytes, mode: int | None = None) -> None:
    with atomic_path(final, mode) as tmp:
        tmp.write_bytes(data)


def write_text(final: str | os.PathLike, text: str, mode: int | None = None) -> None:
    write_bytes(final, text.encode("utf-8"), mode)


def write_json(final: str | os.PathLike, obj: Any) -> None:
    write_text(final, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json_object(path: str | os.PathLike) -> dict | None:
    """A JSON object written by write_json (a marker, a manifest), or None when it is missing,
    unreadable or not an object: what a reader that rewrites or skips such a file needs."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory; on success every file in it is fsynced and it replaces
    `final` (an existing `final` is removed first: a rerun that reached the same point again)."""
    final = Path(final)
    tmp = final.with_name(final.name + TMP_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Path, final: Path) -> None:
    """fsync every file and directory under `tmp`, then rename it onto `final` (replacing it)."""
    for dirpath, _, files in os.walk(tmp):
        for name in files:
            fsync_path(os.path.join(dirpath, name))
        _fsync_dir_quiet(Path(dirpath))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir_quiet(final.parent)


@contextlib.contextmanager
def shared_atomic_dir(final: str | os.PathLike, leader: bool, barrier: Callable[[], None]) -> Iterator[Path]:
    """atomic_dir for a directory several processes write together (every rank of a job, e.g. a
    sharded checkpoint): the leader empties `final.tmp`; all write into it; once every one is done
    (a barrier), the leader fsyncs it and renames it onto `final`; a last barrier, and every rank
    sees the complete directory. A rank that fails leaves the others in a barrier, which the job's
    stall watchdog ends — or which raises at once where the backend sees the peer go (gloo, NCCL):
    `barrier` is the caller's, so that it can make that its own one-line error (a sharded checkpoint's
    is hpcllm.checkpoint.sharded's). An error before the rename leaves only `final.tmp`."""
    final = Path(final)
    tmp = final.with_name(final.name + TMP_SUFFIX)
    if leader:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    yield tmp
    barrier()
    if leader:
        try:
            replace_dir(tmp, final)
        finally:
            barrier()
    else:
        barrier()


def remove_stale_tmp(directory: str | os.PathLike, pattern: str = "*" + TMP_SUFFIX) -> int:
    """Remove what a crashed writer left behind (files or directories named *.tmp)."""
    n = 0
    for p in Path(directory).glob(pattern):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        n += 1
    return n
