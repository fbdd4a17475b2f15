"""Live metrics read back through a real Prometheus: a 2-rank training job and a 2-rank inference job
push to a real Pushgateway (and training also writes node_exporter's textfile), and the values
Prometheus answers on /api/v1/query are those of metrics.jsonl and of the outputs. A prepare job
whose Pushgateway cannot be reached warns once and finishes; its textfile passes `promtool check
metrics`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.infer.helpers import infer_spec, outputs, prepare_prompts, run_cli, tiny_model
from tests.monitor.prom_util import PROMTOOL, free_port
from tests.mpi_util import mpi_env, mpirun_cmd

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "hpcllm.cli"]
STEPS, LOG, CKPT = 12, 3, 6
# the jobs push to a Pushgateway on loopback: never through a proxy the environment may name
NO_PROXY = {"no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"}


def promtool_check_metrics(text: str) -> None:
    if PROMTOOL is None:
        pytest.skip("promtool not installed (Debian's prometheus package; scripts/install_system_deps.sh)")
    p = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


def families(text: str) -> dict:
    """name -> {labels tuple: value}, through prometheus_client's own parser."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The training corpus, prepared by a job whose Pushgateway is a closed port and whose textfile
    directory is real: (dataset, the finished process, the textfile directory)."""
    root = tmp_path_factory.mktemp("mon")
    corpus = root / "c"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"{i}.txt").write_text(f"document {i} " + "lorem ipsum dolor " * (120 + 7 * i))
    prom_dir = root / "textfile"
    prom_dir.mkdir()
    spec = root / "prep.yaml"
    spec.write_text(json.dumps({
        "kind": "prepare", "name": "prep-mon", "run_dir": str(root / "p"),
        "data": {"inputs": [str(corpus)], "dataset": str(root / "ds"), "val_fraction": 0.2},
        "metrics": {"prometheus_dir": str(prom_dir), "pushgateway": f"http://127.0.0.1:{free_port()}",
                    "prometheus_interval_s": 0.05}}))
    p = subprocess.run([*CLI, "prepare", str(spec)], capture_output=True, text=True, timeout=120, cwd=REPO,
                       env=mpi_env(NO_PROXY))
    return root / "ds", p, prom_dir


def test_unreachable_pushgateway_is_one_warning_and_the_job_finishes(prepared):
    ds, p, prom_dir = prepared
    assert p.returncode == 0, p.stderr
    warnings = [line for line in p.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "metrics.pushgateway" in warnings[0] and "cannot push" in warnings[0], p.stderr
    assert (ds / "manifest.json").is_file()
    # the textfile sink went on: the job's totals, complete, and promtool accepts the file
    (f,) = prom_dir.glob("hpcllm-*.prom")
    text = f.read_text()
    promtool_check_metrics(text)
    fam = families(text)
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert list(fam["hpcllm_prepare_documents"].values()) == [summary["documents"]]
    assert list(fam["hpcllm_prepare_tokens"].values()) == [summary["tokens"]]
    assert list(fam["hpcllm_prepare_rank_tokens_total"].values()) == [summary["tokens"]]  # one rank: all of it
    assert list(fam["hpcllm_job_running"].values()) == [0.0]
    ((labels, _),) = fam["hpcllm_job_ending"].items()
    assert dict(labels)["ending"] == "finished" and dict(labels)["run"] == "prep-mon"


def _train_spec(root: Path, ds: Path, prom, prom_dir: Path) -> Path:
    spec = {"kind": "train", "name": "mon-train", "run_dir": str(root / "run"), "data": {"dataset": str(ds)},
            "dist": {"backend": "mpi", "timeout_s": 60},
            "model": {"size": "custom", "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 64},
            "train": {"max_steps": STEPS, "batch_size": 2, "seq_len": 32, "log_interval": LOG, "eval_interval": 0,
                      "ckpt_interval": CKPT, "progress": False},
            "metrics": {"prometheus_dir": str(prom_dir), "pushgateway": prom.pushgateway,
                        "prometheus_interval_s": 0.2}}
    p = root / "train.yaml"
    p.write_text(json.dumps(spec))
    return p


@pytest.mark.mpi
def test_two_rank_training_read_back_through_prometheus(prepared, prom, tmp_path):
    ds = prepared[0]
    prom_dir = tmp_path / "textfile"
    prom_dir.mkdir()
    spec = _train_spec(tmp_path, ds, prom, prom_dir)
    proc = subprocess.Popen(mpirun_cmd(2, *CLI, "train", str(spec)), env=mpi_env(NO_PROXY), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # read the textfile while the job rewrites it: every read is a whole file
    reads = 0
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        for f in prom_dir.glob("hpcllm-*.prom"):
            try:
                text = f.read_text()
            except FileNotFoundError:
                continue
            assert text.endswith("\n") and "hpcllm_job_heartbeat_time_seconds" in families(text), text
            reads += 1
        time.sleep(0.01)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert reads > 0

    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = recs[-1]
    sel = '{run="mon-train"}'
    prom.wait_for(f"hpcllm_job_running{{run=\"mon-train\"}} == 0")  # the final push, scraped
    assert prom.value(f"hpcllm_train_step{sel}") == last["step"] == STEPS
    assert prom.value(f"hpcllm_train_loss{sel}") == pytest.approx(last["loss"], rel=1e-12)
    assert prom.value(f"hpcllm_train_tokens_per_second{sel}") == pytest.approx(last["tokens_per_s"], rel=1e-12)
    assert prom.value(f"hpcllm_train_max_steps{sel}") == STEPS
    assert prom.value(f"hpcllm_train_checkpoint_step{sel}") == STEPS
    assert prom.value(f"hpcllm_train_checkpoints_total{sel}") == STEPS // CKPT
    assert prom.value(f"hpcllm_job_ranks{sel}") == 2
    assert prom.value(f'hpcllm_job_ending{{run="mon-train",ending="finished"}}') == 1
    busy = prom.query(f"hpcllm_train_rank_busy_seconds{sel}")
    assert sorted(r["metric"]["rank"] for r in busy) == ["0", "1"]
    assert all(r["metric"]["node"] and float(r["value"][1]) > 0 for r in busy)
    # the Pushgateway's group is the job's: job="hpcllm", job_id as the textfile names it
    (f,) = prom_dir.glob("hpcllm-*.prom")
    job_id = f.name[len("hpcllm-"):-len(".prom")]
    assert {r["metric"]["job_id"] for r in busy} == {job_id}
    assert {r["metric"]["job"] for r in busy} == {"hpcllm"}
    text = f.read_text()
    promtool_check_metrics(text)
    fam = families(text)
    assert list(fam["hpcllm_train_step"].values()) == [STEPS]


@pytest.mark.mpi
def test_two_rank_inference_read_back_through_prometheus(prom, tmp_path):
    tiny_model(tmp_path / "model")
    records = [{"id": i, "prompt": "x = " * (1 + i % 4) + str(i)} for i in range(10)]
    assert prepare_prompts(tmp_path, records, per_shard=2).returncode == 0
    spec = infer_spec(tmp_path, "mon-infer", model=tmp_path / "model", prompts=tmp_path / "prompts", max_new_tokens=4)
    p = run_cli("infer", spec, f"metrics.pushgateway={prom.pushgateway}", "metrics.prometheus_interval_s=0.2",
                n=2, timeout=180, env=NO_PROXY)
    assert p.returncode == 0, p.stderr[-3000:]

    done = outputs(tmp_path / "mon-infer")
    sel = '{run="mon-infer"}'
    prom.wait_for(f"hpcllm_job_running{sel} == 0")
    assert prom.value(f"hpcllm_infer_records_done_total{sel}") == len(done) == len(records)
    assert prom.value(f"hpcllm_infer_shards_done_total{sel}") == prom.value(f"hpcllm_infer_shards{sel}") == 5
    assert prom.value(f"hpcllm_infer_records{sel}") == len(records)
    assert prom.value(f"hpcllm_infer_new_tokens_total{sel}") == sum(len(t) for t in done.values())
    assert prom.value(f"hpcllm_infer_shard_seconds_count{sel}") == 5
    assert prom.value(f"hpcllm_infer_queue_depth{sel}") == 0  # the dynamic schedule handed out every shard
    per_rank = prom.query(f"hpcllm_infer_rank_records_done_total{sel}")
    assert sum(float(r["value"][1]) for r in per_rank) == len(records)
    assert {r["metric"]["rank"] for r in per_rank} <= {"0", "1"}
    assert prom.value(f'hpcllm_job_info{{run="mon-infer",kind="infer"}}') == 1
