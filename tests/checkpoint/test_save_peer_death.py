"""A rank lost at the end of a sharded save: the survivor ends with one line and exit 6, as for a
failure inside dcp.save, and leaves no step directory that looks complete."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.mpi_util import REPO


def test_a_rank_dying_before_the_closing_barrier_is_one_line_exit_6(tmp_path, small_dataset):
    ds = small_dataset
    spec = tmp_path / "t.yaml"
    spec.write_text(json.dumps({
        "kind": "train", "name": "d", "run_dir": str(tmp_path / "run"), "data": {"dataset": str(ds)},
        "dist": {"backend": "torch", "timeout_s": 30},
        "model": {"size": "custom", "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 32},
        "train": {"max_steps": 2, "batch_size": 2, "seq_len": 16, "eval_interval": 0, "log_interval": 1,
                  "progress": False}}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # two ranks as torchrun starts them (no MPI: under mpirun the launcher would kill the survivor
    # as soon as its peer died, and its own exit would not be seen); gloo sees the peer go at once
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.checkpoint.die_in_save", "1", "train", str(spec)],
                                      env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    (_, err0), (_, _) = (p.communicate(timeout=120) for p in procs)
    assert procs[1].returncode == 17  # the rank that died
    assert procs[0].returncode == 6, err0[-3000:]
    assert "Traceback" not in err0 and "[rank0]:" not in err0, err0[-3000:]
    errors = [line for line in err0.splitlines() if "error" in line.lower()]
    final = tmp_path / "run" / "checkpoints" / "step_00000002"
    assert errors == [errors[0]] and errors[0].startswith(f"hpcllm train: error: {final}: cannot be written: a peer "
                                                          "rank failed ("), err0[-3000:]
    assert "the previous checkpoint is kept" in errors[0]
    from hpcllm.checkpoint import latest_checkpoint

    assert not final.exists() and latest_checkpoint(tmp_path / "run") is None
    assert [p.name for p in Path(tmp_path / "run" / "checkpoints").iterdir()] == ["step_00000002.tmp"]
