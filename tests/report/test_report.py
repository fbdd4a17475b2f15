"""Run reports on real runs: a 2-rank training killed with kill -9 on a rank, resumed, stopped by
SIGUSR2, resumed again to the end — the report lists each start with its ending, the steps redone
and the recovery time, its goodput is recomputed here from the records, and the TensorBoard event
files hold one series per metric without a duplicate step."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.disk_util import small_disk  # noqa: F401 - a fixture
from tests.mpi_util import mpi_env, mpirun_cmd
from tests.train.corpus import prepare_small_corpus

REPO = Path(__file__).resolve().parents[2]
# sized so that a step costs ~30 ms here (tests/launch/test_render.py's STEPS); a tiny model would finish
# first. mpirun passes SIGUSR2 on at once: sent at step 160 (polled every 0.05 s), it has landed at step
# ~163; 240 steps leave 80 (~2.5 s, ~25x that latency, more on a loaded machine). A late signal fails
# the fixture (the stopped start must exit 85, not 0).
STEPS = 240
CKPT = 50


def _spec(root: Path, ds: Path) -> Path:
    spec = {"kind": "train", "name": "rep", "run_dir": str(root / "run"), "data": {"dataset": str(ds)},
            "dist": {"timeout_s": 10},
            "model": {"size": "custom", "n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64},
            "train": {"max_steps": STEPS, "batch_size": 4, "seq_len": 64, "log_interval": 10, "eval_interval": 0,
                      "ckpt_interval": CKPT, "keep_checkpoints": 10, "progress": False},
            "metrics": {"tensorboard": True}}
    p = root / "rep.yaml"
    p.write_text(json.dumps(spec))
    return p


def _last_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError):
        return 0


def _train_until(spec: Path, run: Path, step: int, act) -> subprocess.CompletedProcess:
    """Start 2-rank training; once metrics.jsonl has passed `step`, act(mpirun process)."""
    start_step = _last_step(run)
    proc = subprocess.Popen(mpirun_cmd(2, sys.executable, "-m", "hpcllm.cli", "train", str(spec)), env=mpi_env(),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while act and time.time() < deadline and proc.poll() is None:
        s = _last_step(run)
        if s >= step and s != start_step:
            act(proc)
            break
        time.sleep(0.05)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _kill_a_rank(proc, spec):
    pids = subprocess.run(["pgrep", "-f", f"hpcllm.cli train {spec}"], capture_output=True, text=True).stdout.split()
    ranks = sorted(int(p) for p in pids if int(p) != proc.pid)
    os.kill(ranks[-1], signal.SIGKILL)


@pytest.fixture(scope="module")
def restarted_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    spec = _spec(root, prepare_small_corpus(root))
    run = root / "run"
    killed = _train_until(spec, run, 80, lambda p: _kill_a_rank(p, spec))
    assert killed.returncode != 0
    killed_at = _last_step(run)
    stopped = _train_until(spec, run, 160, lambda p: p.send_signal(signal.SIGUSR2))  # mpirun forwards it
    assert stopped.returncode == 85, stopped.stderr[-2000:]
    done = _train_until(spec, run, 0, None)
    assert done.returncode == 0, done.stderr[-2000:]
    return run, killed_at


def _report(*args):
    return subprocess.run([sys.executable, "-m", "hpcllm.cli", "report", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO)


@pytest.mark.mpi
def test_report_lists_each_start_with_ending_redone_steps_and_recovery(restarted_run, tmp_path):
    run, killed_at = restarted_run
    p = _report(run, "--json")
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    s0, s1, s2 = rep["starts"]
    assert s0["ending"].startswith(("killed", "crashed")) and s0["resumed_from_step"] == 0
    assert s0["last_step"] == killed_at  # the last step it logged, read by the next start before truncating
    assert s1["resumed_from_step"] == (killed_at // CKPT) * CKPT
    assert s1["steps_redone"] == killed_at - s1["resumed_from_step"] > 0
    assert s1["ending"] == "stopped (signal SIGUSR2)"
    assert s2["resumed_from_step"] == s1["last_step"] and s2["steps_redone"] == 0  # a stop checkpoints
    assert s2["ending"] == "finished" and s2["last_step"] == STEPS == rep["final_step"]
    for s in (s1, s2):
        assert 0 < s["recovery_s"] < 120 and s["startup_s"] > 0 and s["tokens_per_s"] > 0
    # a start killed outright: each rank's CPU time at the last step it logged (rank 0 alone if it crashed)
    assert s0["per_rank"] and s0["per_rank"][0]["rank"] == 0 and all(r["cpu_s"] > 0 for r in s0["per_rank"])
    for s in (s1, s2):  # a start that ended on its own says what each rank used
        assert [r["rank"] for r in s["per_rank"]] == [0, 1]
        assert all(r["cpu_s"] > 0 and r["peak_rss_bytes"] > 0 for r in s["per_rank"])
    assert 0 <= s2["data_wait_fraction"] < 1 and 0 <= s2["comm_fraction"] < 1

    text = _report(run, "--plot", tmp_path / "t.png")
    assert text.returncode == 0, text.stderr
    assert "start 1" in text.stdout and "steps redone" not in text.stdout and "step(s) redone" in text.stdout
    # a start killed outright: its CPU times are those of its last logged record (the next start dropped
    # the records past its checkpoint from metrics.jsonl, after keeping the last one's in its start record)
    assert s0["ending"].startswith("killed (no end record: scancel"), s0["ending"]
    assert s1["resumed_from_step"] < killed_at
    assert [r["at_step"] for r in s0["per_rank"]] == [killed_at, killed_at]
    line = next(x for x in text.stdout.splitlines() if x.strip().startswith("rank 1:"))
    assert line.endswith(f"s (at step {killed_at}, its last log)"), text.stdout
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.mpi
def test_goodput_recomputed_from_the_records(restarted_run):
    run, _ = restarted_run
    rep = json.loads(_report(run, "--json").stdout)
    records = [json.loads(x) for x in (run / "provenance.jsonl").read_text().splitlines()]
    starts = [r for r in records if r["event"] == "start"]
    ends = {r["start"]: r for r in records if r["event"] == "end"}
    # a killed start's stop: the last metrics record it wrote, as the next start saw it
    stop = [ends[s["start"]]["time"] if s["start"] in ends else starts[i + 1]["previous_last_logged"]["time"]
            for i, s in enumerate(starts)]
    allocated = sum(t - s["process_start"] for s, t in zip(starts, stop))
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(10, STEPS + 1, 10))  # each step once
    productive = sum(m["dt_s"] for m in metrics)
    assert rep["allocated_s"] == pytest.approx(allocated)
    assert rep["goodput"] == pytest.approx(productive / allocated)
    assert 0 < rep["goodput"] < 1


@pytest.mark.mpi
def test_checkpoint_interval_advice_from_the_runs_own_records(restarted_run):
    """hpcllm.report.interval's figures on a real run: one failure (the start killed with kill -9;
    the SIGUSR2 stop is none) in the run's allocated time on its one node, the checkpoints' measured
    stalls, the restarts' recovery time."""
    from hpcllm.report.interval import daly

    run, _ = restarted_run
    rep = json.loads(_report(run, "--json").stdout)
    adv = rep["checkpoint_interval"]
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    saves = [s for m in metrics for s in m.get("ckpt_s", [])]
    assert len(saves) >= 3 and all(s > 0 for s in saves)  # those of steps 100, 150 and 200 at least
    assert adv["figures"]["failures"] == 1 and adv["nodes"] == 1
    assert adv["mtbf_s"] == pytest.approx(rep["allocated_s"])
    assert adv["save_s"] == pytest.approx(sum(saves) / len(saves))
    assert adv["restart_s"] == pytest.approx((rep["starts"][1]["recovery_s"] + rep["starts"][2]["recovery_s"]) / 2)
    assert adv["interval_s"] == pytest.approx(daly(adv["save_s"], adv["mtbf_s"])) and adv["step_s"] > 0
    assert adv["actual"]["ckpt_interval"] == CKPT


