"""In-job restart: after a training or inference step (srun) failed, decide whether and where it runs again.

The batch script's `srun` function (hpcllm.launch.script.SRUN_PASSING_SIGNALS, in both submit paths)
calls this module when slurm.max_restarts > 0; the job was submitted with `--no-kill`, so Slurm
keeps the allocation when one of its nodes fails:

    python -m hpcllm.launch.recover SPEC plan
        the first step's srun options: the first slurm.nodes nodes of the allocation (the others are
        spares: slurm.spare_nodes)
    python -m hpcllm.launch.recover SPEC next --status S --log SRUN_STDERR --launched T0 --ended T1 -- SRUN_OPTIONS
        after a failed step: read the cause, exclude the bad node(s), take spares or shrink the world,
        append an `in_job_restart` record to run_dir/provenance.jsonl and print the next srun options;
        exit 1 with one line on stderr when the job must not restart here (the batch script then goes
        on to hpcllm.launch.finish: fail, or requeue a checkpointed job, as without restarts)

Output (stdout, one value a line, for `mapfile`: nothing is evaluated by the shell): the in-job
restart number, then the srun options (--nodes=, --ntasks=, --ntasks-per-node=, --nodelist=).

Causes, in order of trust:
  hung      the watchdog named ranks that did not arrive at a collective (its records in
            run_dir/logs/faults.jsonl, HPCLLM_FAULT_FILE); rank r of the step ran on node r // tasks_per_node
  lost      a node of the step is DOWN, DRAINED, FAILED or NOT_RESPONDING, or left the allocation
  killed    srun says a task died of a signal (`srun: error: n2: task 1: Killed`): its node
  launch    the step did not launch (`... launch failed ...`): the nodes it names, else the same nodes again
A step that failed for another reason (a bad spec, data or checkpoint: the first rank to end exited
with an hpcllm status other than a peer's 1, 3 or 4) is not restarted: it would fail again. Neither is a step that stopped on a signal to checkpoint (exit 85: requeue).

A spare replaces each excluded node while there are spares: the world size and the numerics stay
the same (resume from the last checkpoint, bitwise). Without one the world shrinks: a training
spec needs train.global_batch_size (the elastic resume keeps the global batch), else it is refused.
This module imports no torch: it runs in the batch shell between two steps.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from hpcllm.errors import EXIT_REQUEUE, ConfigError, HpcllmError

FAULT_FILE = "faults.jsonl"  # under run_dir/logs: the watchdog's machine-readable reports
NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
BAD_NODE_STATES = ("DOWN", "DRAIN", "FAIL", "NOT_RESPONDING", "POWER", "REBOOT")
# `srun: error: n2: task 1: Killed`, `srun: error: n1: tasks 0-1: Segmentation fault (core dumped)`
_TASK_DIED = re.compile(r"^srun: error: (\S+): tasks? [0-9,\-]+: (?!Exited with exit code)(.+)$")
_TASK_EXITED = re.compile(r"^srun: error: (\S+): tasks? [0-9,\-]+: Exited with exit code (\d+)")
# a rank's own exit after a peer died or hung: the watchdog's (4), a broken connection (3), or an
# unclassified error raised by the communication library (1); any other hpcllm status is the
# program's own failure (a bad spec, data or checkpoint), which a restart would only repeat
_PEER_EXITS = {1, 3, 4}
_LAUNCH_FAILED = re.compile(r"launch failed|Unable to launch|failed on node (\S+?)[:\s]")
_NODE_FAILURE = re.compile(r"^srun: error: Node failure on (\S+)")


class NoRestart(HpcllmError):
    """The step is not restarted inside the job (the message says why)."""


def node_name(name: str) -> str:
    if not NODE_NAME.match(name):
        raise NoRestart(f"node name {name!r} from Slurm is not a plain host name: not passing it to srun")
    return name


def scontrol(*args: str) -> str:
    try:
        p = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NoRestart(f"scontrol {' '.join(args)} failed ({e})") from None
    if p.returncode != 0:
        raise NoRestart(f"scontrol {' '.join(args)} failed: {p.stderr.strip()}")
    return p.stdout


def expand(nodelist: str) -> list[str]:
    """n[1-3],m1 -> [n1, n2, n3, m1], in Slurm's order."""
    if not nodelist or nodelist == "(null)":
        return []
    return [node_name(n) for n in scontrol("show", "hostnames", nodelist).split()]


