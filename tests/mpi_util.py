"""Run a test body on N MPI ranks and collect every rank's result.

    results = run_on_ranks(2, "tests.comm.test_comm:_body_allreduce", backend="mpi")
    assert all(r["sum"] == 3 for r in results)

The body is a plain function in a test module; it runs under `mpirun -np N` (Open MPI; root and
more ranks than cores are allowed) in `tests.mpi_runner`, and its return value comes back as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def mpi_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1")
    # the tests themselves may run inside a Slurm job: mpirun must not treat it as its allocation
    for k in [k for k in env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
        del env[k]
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


def mpirun_cmd(n: int, *argv: str) -> list[str]:
    return ["mpirun", "-np", str(n), "--oversubscribe", "--bind-to", "none", *argv]


def run_mpi(n: int, argv: list[str], timeout: float = 120, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """Run any command on n ranks; returns the CompletedProcess (no check)."""
    return subprocess.run(
        mpirun_cmd(n, *argv), capture_output=True, text=True, timeout=timeout, env=mpi_env(env), cwd=cwd or REPO
    )


def run_on_ranks(n: int, target: str, *, timeout: float = 120, env: dict | None = None, **kwargs) -> list:
    """Run `module:function(**kwargs)` on n ranks; return the n results in rank order.

    Fails the test with every rank's traceback if any rank raised or the job exited non-zero."""
    return _run_target(n, target, timeout, env, kwargs, launcher=True)


def run_alone(target: str, *, timeout: float = 120, env: dict | None = None, **kwargs):
    """Run `module:function(**kwargs)` as one rank in a fresh process of its own, with no launcher —
    as on a GPU machine without mpirun — and return its result. A process group, NCCL or a CUDA graph
    the body sets up lives and dies with that process, not the test session."""
    return _run_target(1, target, timeout, env, kwargs, launcher=False)[0]


def _run_target(n: int, target: str, timeout: float, env: dict | None, kwargs: dict, *, launcher: bool) -> list:
    with tempfile.TemporaryDirectory(prefix="hpcllm-mpi-") as out:
        env = {"HPCLLM_TEST_DUMP_AFTER": str(max(5.0, timeout - 10)), **(env or {})}
        argv = [sys.executable, "-m", "tests.mpi_runner", target, out, json.dumps(kwargs)]
        if launcher:
            proc = run_mpi(n, argv, timeout, env)
        else:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=mpi_env(env), cwd=REPO)
        errs = sorted(Path(out).glob("rank*.err"))
        if proc.returncode != 0 or errs:
            details = "\n".join(f"--- {p.name}\n{p.read_text()}" for p in errs)
            raise AssertionError(
                f"{target} on {n} ranks exited {proc.returncode}\n{details}\nstdout:\n{proc.stdout[-3000:]}\n"
                f"stderr:\n{proc.stderr[-3000:]}"
            )
        results = []
        for r in range(n):
            p = Path(out) / f"rank{r}.json"
            assert p.exists(), f"rank {r} wrote no result\nstderr:\n{proc.stderr[-3000:]}"
            results.append(json.loads(p.read_text()))
        return results


_NO_SUBMITIT = '''\
"""Installed by tests.mpi_util.env_without_submitit: the GPU machine's image has no submitit."""
import sys


class _NoSubmitit:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "submitit":
            raise ModuleNotFoundError(f"No module named {name!r} (the GPU machine's image has none)", name=name)
        return None


sys.meta_path.insert(0, _NoSubmitit())
'''


def env_without_submitit(tmp_path: Path) -> dict:
    """os.environ for a subprocess (and its children) in which submitit cannot be imported, as on the
    lent GPU machine: a sitecustomize on PYTHONPATH refuses it."""
    site = Path(tmp_path) / "no-submitit"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_NO_SUBMITIT)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")])}
