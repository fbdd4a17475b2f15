"""The `metrics` section of a job spec: what a running job exports beside metrics.jsonl — TensorBoard event
files (hpcllm.train.metrics) and live Prometheus metrics (hpcllm.monitor)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from hpcllm.fields import path_field


@dataclass
class MetricsConfig:
    # also write TensorBoard event files (run_dir/tensorboard) with the scalars of metrics.jsonl;
    # needs the `tensorboard` package (pip install 'hpcllm[tensorboard]')
    tensorboard: bool = False
    # live Prometheus metrics (hpcllm.monitor, docs/monitoring.md), either way or both:
    # node_exporter's textfile collector directory: rank 0 rewrites DIR/hpcllm-<job id>.prom atomically
    prometheus_dir: str = path_field("")
    # a Pushgateway URL (http://host:9091): rank 0 pushes the job's group; unreachable = one warning
    pushgateway: str = ""
    # how often the file is rewritten / the group pushed (and once more when the job ends)
    prometheus_interval_s: float = 15.0

    def validate(self) -> None:
        if self.prometheus_interval_s <= 0:
            raise ValueError(f"prometheus_interval_s must be > 0, got {self.prometheus_interval_s}")
        if self.pushgateway:
            url = urlsplit(self.pushgateway)
            if url.scheme not in ("http", "https") or not url.hostname or url.query or url.fragment:
                raise ValueError(f"pushgateway must be an http(s) URL such as http://host:9091, got "
                                 f"{self.pushgateway!r}")
            try:
                url.port  # noqa: B018 - raises on a port that is not a number
            except ValueError:
                raise ValueError(f"pushgateway {self.pushgateway!r}: the port is not a number") from None
            if url.username is not None or url.password is not None:  # the URL is logged and in the spec
                raise ValueError("pushgateway: credentials in the URL are not supported (they would be logged and "
                                 "kept in the run dir's spec); reach the Pushgateway through a trusted network")