def _fields(text: str) -> dict:
    return dict(tok.split("=", 1) for tok in text.split() if "=" in tok)


def allocation(job: str) -> list[str]:
    """The job's nodes as slurmctld has them now (a node lost under --no-kill leaves the list)."""
    return expand(_fields(scontrol("show", "job", "-o", job)).get("NodeList", ""))


def node_state(node: str) -> str:
    try:
        return _fields(scontrol("show", "node", "-o", node)).get("State", "UNKNOWN")
    except NoRestart:
        return "UNKNOWN"


def is_bad(state: str) -> bool:
    """A node state no step should run on (DOWN, DRAINED, NOT_RESPONDING, ...; with flags: IDLE+DRAIN)."""
    return any(s in state for s in BAD_NODE_STATES)


def plan_nodes(spec, alloc: list[str]) -> list[str]:
    want = spec.slurm.nodes
    if len(alloc) < want:
        raise NoRestart(f"the allocation has {len(alloc)} node(s) ({','.join(alloc)}), slurm.nodes is {want}")
    return alloc[:want]


def srun_options(nodes: list[str], tasks_per_node: int) -> list[str]:
    return [f"--nodes={len(nodes)}", f"--ntasks={len(nodes) * tasks_per_node}",
            f"--ntasks-per-node={tasks_per_node}", f"--nodelist={','.join(nodes)}"]


def nodes_of(options: list[str]) -> list[str]:
    for opt in options:
        if opt.startswith("--nodelist="):
            return [node_name(n) for n in opt.split("=", 1)[1].split(",") if n]
    raise NoRestart(f"no --nodelist= among the step's srun options {options}")


# ------------------------------------------------------------------------------------ the cause


def watchdog_reports(run_dir: str, job: str, since: float) -> list[dict]:
    path = Path(run_dir) / "logs" / FAULT_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a torn line of a rank killed while writing: the others say the same
        if isinstance(rec, dict) and str(rec.get("job")) == job and rec.get("time", 0) >= since:
            out.append(rec)
    return out


