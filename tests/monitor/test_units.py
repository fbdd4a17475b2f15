"""The monitoring pieces that need no job: the textfile is whole whenever it is read, the rules pass
`promtool check rules` and their own unit tests, the dashboard's queries parse and name only exported
metrics, the spec's keys are checked, `hpcllm jobs --watch`'s rate and ETA, and what the hooks cost."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hpcllm.monitor import Monitor
from hpcllm.monitor.metrics import METRICS, exported_sample_names
from tests.monitor.prom_util import PROMTOOL

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "monitoring" / "grafana-hpcllm.json"
RULES = REPO / "monitoring" / "hpcllm-rules.yml"


def _promtool(*args: str, cwd=None) -> subprocess.CompletedProcess:
    if PROMTOOL is None:
        pytest.skip("promtool not installed (Debian's prometheus package; scripts/install_system_deps.sh)")
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def _promtool_stdin(text: str) -> subprocess.CompletedProcess:
    """`promtool check metrics` of `text` (it reads the exposition on stdin)."""
    if PROMTOOL is None:
        pytest.skip("promtool not installed (Debian's prometheus package; scripts/install_system_deps.sh)")
    return subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)


def _training_monitor(ranks: int):
    from hpcllm.monitor.export import Table

    mon = Monitor(active=True, exporting=True, hosts=[f"n{r}" for r in range(ranks)])
    mon.table = Table(("42", "unit"))
    mon.train_started(100, 0)
    for r in range(ranks):
        mon.table.set("hpcllm_train_rank_busy_seconds", 0.5, mon._rank(r))
    return mon


def test_textfile_is_whole_whenever_it_is_read(tmp_path):
    from hpcllm.monitor.export import Exporter, TextfileSink

    mon = _training_monitor(64)
    sink = TextfileSink(str(tmp_path), "42")
    exporter = Exporter(mon.table, [sink], 0.0005, mon._sample)  # rewritten as fast as it goes
    stop = threading.Event()

    def steps():  # the job's side: values change while the exporter renders them
        i = 0
        while not stop.is_set():
            i += 1
            mon.train_step(i)
            mon.table.set("hpcllm_train_rank_busy_seconds", i, mon._rank(i % 64))

    worker = threading.Thread(target=steps, daemon=True)
    worker.start()
    exporter.start()
    reads = 0
    deadline = time.monotonic() + 1.5
    try:
        while time.monotonic() < deadline:
            try:
                text = sink.path.read_text()
            except FileNotFoundError:  # before the first write
                continue
            fams = {f.name: f for f in text_string_to_metric_families(text)}
            assert len(fams["hpcllm_train_rank_busy_seconds"].samples) == 64, text[-500:]
            assert "hpcllm_job_heartbeat_time_seconds" in fams
            reads += 1
    finally:
        stop.set()
        exporter.stop()
        worker.join()
    assert reads > 20
    assert [p.name for p in tmp_path.iterdir()] == ["hpcllm-42.prom"]  # no temporary file left behind
    assert (sink.path.stat().st_mode & 0o777) == 0o644  # node_exporter runs as its own user
    p = _promtool_stdin(sink.path.read_text())
    assert p.returncode == 0, p.stdout + p.stderr


def test_metric_names_and_help_pass_promtool_lint():
    """Every metric of the table, rendered once (histogram included), is what promtool calls clean."""
    from prometheus_client import CollectorRegistry, generate_latest

    from hpcllm.monitor.export import Table, _Collector

    t = Table(("1", "r"))
    for m in METRICS:
        own = tuple("x" for _ in m.labels)
        if m.type == "histogram":
            t.observe(m.name, 3.0, (1, 5), own)
        else:
            t.set(m.name, 1.0, own)
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Collector(t))
    text = generate_latest(reg).decode()
    p = _promtool_stdin(text)
    assert p.returncode == 0, p.stdout + p.stderr
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    assert names == exported_sample_names()
    assert all(m.name.startswith("hpcllm_") for m in METRICS)


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bhpcllm_[a-z0-9_]+", expr))


def test_rules_pass_promtool_and_fire_as_meant():
    p = _promtool("check", "rules", str(RULES))
    assert p.returncode == 0, p.stdout + p.stderr
    # the rules' own unit tests: a stalled step counter, a straggler rank, a job killed outright
    p = _promtool("test", "rules", "rules_test.yml", cwd=Path(__file__).parent)
    assert p.returncode == 0, p.stdout + p.stderr
    text = RULES.read_text()
    used = _metric_names(text)
    assert used and used <= exported_sample_names(), used - exported_sample_names()


def test_dashboard_queries_parse_and_name_only_exported_metrics(tmp_path):
    dash = json.loads(DASHBOARD.read_text())
    exprs = [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]
    titles = {p["title"] for p in dash["panels"]}
    for wanted in ("Training throughput (tokens/s)", "Step time per rank (busy s/step)", "Loss", "Inference progress",
                   "Inference ETA", "Restarts"):
        assert wanted in titles
    assert len(exprs) >= 15
    for title, expr in exprs:
        used = _metric_names(expr)
        assert used, f"{title}: {expr} names no hpcllm metric"
        assert used <= exported_sample_names(), f"{title}: {used - exported_sample_names()} not exported"
    # every query is PromQL that Prometheus accepts (Grafana's variables given values first)
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:q{i}", "expr": expr.replace("$__rate_interval", "5m").replace("$run", ".*")}
        for i, (_, expr) in enumerate(exprs)]}]}
    f = tmp_path / "dashboard-rules.yml"
    f.write_text(json.dumps(rules))
    p = _promtool("check", "rules", str(f))
    assert p.returncode == 0, p.stdout + p.stderr


def test_metrics_section_is_checked():
    from hpcllm.config import load_spec
    from hpcllm.errors import ConfigError

    base = {"kind": "train", "name": "x"}
    spec = load_spec(None, ["metrics.pushgateway=http://gw.cluster:9091", "metrics.prometheus_dir=~/prom"], base=base)
    assert spec.metrics.prometheus_dir == str(Path("~/prom").expanduser())  # a path, made absolute
    for bad, words in (("metrics.pushgateway=gw:9091", "http(s) URL"), ("metrics.pushgateway=http://gw:x", "port"),
                       ("metrics.prometheus_interval_s=0", "must be > 0"),
                       ("metrics.pushgateway=http://u:secret@gw:9091", "credentials in the URL are not supported")):
        with pytest.raises(ConfigError, match=re.escape(words)):
            load_spec(None, [bad], base=base)
    with pytest.raises(ConfigError, match=r"^<built-in spec>: metrics: pushgateway must be an http\(s\) URL .*'ftp://gw'$"):
        load_spec(None, ["metrics.pushgateway=ftp://gw"], base=base)  # the CLI prints it as it is, exit 2


def test_a_textfile_dir_that_cannot_be_written_fails_the_start(tmp_path):
    from hpcllm import monitor
    from hpcllm.comm import DistConfig, init_comm
    from hpcllm.config import load_spec
    from hpcllm.errors import ConfigError

    comm = init_comm(DistConfig(backend="single", device="cpu"))
    spec = load_spec(None, [f"metrics.prometheus_dir={tmp_path / 'missing'}"], base={"kind": "train", "name": "x"})
    with pytest.raises(ConfigError, match=r"metrics.prometheus_dir '.*missing' is not a directory"):
        monitor.start(spec, comm)
    assert monitor.current() is not None and not monitor.current().active


def test_watch_rate_and_eta(tmp_path):
    from hpcllm.monitor.progress import eta_text, infer_progress, train_progress, watch_line

    run = tmp_path / "run"
    (run / "submitit").mkdir(parents=True)
    (run / "submitit" / "train-spec-abc.yaml").write_text(json.dumps(
        {"kind": "train", "name": "w", "run_dir": str(run), "train": {"max_steps": 100}}))
    recs = [dict(step=10, dt_s=5.0, start="s1", time=1.0), dict(step=20, dt_s=4.0, start="s1", time=5.0)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 3')  # torn last line
    p = train_progress(run, 100)
    assert p["step"] == 20 and p["steps_per_s"] == pytest.approx(2.5) and p["eta_s"] == pytest.approx(32.0)
    assert watch_line(run, "train") == "step 20/100 2.5 step/s ETA 32s"
    assert eta_text(3725) == "1h02m" and eta_text(None) == "?"
    # a resumed start's first record: no rate across two starts
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (recs[0], dict(recs[1], start="s2"))))
    assert watch_line(run, "train") == "step 20/100 ETA ?"

    out = tmp_path / "outputs"
    out.mkdir()
    now = 1000.0
    for i, (t, n) in enumerate(((900.0, 4), (950.0, 4), (990.0, 2), (100.0, 8))):  # the last one: long ago
        (out / f"out-{i:05d}.h5.done").write_text(json.dumps({"n_records": n, "finished_at": t}))
    p = infer_progress(out, 30, now=now)
    assert p["records_done"] == 18
    assert p["records_per_s"] == pytest.approx(6 / 100)  # the records after the window's first marker
    assert p["eta_s"] == pytest.approx(12 / 0.06)


def test_hooks_cost_well_under_one_percent_of_a_step():
    """The per-step hook is a dict assignment; the log-step hook and an export of a 64-rank table are
    measured too (`hpcllm bench monitor` sets them beside a real step)."""
    from hpcllm.bench.monitor import hook_costs

    c = hook_costs(ranks=64, calls=20_000)
    assert c["step_hook_s"] < 5e-6  # 1% of a 0.5 ms step, on a loaded 2-core machine
    assert c["log_hook_s"] < 1e-3
    assert c["export_s"] < 0.15  # 1% of the default 15 s between exports
    off = Monitor()
    t0 = time.perf_counter()
    for i in range(20_000):
        off.train_step(i)
    assert (time.perf_counter() - t0) / 20_000 < 5e-6  # not configured: as cheap
