"""Real disks that are full or read-only, for the tests of the errors they cause.

As root with CAP_SYS_ADMIN (as on the development machine) a small or read-only tmpfs is mounted on a
test's directory — the kernel's own ENOSPC and EROFS. Elsewhere: a full disk is stood in for by
RLIMIT_FSIZE (a write past the limit fails with EFBIG, through the same OSError path as ENOSPC;
SIGXFSZ ignored), and a read-only directory by chmod 0o555 (which root would ignore).
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
from pathlib import Path

import pytest


def _mount(path: Path, options: str) -> bool:
    if os.geteuid() != 0:
        return False
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0


def _umount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)  # a file still open: detach it


class SmallDisk:
    """`path` with `size_kb` of space. `how` is 'tmpfs' or 'rlimit'; under 'rlimit' only what runs
    inside limit() (or a child started with preexec) is limited, and free space is not reduced."""

    def __init__(self, path: Path, size_kb: int):
        self.path, self.size_kb = path, size_kb
        self.how = "tmpfs" if _mount(path, f"size={size_kb}k") else "rlimit"
        path.mkdir(parents=True, exist_ok=True)

    def fill(self, *files: Path) -> None:
        """Make the next write fail: on a tmpfs, take the rest of its space; under the file-size limit,
        grow each of `files` to the limit (writing more to one of them then fails)."""
        for f in files if self.how == "rlimit" else ():
            f.parent.mkdir(parents=True, exist_ok=True)
            with open(f, "ab") as fh:
                fh.truncate(self.size_kb * 1024)
        if self.how == "tmpfs":
            with contextlib.suppress(OSError), open(self.path / "filler", "wb", buffering=0) as f:
                while True:
                    f.write(b"\0" * 4096)

    @contextlib.contextmanager
    def limit(self):
        if self.how == "tmpfs":
            yield
            return
        old, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.size_kb * 1024, old[1]))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, old)
            signal.signal(signal.SIGXFSZ, handler)

    def preexec(self):
        """For subprocess.run(preexec_fn=...): the child's own limit (nothing under tmpfs)."""
        if self.how == "tmpfs":
            return None
        size = self.size_kb * 1024

        def limit_child():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

        return limit_child

    def close(self) -> None:
        if self.how == "tmpfs":
            _umount(self.path)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB disk at tmp_path/disk (see SmallDisk)."""
    disk = SmallDisk(tmp_path / "disk", 1024)
    yield disk
    disk.close()


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory no one can write into: a read-only tmpfs as root (EROFS), else mode 0o555."""
    path = tmp_path / "ro"
    if os.geteuid() == 0:
        if not _mount(path, "ro,size=64k"):
            pytest.skip("root without the right to mount: no read-only directory to test with")
        yield path
        _umount(path)
    else:
        path.mkdir()
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