def find_cause(run_dir: str, job: str, nodes: list[str], tasks_per_node: int, srun_log: str,
               launched: float) -> tuple[str, list[str], str, float | None] | None:
    """(cause, bad nodes, why, when it was detected if not at the step's end) of the failed step on
    `nodes`, or None when nothing points at a node."""
    lines = srun_log.splitlines()
    first_end = next((line.strip() for line in lines if _TASK_EXITED.match(line.strip())
                      or _TASK_DIED.match(line.strip()) or _NODE_FAILURE.match(line)), "")
    m = _TASK_EXITED.match(first_end)
    if m and int(m[2]) not in _PEER_EXITS:  # before the watchdog: its peers then waited for a rank that had left
        from hpcllm.launch.finish import meaning

        raise NoRestart(f"the first rank to end, on {m[1]}, exited with status {m[2]} ({meaning(int(m[2]))}): the "
                        "program failed, not a node; a restart would fail the same way")
    # hung: ranks the watchdog named (no answer), or a rank that said it was stuck on its own
    hung: set[int] = set()
    reports = watchdog_reports(run_dir, job, launched)
    for rec in reports:
        hung.update(int(r) for r in rec.get("missing") or [])
        hung.update(int(r) for r in rec.get("stuck") or [])
    hung = {r for r in hung if 0 <= r < len(nodes) * tasks_per_node}
    if hung:
        bad = sorted({nodes[r // tasks_per_node] for r in hung}, key=nodes.index)
        return "hung", bad, (f"rank(s) {', '.join(map(str, sorted(hung)))} did not arrive at a collective "
                             f"(hung or dead: named by the watchdog) on {', '.join(bad)}"), min(r["time"] for r in reports)
    alloc = set(allocation(job))
    state = {n: node_state(n) for n in nodes}
    lost = [n for n in nodes if n not in alloc or is_bad(state[n])]
    for line in lines:
        m = _NODE_FAILURE.match(line)
        if m and m[1] in nodes and m[1] not in lost:
            lost.append(m[1])
    if lost:
        states = ", ".join(f"{n} {state[n]}" + ("" if n in alloc else " (left the allocation)") for n in lost)
        return "lost", lost, f"node(s) lost: {states}", None
    for line in lines:  # the first task that died of a signal: the ones after it were taken down with it
        m = _TASK_DIED.match(line.strip())
        if m and m[1] in nodes:
            return "killed", [m[1]], f"a rank on {m[1]} died: {m[2].strip()}", None
    launch = [line for line in lines if line.startswith("srun: error:") and _LAUNCH_FAILED.search(line)]
    if launch:
        named = [n for n in nodes if any(re.search(rf"\b{re.escape(n)}\b", line) for line in launch)]
        return "launch", named, f"the step did not launch ({launch[0].removeprefix('srun: error: ').strip()})", None
    return None


# ------------------------------------------------------------------------------------ the decision


def _records(run_dir: str, job: str, requeue: str) -> list[dict]:
    from hpcllm.provenance import FILE, read_records

    if not (Path(run_dir) / FILE).is_file():
        return []
    return [r for r in read_records(run_dir)[0] if r["event"] == "in_job_restart" and str(r.get("job")) == job
            and str(r.get("requeue") or 0) == requeue]


def check_world(spec, ranks: int) -> None:
    """The spec can run on `ranks` ranks (training: with its global batch kept), or NoRestart says why not."""
    t, pc = spec.train, spec.parallel
    if spec.kind != "train":  # inference: the shards left are shared by the ranks left
        if ranks % max(1, pc.tp):
            raise NoRestart(f"{ranks} rank(s) do not divide into parallel.tp={pc.tp}")
        return
    if not t.global_batch_size:
        raise NoRestart(f"no spare node left and train.global_batch_size is not set: on {ranks} rank(s) the global "
                        "batch would change and the run would not continue as one uninterrupted run; set "
                        "train.global_batch_size (or slurm.spare_nodes)")
    model_parallel = max(1, pc.tp) * max(1, pc.pp)
    if ranks % model_parallel:
        raise NoRestart(f"{ranks} rank(s) do not divide into parallel.tp x parallel.pp = {model_parallel}")
    try:
        t.accumulation(ranks // model_parallel)
    except ValueError as e:
        raise NoRestart(f"cannot train on {ranks} rank(s): {e}") from None


def decide(spec, job: str, requeue: str, status: int, options: list[str], srun_log: str, launched: float,
           ended: float) -> tuple[int, list[str], dict]:
    """(the restart's number, its srun options, its provenance record), or NoRestart."""
    s = spec.slurm
    if status == 0:
        raise NoRestart("the step exited 0")
    if status == EXIT_REQUEUE:
        raise NoRestart("the ranks checkpointed on a stop request (exit 85): the job requeues as usual")
    from hpcllm.launch.finish import controller_state

    state = controller_state(job)
    if state not in (None, "RUNNING"):  # scancel, scontrol requeue, the time limit: Slurm's decision stands
        raise NoRestart(f"the job is {state}: Slurm is ending it")
    done = _records(spec.run_dir, job, requeue)
    if len(done) >= s.max_restarts:
        raise NoRestart(f"{len(done)} in-job restart(s) done, slurm.max_restarts={s.max_restarts}")
    nodes = nodes_of(options)
    found = find_cause(spec.run_dir, job, nodes, s.tasks_per_node, srun_log, launched)
    if found is None:
        raise NoRestart(f"the step exited {status} and neither the watchdog, nor the nodes' states, nor srun name "
                        "a lost node, a killed or a hung rank: a restart would fail the same way")
    cause, bad, why, detected = found
    excluded = sorted({n for r in done for n in r.get("excluded", [])} | set(bad))
    alloc = allocation(job)
    keep = [n for n in nodes if n not in bad]
    spares = [n for n in alloc if n not in nodes and n not in excluded and not is_bad(node_state(n))]
    taken = spares[: len(bad)]
    new = [n for n in alloc if n in keep or n in taken]  # in Slurm's order: rank r on node r // tasks_per_node
    if not new:
        raise NoRestart(f"{why}; no node left to restart on")
    if len(new) < s.nodes:
        check_world(spec, len(new) * s.tasks_per_node)
    decided = time.time()
    record = {"event": "in_job_restart", "job": job, "requeue": int(requeue), "restart": len(done) + 1,
              "cause": cause, "why": why, "excluded": bad, "spares_taken": taken, "nodes": new,
              "world_size": len(new) * s.tasks_per_node, "previous_world_size": len(nodes) * s.tasks_per_node,
              "status": status, "step_launched": launched, "detected": detected or ended, "step_ended": ended,
              "time": decided}
    return len(done) + 1, srun_options(new, s.tasks_per_node), record


def plan(spec_path: str, job: str) -> int:
    """The first step's options. Outside a job (the script run by hand) or when the allocation cannot
    be read, none: the step runs on the whole allocation, as without restarts — unless spares would
    then train too, which changes the world size: that fails the job, in one line."""
    from hpcllm.config import load_spec

    try:
        spec = load_spec(spec_path)
    except ConfigError as e:
        print(f"hpcllm: job {job or '(not under Slurm)'}: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    print(0)
    if not job.isdigit():
        return 0
    try:
        print("\n".join(srun_options(plan_nodes(spec, allocation(job)), spec.slurm.tasks_per_node)))
    except NoRestart as e:
        if spec.slurm.spare_nodes:
            print(f"hpcllm: job {job}: cannot leave the spare node(s) out of the step: {e}", file=sys.stderr, flush=True)
            return 1
        print(f"hpcllm: job {job}: the step runs on the whole allocation ({e}); a failed step will not be restarted",
              file=sys.stderr, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    from hpcllm.config import load_spec

    p = argparse.ArgumentParser(prog="python -m hpcllm.launch.recover", description=__doc__.split("\n")[0])
    p.add_argument("spec")
    p.add_argument("what", choices=["plan", "next"])
    p.add_argument("--status", type=int, default=0)
    p.add_argument("--log", default="", help="the failed step's srun stderr")
    p.add_argument("--launched", type=float, default=0.0)
    p.add_argument("--ended", type=float, default=0.0)
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)  # the step's srun options follow `--`
    args = p.parse_args(argv[:cut])
    args.options = argv[cut + 1:]
    job = os.environ.get("SLURM_JOB_ID", "")
    requeue = os.environ.get("SLURM_RESTART_COUNT") or "0"
    if args.what == "plan":
        return plan(args.spec, job)
    try:
        if not job.isdigit():
            raise NoRestart("not inside a Slurm job (SLURM_JOB_ID)")
        spec = load_spec(args.spec)
        log = Path(args.log).read_text(errors="replace") if args.log else ""
        restart, options, record = decide(spec, job, requeue, args.status, args.options, log, args.launched,
                                          args.ended)
    except (NoRestart, ConfigError, OSError) as e:
        print(f"hpcllm: job {job or '(not under Slurm)'}: no in-job restart: {e}", file=sys.stderr, flush=True)
        return 1
    from hpcllm.provenance import append

    append(spec.run_dir, record)
    print(f"hpcllm: job {job}: in-job restart {restart} of {spec.slurm.max_restarts}: {record['why']}; excluding "
          f"{', '.join(record['excluded']) or 'no node'}"
          + (f", spare(s) {', '.join(record['spares_taken'])} taken" if record["spares_taken"] else "")
          + f"; {record['world_size']} rank(s) on {', '.join(record['nodes'])}", file=sys.stderr, flush=True)
    print(restart)
    print("\n".join(options))
    return 0


if __name__ == "__main__":
    sys.exit(main())