@pytest.mark.mpi
def test_provenance_records_ids_versions_and_hashes(restarted_run):
    run, _ = restarted_run
    records = [json.loads(x) for x in (run / "provenance.jsonl").read_text().splitlines()]
    starts = [r for r in records if r["event"] == "start"]
    assert len({s["start"] for s in starts}) == 3
    for s in starts:
        assert s["world_size"] == 2 and s["plan"]["shard"] == "none" and s["kind"] == "train"
        assert s["versions"]["torch"] and "Open MPI" in s["versions"]["mpi"] and s["versions"]["hpcllm"]
        assert len(s["spec_sha256"]) == 64 and len(s["dataset_manifest_sha256"]) == 64
        assert s["user"]["uid"] == os.getuid() and s["user"]["name"]  # who ran it
    assert starts[0]["resume_from"] is None and starts[2]["resume_from"]["path"].endswith("step_%08d" % starts[2]
                                                                                           ["resume_from"]["step"])


@pytest.mark.mpi
def test_tensorboard_one_series_per_metric_and_no_duplicate_steps(restarted_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, killed_at = restarted_run
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"loss", "lr", "tokens_per_s", "dt_s", "cpu_s"} <= set(tags)
    for tag in tags:
        steps = [e.step for e in acc.Scalars(tag)]
        assert steps == sorted(set(steps)), f"{tag}: duplicate or unordered steps {steps}"
    assert [e.step for e in acc.Scalars("loss")] == list(range(10, STEPS + 1, 10))
    # the same values as metrics.jsonl (the redone steps' first values are kept: a resume logs the same)
    metrics = {json.loads(x)["step"]: json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()}
    for e in acc.Scalars("loss"):
        assert e.value == pytest.approx(metrics[e.step], rel=1e-5)


