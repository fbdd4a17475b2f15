"""Live monitoring through Prometheus: what a running job exports, and how.

    mon = monitor.start(spec, comm)   # every rank, once the ranks have joined (hpcllm.jobs.*)
    monitor.current().train_step(step) # anywhere below: a no-op when metrics are not configured
    mon.close("finished")             # or "stopped" / "crashed": the last export says so

With `metrics.prometheus_dir` or `metrics.pushgateway` in the spec, rank 0 holds the job's series
(hpcllm.monitor.metrics) in memory and a background thread writes them to node_exporter's textfile
directory and/or pushes them to a Pushgateway every `metrics.prometheus_interval_s`
(hpcllm.monitor.export). One exporter per job: the other ranks' figures reach rank 0 at points where
the ranks meet anyway (training: one small allgather at each log step; inference: the shards' done
markers, read by rank 0). Without either key every hook returns at once and nothing is gathered.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Callable

from hpcllm.errors import ConfigError
from hpcllm.monitor.metrics import SHARD_SECONDS_BUCKETS

log = logging.getLogger("hpcllm.monitor")


def job_id(env=None) -> str:
    """The job's id as Slurm knows it (ARRAYJOB_TASK for an array task), else HOST-PID of rank 0."""
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    if env.get("SLURM_JOB_ID"):
        return env["SLURM_JOB_ID"]
    return f"{socket.gethostname()}-{os.getpid()}"


class Monitor:
    """`active`: metrics are configured (the same on every rank: the hooks that gather run).
    `exporting`: this rank holds the series and exports them (rank 0 of an active job)."""

    def __init__(self, active: bool = False, exporting: bool = False, hosts: list[str] | None = None):
        self.active, self.exporting = active, exporting
        self.hosts = hosts or [socket.gethostname()]
        self.table = None
        self.exporter = None
        self._samplers: list[Callable[[], None]] = []
        self.closed = False

    def _rank(self, rank: int) -> tuple[str, str]:
        return str(rank), self.hosts[rank] if rank < len(self.hosts) else ""

    def _sample(self) -> None:
        for fn in self._samplers:
            fn()

    # ---------------------------------------------------------------------------------- training

    def train_started(self, max_steps: int, step: int) -> None:
        if not self.exporting:
            return
        t = self.table
        t.set("hpcllm_train_max_steps", max_steps)
        t.set("hpcllm_train_resumed_from_step", step)
        t.set("hpcllm_train_step", step)
        if step:
            t.set("hpcllm_train_checkpoint_step", step)

    def train_step(self, step: int) -> None:
        """Every step: one dict assignment on rank 0."""
        if self.exporting:
            self.table.values[("hpcllm_train_step", ())] = step

    def train_logged(self, comm, rec: dict, t_data: float, t_compute: float, t_comm: float, steps: int) -> None:
        """At a log step, on every rank (a collective when active): each rank's waits reach rank 0."""
        if not self.active:
            return
        ranks = comm.allgather_object((t_data, t_compute, t_comm, rec["dt_s"]))
        if not self.exporting:
            return
        t, steps = self.table, max(steps, 1)
        t.set("hpcllm_train_loss", rec["loss"])
        t.set("hpcllm_train_learning_rate", rec["lr"])
        t.set("hpcllm_train_tokens_per_second", rec["tokens_per_s"])
        t.set("hpcllm_train_step_seconds", rec["dt_s"] / steps)
        if rec.get("mfu") is not None:
            t.set("hpcllm_train_mfu", rec["mfu"])
        if rec.get("val_loss") is not None:
            t.set("hpcllm_train_val_loss", rec["val_loss"])
        for r, (data, compute, blocked, dt) in enumerate(ranks):
            own = self._rank(r)
            t.set("hpcllm_train_rank_busy_seconds", (data + compute) / steps, own)
            t.set("hpcllm_train_rank_data_wait_fraction", data / dt if dt > 0 else 0.0, own)
            t.set("hpcllm_train_rank_comm_fraction", blocked / dt if dt > 0 else 0.0, own)

    def checkpointed(self, step: int, seconds: float) -> None:
        if not self.exporting:
            return
        self.table.inc("hpcllm_train_checkpoints_total")
        self.table.set("hpcllm_train_checkpoint_seconds", seconds)
        self.table.set("hpcllm_train_checkpoint_step", step)

    # ---------------------------------------------------------------------------------- inference

    def infer_started(self, out_dir: str | Path, todo: dict[str, int], records: list[int], start_id: str | None,
                      pending: Callable[[], int | None] | None = None) -> None:
        """`todo`: done-marker file name -> records, for the shards this start does; `records`: the
        records of each shard of the job (of its array task), done before or not. Rank 0 reads each
        marker of this start once it appears (hpcllm.monitor.progress.MarkerScan). `pending`: the
        dynamic queue's shards not handed out yet (None where this rank does not know)."""
        if not self.exporting:
            return
        from hpcllm.monitor.progress import MarkerScan

        t = self.table
        t.set("hpcllm_infer_shards", len(records))
        t.set("hpcllm_infer_records", sum(records))
        t.set("hpcllm_infer_shards_skipped", len(records) - len(todo))
        t.set("hpcllm_infer_records_skipped", sum(records) - sum(todo.values()))
        for name in ("hpcllm_infer_shards_done_total", "hpcllm_infer_records_done_total",
                     "hpcllm_infer_new_tokens_total"):
            t.set(name, 0.0)
        scan = MarkerScan(out_dir, todo, start_id)

        def sample():
            for m in scan.new_markers():
                n, rank = int(m.get("n_records", 0)), m.get("rank")
                t.inc("hpcllm_infer_shards_done_total")
                t.inc("hpcllm_infer_records_done_total", n)
                t.inc("hpcllm_infer_new_tokens_total", float(m.get("new_tokens", 0)))
                seconds = float(m.get("seconds", 0.0))
                t.observe("hpcllm_infer_shard_seconds", seconds, SHARD_SECONDS_BUCKETS)
                if isinstance(rank, int):
                    t.inc("hpcllm_infer_rank_records_done_total", n, self._rank(rank))
                    t.inc("hpcllm_infer_rank_busy_seconds_total", seconds, self._rank(rank))
            depth = pending() if pending is not None else None
            if depth is not None:
                t.set("hpcllm_infer_queue_depth", depth)

        self._samplers.append(sample)

    # ---------------------------------------------------------------------------------- prepare

    def prepare_started(self, input_bytes: int) -> None:
        if self.exporting:
            self.table.set("hpcllm_prepare_rank_input_bytes", input_bytes, self._rank(0))
            self.table.set("hpcllm_prepare_rank_input_bytes_done", 0, self._rank(0))

    def prepared_document(self, tokens: int) -> None:
        if self.exporting:
            self.table.inc("hpcllm_prepare_rank_documents_total", 1, self._rank(0))
            self.table.inc("hpcllm_prepare_rank_tokens_total", tokens, self._rank(0))

    def prepared_file(self, size: int) -> None:
        if self.exporting:
            self.table.inc("hpcllm_prepare_rank_input_bytes_done", size, self._rank(0))

    def prepare_done(self, summary: dict) -> None:
        if self.exporting:
            for key in ("documents", "tokens", "shards"):
                if isinstance(summary.get(key), (int, float)):
                    self.table.set(f"hpcllm_prepare_{key}", summary[key])

    # ---------------------------------------------------------------------------------- the end

    def close(self, ending: str) -> None:
        """The final export, saying how the job ended (finished | stopped | crashed). Never raises."""
        if self.closed or not self.exporting:
            return
        self.closed = True
        t = self.table
        t.set("hpcllm_job_running", 0)
        t.set("hpcllm_job_ending", 1, (ending,))
        t.set("hpcllm_job_end_time_seconds", time.time())
        try:
            self.exporter.stop()
        except Exception as e:  # noqa: BLE001 - the job's own outcome stands
            log.warning("the final metrics export failed: %r", e)


