"""Stragglers: a rank persistently slower than its peers, named with its node while the job runs.

A synchronous data-parallel step makes every rank's total step time equal — the fast ranks wait for
the slow one in the gradient allreduce — so the figure compared is each rank's *busy* time: the
seconds it spent loading its batches and in forward/backward (TrainStep's t_data + t_compute),
before it waits for its peers. The trainer gathers it from every rank at each log line (one
allgather, together with the CPU times it already gathered there: no per-step collective) and
hands the figures to `StragglerWatch.check` on every rank; rank 0 logs.

    slow       a rank's busy seconds per step exceed the median of its peers' (the other ranks) by
               more than train.stragglers.threshold (0.2: 20%). The peers' median, not every rank's:
               with 2 ranks the median of both is their mean, which a slow rank drags up with it.
    named      once it has been slow in consecutive log windows covering at least
               train.stragglers.steps steps: one warning per episode, with its rank and host, and a
               `stragglers` entry in that metrics.jsonl record (which `hpcllm report` lists)
    episode    ends at the first window in which the rank is not slow (logged, and recorded as
               `stragglers_recovered`); a later slow spell is a new episode, named again

Under FSDP2 (parallel.shard full), tensor and pipeline parallelism the collectives run inside
forward and backward, so a slow rank's peers wait there too and their busy time grows with it: the
comparison then sees less of the difference (data parallel and ZeRO-1 wait after backward only).

Test hook: HPCLLM_TEST_SLOW_RANK=R:SECONDS makes rank R (every rank: `*`) sleep SECONDS inside each
step's compute (`injected_delay`, read once in TrainStep) — how the tests make a straggler without a
second machine, and slow a job down without burning CPU (a signal must land mid-run).
"""

from __future__ import annotations

import logging
import os
import socket
import statistics
from dataclasses import dataclass

from hpcllm.errors import ConfigError

log = logging.getLogger("hpcllm.train")

TEST_SLOW_RANK = "HPCLLM_TEST_SLOW_RANK"


def injected_delay(rank: int) -> float:
    """Seconds this rank sleeps in each step's compute under the test hook HPCLLM_TEST_SLOW_RANK=R:S
    (R a rank or `*` for all; 0 when unset or for another rank). A value that does not read as R:S is
    an error naming it."""
    value = os.environ.get(TEST_SLOW_RANK, "").strip()
    if not value:
        return 0.0
    try:
        r, s = value.split(":")
        slow_rank, seconds = (None if r == "*" else int(r)), float(s)
    except ValueError:
        raise ConfigError(f"{TEST_SLOW_RANK}={value!r}: expected RANK:SECONDS or *:SECONDS, e.g. 1:0.05") from None
    return seconds if slow_rank in (None, rank) else 0.0


@dataclass
class RankTimes:
    """What each rank reports at a log line (one allgather of these)."""

    cpu_s: float  # the process's CPU seconds so far (metrics.jsonl's cpu_s_ranks)
    busy_s: float  # seconds in data loading and forward/backward over the log window
    host: str


def gather(comm, cpu_s: float, busy_s: float) -> list[RankTimes]:
    """Every rank's RankTimes, in rank order: a collective (every rank, at each log line)."""
    return [RankTimes(*t) for t in comm.allgather_object((cpu_s, busy_s, socket.gethostname()))]


class StragglerWatch:
    """Per-rank persistence of slowness over log windows (pure Python: no communication)."""

    def __init__(self, threshold: float = 0.2, steps: int = 50, leader: bool = True):
        self.threshold, self.steps, self.leader = threshold, steps, leader
        self.slow_steps: dict[int, int] = {}  # rank -> steps slow in consecutive windows so far
        self.since: dict[int, int] = {}  # rank -> first step of its current slow spell
        self.named: set[int] = set()  # ranks in a named episode

    def update(self, step: int, window_steps: int, busy_s: list[float], hosts: list[str] | None = None) -> dict:
        """The figures of one log window (ending at `step`, `window_steps` steps timed by this start;
        busy seconds per rank over it): returns {"stragglers": [...newly named...],
        "stragglers_recovered": [...]} with the keys that have entries (empty: nothing new)."""
        hosts = hosts or [None] * len(busy_s)
        out: dict[str, list] = {}
        if len(busy_s) < 2 or window_steps < 1:
            return out
        per_step = [b / window_steps for b in busy_s]
        for rank, mine in enumerate(per_step):
            peers = statistics.median(per_step[:rank] + per_step[rank + 1:])
            if peers > 0 and mine > peers * (1 + self.threshold):
                if rank not in self.slow_steps:
                    self.slow_steps[rank], self.since[rank] = 0, step - window_steps + 1
                self.slow_steps[rank] += window_steps
                if self.slow_steps[rank] >= self.steps and rank not in self.named:
                    self.named.add(rank)
                    out.setdefault("stragglers", []).append(dict(
                        rank=rank, host=hosts[rank], busy_s_per_step=mine, peers_median_s_per_step=peers,
                        over=mine / peers - 1, since_step=self.since[rank], slow_steps=self.slow_steps[rank]))
            else:
                self.slow_steps.pop(rank, None)
                since = self.since.pop(rank, None)
                if rank in self.named:
                    self.named.discard(rank)
                    out.setdefault("stragglers_recovered", []).append(dict(rank=rank, host=hosts[rank],
                                                                           since_step=since, at_step=step))
        if self.leader:
            for s in out.get("stragglers", []):
                log.warning("straggler: rank %d on %s has been slow for %d steps (since step %d): busy %.4f s/step, "
                            "%.0f%% over its peers' median %.4f s/step", s["rank"], s["host"] or "?", s["slow_steps"],
                            s["since_step"], s["busy_s_per_step"], 100 * s["over"], s["peers_median_s_per_step"])
            for s in out.get("stragglers_recovered", []):
                log.info("straggler: rank %d on %s is no longer slow at step %d", s["rank"], s["host"] or "?",
                         s["at_step"])
        return out

    def check(self, step: int, window_steps: int, ranks: list[RankTimes]) -> dict:
        """`update` with the gathered figures; returns the metrics.jsonl fields of this log line: each
        rank's busy seconds over the window (`busy_s_ranks`) and any straggler news."""
        busy = [r.busy_s for r in ranks]
        return dict(busy_s_ranks=busy, **self.update(step, window_steps, busy, [r.host for r in ranks]))


def named_in(records: list[dict]) -> list[dict]:
    """The straggler episodes named in metrics.jsonl records (one start's), each with the step at
    which it was named and, when it ended, the step it ended."""
    episodes = []
    for rec in records:
        for s in rec.get("stragglers") or []:
            episodes.append(dict(s, named_at_step=rec.get("step"), recovered_at_step=None))
        for s in rec.get("stragglers_recovered") or []:
            for e in reversed(episodes):
                if e["rank"] == s["rank"] and e["recovered_at_step"] is None:
                    e["recovered_at_step"] = s.get("at_step")
                    break
    return episodes


def describe(e: dict) -> str:
    """One line for `hpcllm report`."""
    until = f", until step {e['recovered_at_step']}" if e.get("recovered_at_step") is not None else \
        ", still slow at its last log line"
    return (f"straggler: rank {e['rank']} on {e.get('host') or '?'} named at step {e.get('named_at_step')} (slow "
            f"since step {e.get('since_step')}{until}): busy {e['busy_s_per_step']:.4f} s/step, {e['over']:.0%} over "
            f"its peers' median {e['peers_median_s_per_step']:.4f} s/step")
