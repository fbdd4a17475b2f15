"""Where the series go: node_exporter's textfile collector (a `.prom` file rewritten atomically) and a
Pushgateway (one group per job, replaced by each push). Both are fed from one in-memory table of
values that the job updates as it goes (a dict assignment: nothing on a step waits for I/O); a
background thread renders it in Prometheus' text format every `metrics.prometheus_interval_s`, and
the job's end renders it once more with hpcllm_job_running 0.

A sink that fails (a Pushgateway that cannot be reached, a full disk) costs one warning per sink and
job, never the job: the thread goes on trying, and says once when it works again."""

from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path
from typing import Callable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from hpcllm.monitor.metrics import COMMON_LABELS, METRICS

log = logging.getLogger("hpcllm.monitor")

PUSH_JOB = "hpcllm"  # the Pushgateway's `job` label; the grouping key adds job_id
PUSH_TIMEOUT_S = 5.0


class Table:
    """Current values, keyed by (metric name, its own label values). Updated from the job's thread,
    read by the exporter's: a dict item assignment and a dict copy are each atomic in CPython."""

    def __init__(self, common: tuple[str, ...]):
        self.common = common  # values of COMMON_LABELS
        self.values: dict[tuple[str, tuple[str, ...]], float] = {}
        self.hist: dict[tuple[str, tuple[str, ...]], tuple[tuple[float, ...], list[int], float]] = {}

    def set(self, name: str, value: float, labels: tuple[str, ...] = ()) -> None:
        self.values[(name, labels)] = value

    def inc(self, name: str, amount: float = 1.0, labels: tuple[str, ...] = ()) -> None:
        key = (name, labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def observe(self, name: str, value: float, buckets: tuple[float, ...], labels: tuple[str, ...] = ()) -> None:
        key = (name, labels)
        bounds, counts, total = self.hist.get(key) or (buckets, [0] * (len(buckets) + 1), 0.0)
        counts = list(counts)
        counts[next((i for i, b in enumerate(bounds) if value <= b), len(bounds))] += 1
        self.hist[key] = (bounds, counts, total + value)  # one assignment: a reader sees before or after

    def families(self) -> list:
        by_name: dict[str, list] = {}
        for (name, own), v in [*self.values.copy().items(), *self.hist.copy().items()]:
            by_name.setdefault(name, []).append((own, v))
        out = []
        for m in METRICS:
            labels = [*COMMON_LABELS, *m.labels]
            rows = sorted(by_name.get(m.name, ()))
            if not rows:
                continue
            if m.type == "histogram":
                fam = HistogramMetricFamily(m.name, m.help, labels=labels)
                for own, (bounds, counts, total) in rows:
                    cum, buckets = 0, []
                    for b, c in zip([*map(floatToGoString, bounds), "+Inf"], counts):
                        cum += c
                        buckets.append((b, cum))
                    fam.add_metric([*self.common, *own], buckets, total)
                out.append(fam)
                continue
            cls = CounterMetricFamily if m.type == "counter" else GaugeMetricFamily
            fam = cls(m.name, m.help, labels=labels)
            for own, v in rows:
                fam.add_metric([*self.common, *own], v)
            out.append(fam)
        return out


class _Collector:
    def __init__(self, table: Table):
        self.table = table

    def collect(self):
        return self.table.families()


def safe_name(text: str) -> str:
    """A job id as a file name and a URL path segment."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text) or "job"


class Sink:
    what = "sink"

    def __init__(self):
        self.failing = False

    def send(self, registry: CollectorRegistry) -> None:
        raise NotImplementedError

    def __call__(self, registry: CollectorRegistry) -> None:
        try:
            self.send(registry)
        except Exception as e:  # noqa: BLE001 - monitoring never costs the job
            if not self.failing:
                log.warning("%s: %s; the job goes on without it (said once; retried every interval)", self.what,
                            _reason(e))
            self.failing = True
            return
        if self.failing:
            log.info("%s works again", self.what)
        self.failing = False


def _reason(e: Exception) -> str:
    reason = getattr(e, "reason", None)  # urllib's URLError wraps the socket error
    return f"{type(e).__name__}: {reason if reason is not None else e}"


class TextfileSink(Sink):
    """DIR/hpcllm-<job id>.prom, rewritten through a temporary file and a rename, so node_exporter
    (which reads only *.prom) never sees half a file."""

    def __init__(self, directory: str, job_id: str):
        super().__init__()
        self.path = Path(directory) / f"hpcllm-{safe_name(job_id)}.prom"
        self.what = f"metrics.prometheus_dir: cannot write {self.path}"

    def send(self, registry: CollectorRegistry) -> None:
        from hpcllm.atomic import write_bytes

        write_bytes(self.path, generate_latest(registry), mode=0o644)  # node_exporter runs as its own user


class PushSink(Sink):
    """PUT of the whole group job=hpcllm/job_id=<id> (a push replaces what the last one said)."""

    def __init__(self, url: str, job_id: str, timeout_s: float = PUSH_TIMEOUT_S):
        super().__init__()
        self.url, self.job_id, self.timeout_s = url.rstrip("/"), job_id, timeout_s
        self.what = f"metrics.pushgateway {url}: cannot push"

    def send(self, registry: CollectorRegistry) -> None:
        from prometheus_client import push_to_gateway

        push_to_gateway(self.url, job=PUSH_JOB, registry=registry, grouping_key={"job_id": self.job_id},
                        timeout=self.timeout_s)


class Exporter:
    """Renders `table` to every sink now, then every `interval_s` on a daemon thread, until stop().
    `before` runs first each time (in the thread): what is sampled rather than pushed by the job."""

    def __init__(self, table: Table, sinks: list[Sink], interval_s: float, before: Callable[[], None]):
        self.table, self.sinks, self.interval_s, self.before = table, sinks, interval_s, before
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(table))
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one export at a time: the thread's and the final one
        self._thread = threading.Thread(target=self._loop, name="hpcllm-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def export(self) -> None:
        with self._lock:
            try:
                self.before()
            except Exception as e:  # noqa: BLE001 - a sampling error must not stop the exports
                log.debug("monitor sampling failed: %r", e)
            self.table.set("hpcllm_job_heartbeat_time_seconds", time.time())
            for sink in self.sinks:
                sink(self.registry)

    def _loop(self) -> None:
        self.export()
        while not self._stop.wait(self.interval_s):
            self.export()

    def stop(self) -> None:
        """Stop the thread (waiting at most for one push to time out), then export the final values."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=PUSH_TIMEOUT_S * len(self.sinks) + 1)
        self.export()

