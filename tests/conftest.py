import logging
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Ranks outnumber this machine's 2 cores: two test workers run jobs side by side, and the local Slurm
# clusters claim more CPUs than there are (the 2-node one runs 4 ranks). Open MPI spins in its waits
# unless it knows it is oversubscribed (mpirun -np 2 does not, nor srun): a waiting rank then takes
# the core of the rank it waits for. With yield_when_idle it gives the core away while it waits:
# 150 steps of a 4-rank job on the 2-node cluster took 15.9 s instead of 21.5 s (measured). Slurm
# jobs get it through the environment sbatch exports.
os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")


@pytest.fixture(scope="module")
def cli():
    """`cli("infer", spec, ...)`: the one-process `hpcllm` command, run in one Python process shared by
    the module's tests (tests/cli_session.py: ~3 s of imports saved per command)."""
    from tests.cli_session import CliSession

    session = CliSession()
    yield session.run
    session.close()


@pytest.fixture(autouse=True)
def _hpcllm_logs_reach_caplog():
    """Every test starts with the "hpcllm" logger as a fresh process has it: no handlers, records
    propagating to the root (where caplog listens). A test that ran hpcllm's own setup_logging in this
    worker before (an in-process CLI call) left it not propagating, so a later caplog test would see
    no records at all — which test ran before depends on how xdist shares the tests out."""
    logger = logging.getLogger("hpcllm")
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    logger.propagate, logger.level = True, logging.NOTSET
    yield


@pytest.fixture(scope="session")
def small_ds(tmp_path_factory):
    """tests/train/corpus.py's small corpus, prepared once for the training jobs that only read it."""
    from tests.train.corpus import prepare_small_corpus

    return prepare_small_corpus(tmp_path_factory.mktemp("small_ds"))


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    _group_for_workers(items)
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (runs on the lent GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _group_for_workers(items) -> None:
    """How `make test` splits the suite over its workers (pytest-xdist, --dist loadgroup): the tests of
    one file stay together, in order, on one worker (module fixtures are built once); every Slurm test
    joins one group, so that the jobs of one cluster never compete for its few CPUs and a test's timing
    is only that of its own jobs — unless it names another group (the 2-node cluster's). Slurm groups
    go first: they are the longest, and the other worker works through the files meanwhile. Then the
    files with multi-rank or slow tests, and the quick files last: the worker that is done first takes
    those while the other ends its file (with a multi-rank file last, one core was idle for the last
    ~2.5 minutes, vmstat). Without xdist the marks change nothing."""
    for item in items:
        if not any(item.iter_markers("xdist_group")):
            name = "slurm" if item.get_closest_marker("slurm") else item.nodeid.split("::")[0]
            item.add_marker(pytest.mark.xdist_group(name))
    group = lambda item: next(item.iter_markers("xdist_group")).args[0]  # noqa: E731
    heavy = {group(item) for item in items if item.get_closest_marker("mpi") or item.get_closest_marker("slow")}
    # stable: file order is kept within each tier
    items.sort(key=lambda item: (not group(item).startswith("slurm"), group(item) not in heavy))