_OFF = Monitor()
_current: Monitor = _OFF


def current() -> Monitor:
    """The job's monitor, or one whose hooks do nothing (metrics not configured, or no job running:
    the benchmarks and tests that call the trainer directly)."""
    return _current


def _dir_problem(directory: str) -> str | None:
    p = Path(directory)
    if not p.is_dir():
        return f"metrics.prometheus_dir {directory!r} is not a directory (on {socket.gethostname()})"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"metrics.prometheus_dir {directory!r} is not writable (on {socket.gethostname()})"
    return None


def start(spec, comm) -> Monitor:
    """Every rank, once the ranks have joined. With metrics configured a collective: the ranks learn
    each other's hosts (the `node` label), and a textfile directory rank 0 cannot write fails every
    rank with the same one line (exit 2) before any work."""
    global _current
    mc = spec.metrics
    if not (mc.prometheus_dir or mc.pushgateway):
        _current = _OFF
        return _OFF
    problem = _dir_problem(mc.prometheus_dir) if comm.rank == 0 and mc.prometheus_dir else None
    gathered = comm.allgather_object((socket.gethostname(), problem))
    problem = gathered[0][1]
    if problem:
        raise ConfigError(problem)
    hosts = [h for h, _ in gathered]
    mon = Monitor(active=True, exporting=comm.rank == 0, hosts=hosts)
    if mon.exporting:
        from hpcllm.monitor.export import Exporter, PushSink, Table, TextfileSink

        jid = job_id()
        mon.table = t = Table((jid, spec.name))
        t.set("hpcllm_job_info", 1, (spec.kind, comm.name, comm.device.type))
        t.set("hpcllm_job_running", 1)
        t.set("hpcllm_job_start_time_seconds", time.time())
        t.set("hpcllm_job_ranks", comm.size)
        t.set("hpcllm_job_nodes", len(set(hosts)))
        t.set("hpcllm_job_restarts", int(os.environ.get("SLURM_RESTART_COUNT") or 0))
        sinks = []
        if mc.prometheus_dir:
            sinks.append(TextfileSink(mc.prometheus_dir, jid))
        if mc.pushgateway:
            sinks.append(PushSink(mc.pushgateway, jid))
        mon.exporter = Exporter(t, sinks, mc.prometheus_interval_s, mon._sample)
        mon.exporter.start()
        log.info("metrics for Prometheus: job_id=%s run=%s%s%s, every %g s", jid, spec.name,
                 f", textfile {sinks[0].path}" if mc.prometheus_dir else "",
                 f", pushgateway {mc.pushgateway}" if mc.pushgateway else "", mc.prometheus_interval_s)
    _current = mon
    return mon