def test_report_of_a_dir_without_records_is_one_line(tmp_path):
    p = _report(tmp_path)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "provenance.jsonl: no provenance records" in p.stderr
    (tmp_path / "provenance.jsonl").write_text('{"event": "start", "start": "x"}\n')
    p = _report(tmp_path)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "lacks field" in p.stderr


def test_unknown_metrics_key_is_an_error(tmp_path):
    from hpcllm.config import load_spec
    from hpcllm.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown key 'metrics.tensorbord'.*did you mean 'metrics.tensorboard'"):
        load_spec(None, ["metrics.tensorbord=true"], base={"kind": "train"})


def test_a_torn_metrics_line_is_skipped_on_resume(tmp_path, caplog):
    """kill -9 while rank 0 appends to metrics.jsonl can leave half a line: the resumed run names it
    and goes on, instead of dying on it."""
    from hpcllm.train.metrics import MetricsLog, read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 10, "loss": 3.0}\n{"step": 20, "loss": 2.5}\n{"step": 30, "lo')
    logger = logging.getLogger("hpcllm")
    propagate, logger.propagate = logger.propagate, True  # to caplog, whatever logging an earlier test set up
    try:
        MetricsLog(tmp_path, True).truncate_after(20)
    finally:
        logger.propagate = propagate
    assert [r["step"] for r in read_metrics(tmp_path)] == [10, 20]
    assert "metrics.jsonl:3: not a metrics record" in caplog.text


@pytest.mark.mpi
def test_report_of_an_inference_run_on_two_ranks(tmp_path):
    """7 shards on 2 ranks (dynamic schedule), then a rerun that skips them all: per-shard seconds,
    each rank's busy time, the load balance, nothing redone; the model's hash is recorded."""
    from tests.infer.helpers import infer_spec, prepare_prompts, run_cli, tiny_model

    model = tiny_model(tmp_path / "model")
    assert prepare_prompts(tmp_path, [{"id": i, "prompt": f"q{i} " * (1 + i % 4)} for i in range(20)]).returncode == 0
    spec = infer_spec(tmp_path, "inf", model=model, prompts=tmp_path / "prompts")
    for _ in range(2):
        p = run_cli("infer", spec, n=2)
        assert p.returncode == 0, p.stderr[-2000:]
    rep = json.loads(_report(tmp_path / "inf", "--json").stdout)
    first, rerun = rep["starts"]
    assert rep["kind"] == "infer" and rep["shards"] == 7 and rep["shards_redone"] == {}
    assert first["ending"] == "finished" and first["shards_done"] == 7 and first["shards_lost"] == []
    assert first["records"] == 20 and first["records_per_s"] > 0 and first["tokens_per_s"] > 0
    assert set(first["rank_busy_s"]) == {"0", "1"} and first["load_balance"] >= 1.0
    busy = sum(first["rank_busy_s"].values())
    done = [json.loads(m.read_text()) for m in (tmp_path / "inf" / "outputs").glob("*.done")]
    assert busy == pytest.approx(sum(m["seconds"] for m in done))
    assert rerun["shards_done"] == 0 and rerun["shards_skipped"] == 7 and rerun["load_balance"] is None
    assert rep["shard_seconds"]["min"] <= rep["shard_seconds"]["p50"] <= rep["shard_seconds"]["max"]
    ends = [json.loads(x) for x in (tmp_path / "inf" / "provenance.jsonl").read_text().splitlines()
            if '"end"' in x]
    assert len(ends[0]["model_sha256"]) == 64 and ends[0]["model_sha256"] == done[0]["fingerprint"]["model_sha256"]
    text = _report(tmp_path / "inf").stdout
    assert "7 shard(s) done" in text and "shards redone: none" in text


def test_a_start_records_its_user_and_a_full_run_dir_is_one_line(tmp_path, small_disk, capsys, caplog):
    """The start record names who ran it (the audit trail), and a run_dir on a full disk is one
    line in the job kind's error — the start record, the end record, the rank's log file — where the
    append raised ENOSPC through a traceback and the log handler printed one per line."""
    import logging
    import pwd

    from hpcllm.comm import init_comm
    from hpcllm.comm.config import DistConfig
    from hpcllm.config import load_spec
    from hpcllm.errors import InferError
    from hpcllm.jobs.preflight import check_run_dir
    from hpcllm.log import setup_logging
    from hpcllm.jobs.runtime import record_start
    from hpcllm.provenance import Start, read_records, user
    from hpcllm.report.report import build_report, format_report

    comm = init_comm(DistConfig(backend="single"))
    spec = load_spec(None, [f"run_dir={tmp_path / 'run'}"], base={"kind": "infer"})
    record_start(spec, comm).end("finished")  # an infer job: its run_dir error is InferError
    start = read_records(spec.run_dir)[0][0]
    me = pwd.getpwuid(os.getuid()).pw_name
    assert start["user"] == {"name": me, "uid": os.getuid()}
    assert f"  start 0 [{start['start']}] by {me} (uid {os.getuid()}) not under Slurm, 1 rank(s): finished" \
        in format_report(build_report(spec.run_dir, use_sacct=False))
    with pytest.MonkeyPatch.context() as mp:  # a uid without a passwd entry, as in a container run with --user
        mp.setattr(pwd, "getpwuid", lambda uid: (_ for _ in ()).throw(KeyError(f"getpwuid(): uid not found: {uid}")))
        mp.setenv("USER", "ghost")
        assert user() == {"name": "ghost", "uid": os.getuid()}
        mp.delenv("USER")
        mp.delenv("LOGNAME", raising=False)
        assert user() == {"name": None, "uid": os.getuid()}

    full = load_spec(None, [f"run_dir={small_disk.path / 'run'}"], base={"kind": "infer"})
    record, log_file = small_disk.path / "run" / "provenance.jsonl", small_disk.path / "run" / "logs" / "rank0.log"
    small_disk.fill(record, log_file)
    no_space = r"\((No space left on device|File too large)\)"
    logger = logging.getLogger("hpcllm")
    saved = logger.handlers[:], logger.level, logger.propagate
    logger.propagate = True  # to caplog (until setup_logging below), whatever an earlier test set up
    try:
        with small_disk.limit():
            if small_disk.how == "tmpfs":  # a byte, not an empty file: under the file-size limit it fits
                with pytest.raises(InferError, match=f"run_dir '{full.run_dir}' cannot be written {no_space}: free "
                                                     "some space, or choose another run_dir"):
                    check_run_dir(full.run_dir, InferError)
            with pytest.raises(InferError, match=f"^{record}: cannot record this start {no_space}$"):
                record_start(full, comm)
            Start(full.run_dir, "s1", comm, True, InferError).end("crashed", gather=False)  # its own error goes up
            assert f"{record}: the end record of this start was not written" in caplog.text
            with pytest.raises(InferError, match=f"^{record}: cannot record the end of this start {no_space}$"):
                Start(full.run_dir, "s2", comm, True, InferError).end("finished")
            setup_logging(0, full.run_dir)
            for i in range(3):
                logging.getLogger("hpcllm.test").info("line %d", i)
            setup_logging(0, None)
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved
    err = capsys.readouterr().err
    assert "Logging error" not in err and "Traceback" not in err
    assert err.count(f"warning: {log_file} cannot be written") == 1, err


def test_infer_on_a_full_disk_is_one_line(tmp_path, small_disk):
    if small_disk.how != "tmpfs":
        pytest.skip("needs a real full disk (a mounted tmpfs): the file-size limit lets an empty run_dir through")
    (tmp_path / "model").mkdir()
    (tmp_path / "prompts").mkdir()  # present: the preflight checks they exist; the run_dir is refused first
    spec = tmp_path / "inf.yaml"
    spec.write_text(json.dumps({"kind": "infer", "run_dir": str(small_disk.path / "run"),
                                "infer": {"model": str(tmp_path / "model"), "prompts": str(tmp_path / "prompts")}}))
    small_disk.fill()
    p = subprocess.run([sys.executable, "-m", "hpcllm.cli", "infer", str(spec)], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert p.returncode == 8 and p.stderr == (f"hpcllm infer: error: run_dir '{small_disk.path / 'run'}' cannot be "
                                              "written (No space left on device): free some space, or choose another "
                                              "run_dir\n"), p.stderr
