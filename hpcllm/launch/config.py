"""The `slurm` section of a job spec: resources, site setup, srun options."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_TIME = re.compile(r"^(\d+-)?\d{1,3}(:\d{2}){0,2}$")
_MEM = re.compile(r"^\d+[KMGT]?$")


def time_seconds(slurm_time: str) -> int:
    """Seconds in a Slurm time: MM, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]."""
    days, _, hms = slurm_time.rpartition("-")
    parts = [int(p) for p in hms.split(":")]
    h, m, sec = ([0] * (3 - len(parts)) + parts) if len(parts) > 1 else (0, parts[0], 0)
    return int(days or 0) * 86400 + h * 3600 + m * 60 + sec


@dataclass
class SlurmConfig:
    nodes: int = 1
    tasks_per_node: int = 1  # = MPI ranks per node
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem: str = ""  # per node, e.g. "64G"; "" = the partition's default
    time: str = "01:00:00"  # [D-]HH:MM:SS
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    exclusive: bool = False
    extra: list[str] = field(default_factory=list)  # more sbatch options, e.g. ["--mail-type=END"]
    setup: list[str] = field(default_factory=list)  # shell lines run first: module load, conda activate
    srun_args: list[str] = field(default_factory=lambda: ["--mpi=pmix"])
    signal_delay_s: int = 120  # training: USR2 this long before the time limit -> checkpoint + requeue
    max_requeues: int = 3
    # training, inference: restarts inside the allocation when a node is lost or a rank killed or hung
    # (hpcllm.launch.recover; the job asks for --no-kill); 0: the job fails or requeues as before
    max_restarts: int = 2
    spare_nodes: int = 0  # training, inference: ask for nodes + spare_nodes, run on `nodes`; a spare replaces a failed node
    python: str = ""  # interpreter inside the job; "" = the one running hpcllm render/submit
    # inference: split the prompt shards over a job array of this many tasks (0/1: one job)
    array_tasks: int = 0
    array_parallelism: int = 0  # array tasks running at once (0: all)

    def seconds(self) -> int:
        """The time limit in seconds."""
        return time_seconds(self.time)

    def warning_signal_s(self) -> int:
        """signal_delay_s, cut to half the time limit: a warning longer than the job would come at
        its start, on every start, and the job would requeue itself without making progress."""
        return min(self.signal_delay_s, self.seconds() // 2)

    def validate(self) -> None:
        if min(self.nodes, self.tasks_per_node, self.cpus_per_task) < 1 or self.gpus_per_node < 0:
            raise ValueError("nodes, tasks_per_node, cpus_per_task must be >= 1 and gpus_per_node >= 0")
        if not _TIME.match(self.time):
            raise ValueError(f"time must look like [D-]HH:MM:SS, got {self.time!r}")
        if self.mem and not _MEM.match(self.mem):
            raise ValueError(f"mem must look like 64G or 4000M, got {self.mem!r}")
        # names, options and lines that reach a batch script: hpcllm.launch.script.check_script_values
        if self.array_tasks < 0 or self.array_parallelism < 0:
            raise ValueError("array_tasks and array_parallelism must be >= 0")
        if self.signal_delay_s < 0 or self.max_requeues < 0 or self.max_restarts < 0 or self.spare_nodes < 0:
            raise ValueError("signal_delay_s, max_requeues, max_restarts and spare_nodes must be >= 0")
        if self.spare_nodes and not self.max_restarts:
            raise ValueError(f"spare_nodes={self.spare_nodes} with max_restarts=0: a spare only serves an in-job "
                             "restart; set max_restarts >= 1 or spare_nodes=0")

    def allocated_nodes(self) -> int:
        """The nodes the job asks Slurm for: the ones it trains on and the spares."""
        return self.nodes + self.spare_nodes
