"""Every metric hpcllm exports to Prometheus: its name, type, help text and labels.

Each series also carries `job_id` (Slurm's job id, `ARRAYJOB_TASK` for an array task, else
`HOST-PID` of rank 0) and `run` (the spec's name). Per-rank series add `rank` and `node`; no label
takes unbounded values (no record ids, no numbers). docs/monitoring.md has this table in prose, and
the Grafana dashboard and the rules file may name only these (tests/monitor checks both).
"""

from __future__ import annotations

from dataclasses import dataclass

COMMON_LABELS = ("job_id", "run")
RANK_LABELS = ("rank", "node")

# upper bounds of the per-shard latency histogram, seconds
SHARD_SECONDS_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600)


@dataclass(frozen=True)
class Metric:
    name: str
    type: str  # gauge | counter (its name ends in _total) | histogram
    help: str
    labels: tuple[str, ...] = ()

    def samples(self) -> list[str]:
        """The sample names it exposes (what a PromQL query can name)."""
        if self.type == "histogram":
            return [f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count"]
        return [self.name]


def _m(name: str, type_: str, help_: str, labels: tuple[str, ...] = ()) -> Metric:
    return Metric(name, type_, help_, labels)


METRICS: tuple[Metric, ...] = (
    # every job kind
    _m("hpcllm_job_info", "gauge", "Always 1; its labels say what runs: the job kind, the backend and the device type",
       ("kind", "backend", "device")),
    _m("hpcllm_job_running", "gauge", "1 while the job runs, 0 once it has ended (hpcllm_job_ending says how)"),
    _m("hpcllm_job_ending", "gauge", "1 for how the job ended: finished, stopped (signal or time limit, requeued) "
       "or crashed", ("ending",)),
    _m("hpcllm_job_start_time_seconds", "gauge", "Unix time this start of the job began"),
    _m("hpcllm_job_end_time_seconds", "gauge", "Unix time the job ended (absent while it runs)"),
    _m("hpcllm_job_heartbeat_time_seconds", "gauge", "Unix time of the last export: an old heartbeat with "
       "hpcllm_job_running 1 means the job was killed outright"),
    _m("hpcllm_job_ranks", "gauge", "Ranks (processes) of the job"),
    _m("hpcllm_job_nodes", "gauge", "Nodes the ranks run on"),
    _m("hpcllm_job_restarts", "gauge", "Times Slurm has requeued this job (SLURM_RESTART_COUNT)"),
    # training
    _m("hpcllm_train_step", "gauge", "The last completed optimizer step"),
    _m("hpcllm_train_max_steps", "gauge", "train.max_steps"),
    _m("hpcllm_train_resumed_from_step", "gauge", "The checkpoint step this start resumed from (0: a fresh run)"),
    _m("hpcllm_train_loss", "gauge", "Training loss, the mean over the last log interval and the ranks"),
    _m("hpcllm_train_val_loss", "gauge", "Validation loss at the last evaluation"),
    _m("hpcllm_train_learning_rate", "gauge", "Learning rate of the last step"),
    _m("hpcllm_train_tokens_per_second", "gauge", "Training tokens per second over the last log interval"),
    _m("hpcllm_train_mfu", "gauge", "Model FLOPs utilisation (0-1) over the last log interval (GPUs of known peak)"),
    _m("hpcllm_train_step_seconds", "gauge", "Wall seconds per step over the last log interval"),
    _m("hpcllm_train_rank_busy_seconds", "gauge", "Seconds per step this rank spent loading data and computing, "
       "not waiting for its peers: a straggler has the largest", RANK_LABELS),
    _m("hpcllm_train_rank_data_wait_fraction", "gauge", "Fraction of the last log interval this rank waited for "
       "its data loader", RANK_LABELS),
    _m("hpcllm_train_rank_comm_fraction", "gauge", "Fraction of the last log interval this rank was blocked in "
       "gradient communication", RANK_LABELS),
    _m("hpcllm_train_checkpoints_total", "counter", "Checkpoints written by this start"),
    _m("hpcllm_train_checkpoint_seconds", "gauge", "Seconds the last checkpoint took to write"),
    _m("hpcllm_train_checkpoint_step", "gauge", "Step of the latest checkpoint: the last good step a restart "
       "resumes from"),
    # inference (rank 0 reads the shards' done markers: these count what is safely in the outputs)
    _m("hpcllm_infer_shards", "gauge", "Prompt shards of this job (of this array task)"),
    _m("hpcllm_infer_records", "gauge", "Prompt records in those shards"),
    _m("hpcllm_infer_shards_skipped", "gauge", "Shards already done when this start began"),
    _m("hpcllm_infer_records_skipped", "gauge", "Records of the shards already done when this start began"),
    _m("hpcllm_infer_shards_done_total", "counter", "Shards this start finished (output and done marker written)"),
    _m("hpcllm_infer_records_done_total", "counter", "Records of the shards this start finished"),
    _m("hpcllm_infer_new_tokens_total", "counter", "New tokens generated in the shards this start finished"),
    _m("hpcllm_infer_queue_depth", "gauge", "Shards not yet handed to a rank (the dynamic schedule over MPI)"),
    _m("hpcllm_infer_shard_seconds", "histogram", "Seconds each shard took to generate or score"),
    _m("hpcllm_infer_rank_records_done_total", "counter", "Records of the shards this rank finished in this start",
       RANK_LABELS),
    _m("hpcllm_infer_rank_busy_seconds_total", "counter", "Seconds this rank spent on the shards it finished "
       "(its load)", RANK_LABELS),
    # prepare (while it runs, rank 0's share of the inputs; the job's totals once it ends)
    _m("hpcllm_prepare_rank_input_bytes", "gauge", "Bytes of input files this rank tokenizes", RANK_LABELS),
    _m("hpcllm_prepare_rank_input_bytes_done", "gauge", "Bytes of input files this rank has tokenized", RANK_LABELS),
    _m("hpcllm_prepare_rank_documents_total", "counter", "Documents this rank has tokenized", RANK_LABELS),
    _m("hpcllm_prepare_rank_tokens_total", "counter", "Tokens this rank has produced", RANK_LABELS),
    _m("hpcllm_prepare_documents", "gauge", "Documents in the finished dataset"),
    _m("hpcllm_prepare_tokens", "gauge", "Tokens in the finished dataset"),
    _m("hpcllm_prepare_shards", "gauge", "Shards of the finished dataset"),
)

BY_NAME = {m.name: m for m in METRICS}


def exported_sample_names() -> set[str]:
    """Every sample name a query may use."""
    return {s for m in METRICS for s in m.samples()}
