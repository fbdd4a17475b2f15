"""Job kinds: one home each for what `prepare`, `train` and `infer` mean as jobs.

This module is the registry — the one list of kinds, and nothing else, so that the job spec
(hpcllm.config) can type its `kind` by it without importing what a kind is. A kind (hpcllm.jobs.kind.
JobKind, defined in hpcllm/jobs/<kind>.py) says which job-spec keys it reads as inputs (checked by
the preflight and before submit) and which paths it writes (so that a chain may read what an earlier
job of it writes), which sbatch template renders it, how its work is split over a job array, whether
a stopped run is requeued, what runs on every rank, and when its work is complete. The CLI, `hpcllm
render`, `hpcllm submit`, `hpcllm debug` and the batch script's last word (hpcllm.launch.finish) ask
the registry and never name a kind themselves; adding a kind is one module and one name in KindName.

    kind = get_kind(spec.kind)      # hpcllm.jobs.kind
    code = kind.run(spec)           # on every rank: join the others, do the work, leave
    why = kind.incomplete(spec)     # after the step, in the batch script: None when the work is done
"""

from __future__ import annotations

from typing import Literal, get_args

# The one list of job kinds: the type of a job spec's `kind` (hpcllm.config.JobSpec), so that the spec
# loader checks it like any other typed key (a mistyped kind gets its "did you mean"). Each kind is
# the module hpcllm.jobs.<kind>, defining KIND, imported on first use: `hpcllm config` stays free of torch.
KindName = Literal["prepare", "train", "infer"]

MODULES = {name: f"hpcllm.jobs.{name}" for name in get_args(KindName)}


def kind_names() -> tuple[str, ...]:
    return tuple(MODULES)
