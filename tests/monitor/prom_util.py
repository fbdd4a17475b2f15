"""A real Prometheus and Pushgateway for the monitoring tests (Debian's `prometheus` and
`prometheus-pushgateway`, installed by scripts/install_system_deps.sh): started here on free
loopback ports with their state in a temporary directory — the packages' own services play no part
— and stopped at the end of the session. Prometheus scrapes the Pushgateway every second with
honor_labels, as a cluster's Prometheus does."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

PROMETHEUS = shutil.which("prometheus")
PUSHGATEWAY = shutil.which("prometheus-pushgateway") or shutil.which("pushgateway")
PROMTOOL = shutil.which("promtool")
READY_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> bytes:
    # loopback only: no proxy from the environment
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as r:
        return r.read()


def _wait_ready(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            _get(url, timeout=1.0)
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} not ready within {READY_S:g} s:\n{log.read_text()[-3000:]}")


@dataclass
class Stack:
    prometheus: str  # http://127.0.0.1:PORT
    pushgateway: str
    procs: list
    logs: list

    def query(self, expr: str) -> list[dict]:
        """The result vector of an instant query through /api/v1/query."""
        url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        body = json.loads(_get(url))
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, expr: str) -> float:
        res = self.query(expr)
        assert len(res) == 1, (expr, res)
        return float(res[0]["value"][1])

    def wait_for(self, expr: str, timeout: float = 30.0) -> list[dict]:
        """The result of `expr` once it is not empty (Prometheus scrapes every second)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            res = self.query(expr)
            if res:
                return res
            time.sleep(0.5)
        raise AssertionError(f"{expr}: no result within {timeout:g} s")

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        for f in self.logs:
            f.close()


def start_stack(root: Path) -> Stack:
    pg_port, prom_port = free_port(), free_port()
    procs, logs = [], []

    def spawn(argv: list[str], log: Path) -> subprocess.Popen:
        logs.append(open(log, "w"))
        procs.append(subprocess.Popen(argv, stdout=logs[-1], stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        return procs[-1]

    try:
        pg_log = root / "pushgateway.log"
        spawn([PUSHGATEWAY, f"--web.listen-address=127.0.0.1:{pg_port}",
               f"--persistence.file={root / 'pushgateway.data'}"], pg_log)
        pushgateway = f"http://127.0.0.1:{pg_port}"
        _wait_ready(f"{pushgateway}/-/ready", procs[-1], pg_log)
        config = root / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "pushgateway", "honor_labels": True,
                                "static_configs": [{"targets": [f"127.0.0.1:{pg_port}"]}]}]}))
        prom_log = root / "prometheus.log"
        spawn([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={root / 'tsdb'}",
               f"--web.listen-address=127.0.0.1:{prom_port}"], prom_log)
        prometheus = f"http://127.0.0.1:{prom_port}"
        _wait_ready(f"{prometheus}/-/ready", procs[-1], prom_log)
    except BaseException:
        Stack("", "", procs, logs).stop()
        raise
    return Stack(prometheus, pushgateway, procs, logs)
