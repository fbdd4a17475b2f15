"""`hpcllm plan`'s pipeline bubble (hpcllm.parallel.estimate.pipeline_bubble) against PyTorch's own
schedules: each schedule's per-rank order of forwards and backwards — as torch.distributed.pipelining
computes it for the multi-stage schedules, as ScheduleGPipe's and Schedule1F1B's loops run it for
the others — is run on a clock (a forward takes 1, a backward `b`; a stage's forward waits for the
previous stage's, its backward for its forward and the next stage's backward), and the idle fraction
of the busiest rank's step must be the formula's, for every pp, stages per rank, micro-batch count
and backward/forward ratio tried. A schedule PyTorch changes, or a formula that is wrong, fails."""

import pytest
from torch.distributed.pipelining.schedules import ScheduleInterleaved1F1B, ScheduleLoopedBFS

from hpcllm.parallel.layout import interleaved_batches_ok
from hpcllm.parallel.estimate import pipeline_bubble


def _multi_stage_orders(cls, pp: int, v: int, m: int) -> dict[int, list]:
    """Each rank's actions, from the schedule's own computation (without building any stage)."""
    schedule = object.__new__(cls)
    schedule.pp_group_size, schedule._n_microbatches, schedule._stages = pp, m, [None] * v
    schedule.n_local_stages, schedule.rank = v, 0
    schedule.number_of_rounds = max(1, m // pp)
    schedule.microbatches_per_round = m // schedule.number_of_rounds
    schedule.stage_index_to_group_rank = {s: s % pp for s in range(pp * v)}
    return {r: [(a.stage_index, a.computation_type.name, a.microbatch_index)
                for a in schedule._calculate_single_rank_operations(r) if a is not None] for r in range(pp)}


def _single_stage_orders(one_f_one_b: bool, pp: int, m: int) -> dict[int, list]:
    """GPipe: every forward, then every backward; 1F1B: pp - r forwards, then one of each in turn
    (what ScheduleGPipe and Schedule1F1B run on rank r)."""
    orders = {}
    for r in range(pp):
        if not one_f_one_b:
            orders[r] = [(r, "FORWARD", i) for i in range(m)] + [(r, "FULL_BACKWARD", i) for i in range(m)]
            continue
        warm = min(m, pp - r)
        acts = [(r, "FORWARD", i) for i in range(warm)]
        for i in range(m):
            acts.append((r, "FULL_BACKWARD", i))
            if warm + i < m:
                acts.append((r, "FORWARD", warm + i))
        orders[r] = acts
    return orders


def _bubble(orders: dict[int, list], n_stages: int, backward: float) -> float:
    done: dict[tuple, float] = {}
    clock, nxt = dict.fromkeys(orders, 0.0), dict.fromkeys(orders, 0)
    moved = True
    while moved:
        moved = False
        for r, acts in orders.items():
            while nxt[r] < len(acts):
                stage, kind, mb = acts[nxt[r]]
                if kind == "FORWARD":
                    needs, took = ([("F", stage - 1, mb)] if stage else []), 1.0
                else:
                    needs, took = [("F", stage, mb)] + ([("B", stage + 1, mb)] if stage < n_stages - 1 else []), backward
                if any(d not in done for d in needs):
                    break
                clock[r] = max([clock[r]] + [done[d] for d in needs]) + took
                done[("F" if kind == "FORWARD" else "B", stage, mb)] = clock[r]
                nxt[r] += 1
                moved = True
    assert all(nxt[r] == len(acts) for r, acts in orders.items()), "the orders deadlock"
    busy = sum(1 + backward for acts in orders.values() for (_, kind, _) in acts if kind == "FORWARD") / len(orders)
    return 1 - busy / max(clock.values())


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved1f1b", "loopedbfs"])
def test_the_plan_bubble_is_pytorch_schedules(schedule):
    checked = 0
    for pp in range(2, 7):
        for v in ((1,) if schedule in ("gpipe", "1f1b") else (2, 3)):
            for m in range(1, 17):
                if schedule == "1f1b" and m < pp or schedule == "interleaved1f1b" and not interleaved_batches_ok(m, pp):
                    continue  # refused at config time
                if schedule in ("gpipe", "1f1b"):
                    orders = _single_stage_orders(schedule == "1f1b", pp, m)
                else:
                    cls = ScheduleLoopedBFS if schedule == "loopedbfs" else ScheduleInterleaved1F1B
                    orders = _multi_stage_orders(cls, pp, v, m)
                for backward in (1.0, 2.0, 3.0):
                    got = _bubble(orders, pp * v, backward)
                    assert got == pytest.approx(pipeline_bubble(pp, m, v), abs=1e-9), (schedule, pp, v, m, backward)
                    checked += 1
    assert checked > 100
