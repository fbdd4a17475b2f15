"""The inference job: `hpcllm infer SPEC` over a sharded prompt dataset, on 1..N ranks.

Input shards are the units of work. With `schedule: dynamic` rank 0 runs a small coordinator thread
that hands out the next shard to whichever rank asks (load balancing); `static` gives shard i to
rank i % N. Each finished shard becomes `run_dir/outputs/out-NNNNN.h5` (written to a temporary name,
renamed), then a `.done` marker; a rerun or requeued job skips shards whose output and marker are
present, so retries are safe and the final outputs equal an uninterrupted run's. Rank 0 writes
`outputs/manifest.json` at the end.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import torch

from hpcllm.config import JobSpec
from hpcllm.data.prompts import PromptDataset, PromptShard, open_prompt_dataset
from hpcllm.atomic import atomic_open, atomic_path, write_json
from hpcllm.data.shards import ragged, sha256_file
from hpcllm.comm import Communicator
from hpcllm.errors import DataError, InferError
from hpcllm.infer.engine import Engine
from hpcllm.infer.sampling import SamplingParams

log = logging.getLogger("hpcllm.infer")
_REQ, _REP = 7301, 7302


# ------------------------------------------------------------------------------------ model


def load_model_for(spec: JobSpec, prompts: PromptDataset):
    """(model, tokenizer identity or None) — an hpcllm checkpoint or HF GPT-2 safetensors."""
    path = Path(spec.infer.model)
    if not spec.infer.model or not path.exists():
        raise InferError(f"infer.model '{spec.infer.model}' not found (an hpcllm run/checkpoint dir, or HF "
                         "GPT-2 model.safetensors / its directory)")
    is_hpcllm = (path / "checkpoints").is_dir() or (path / "meta.json").is_file()
    if is_hpcllm:
        from hpcllm.data.shards import read_manifest
        from hpcllm.checkpoint import load_trained_model

        model, cfg, dataset = load_trained_model(path)
        try:
            tok_id = read_manifest(dataset)["tokenizer"]
        except DataError:
            tok_id = None  # the training data moved: fall back to the vocabulary check below
    else:
        from hpcllm.model import load_hf_model

        model, cfg = load_hf_model(path)
        tok_id = None
    if tok_id is not None and tok_id != prompts.tokenizer_id:
        raise InferError(f"tokenizer mismatch: model {path} was trained with '{tok_id}', prompts {prompts.path} "
                         f"were tokenized with '{prompts.tokenizer_id}' — re-prepare the prompts with the model's tokenizer")
    if model.config.vocab_size != prompts.vocab_size:
        raise InferError(f"vocabulary mismatch: model {path} has {model.config.vocab_size} tokens, prompts "
                         f"{prompts.path} use a tokenizer of {prompts.vocab_size}")
    return model


# ------------------------------------------------------------------------------------ work queue


class ShardQueue:
    """Which shard to do next. Dynamic: ask rank 0's coordinator thread (MPI point-to-point on a
    private communicator); static: every size-th shard."""

    def __init__(self, comm: Communicator, todo: list[int], dynamic: bool):
        self.comm, self.todo = comm, todo
        self.mpi = getattr(comm, "comm", None) if dynamic and comm.size > 1 else None
        self._static = iter(todo[comm.rank :: comm.size]) if self.mpi is None else None
        if self.mpi is not None:
            self.mpi = self.mpi.Dup()
            if comm.rank == 0:
                self._thread = threading.Thread(target=self._serve, name="hpcllm-shard-queue", daemon=True)
                self._thread.start()

    def _serve(self) -> None:
        from mpi4py import MPI

        pending, finished = list(self.todo), 0
        status = MPI.Status()
        while finished < self.comm.size:
            self.mpi.recv(source=MPI.ANY_SOURCE, tag=_REQ, status=status)
            nxt = pending.pop(0) if pending else -1
            finished += nxt < 0
            self.mpi.send(nxt, dest=status.Get_source(), tag=_REP)

    def next(self) -> int | None:
        if self.mpi is None:
            return next(self._static, None)
        self.mpi.send(self.comm.rank, dest=0, tag=_REQ)
        nxt = self.mpi.recv(source=0, tag=_REP)
        return None if nxt < 0 else nxt

    def close(self) -> None:
        if self.mpi is not None and self.comm.rank == 0:
            self._thread.join()


# ------------------------------------------------------------------------------------ outputs


def out_name(shard: PromptShard) -> str:
    return f"out-{shard.index:05d}.h5"


def is_done(out_dir: Path, shard: PromptShard) -> bool:
    marker = out_dir / (out_name(shard) + ".done")
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
        f = out_dir / out_name(shard)
        return f.is_file() and f.stat().st_size == info["bytes"] and info["input_sha256"] == shard.sha256
    except (json.JSONDecodeError, KeyError, OSError):
        return False


def write_output(out_dir: Path, shard: PromptShard, ids: list[int], results: list, mode: str, texts: list[str] | None,
                 seconds: float) -> dict:
    import h5py

    path = out_dir / out_name(shard)
    with atomic_path(path) as tmp, h5py.File(tmp, "w", libver=("v110", "v110")) as f:
        f.create_dataset("ids", data=np.asarray(ids, dtype=np.int64), track_times=False)
        if mode == "generate":
            tokens, off = ragged([r.tokens for r in results], np.int64)
            f.create_dataset("tokens", data=tokens, track_times=False)
            f.create_dataset("offsets", data=off, track_times=False)
            f.create_dataset("text", data=texts, dtype=h5py.string_dtype("utf-8"), track_times=False)
            f.create_dataset("finish_reason", data=[r.finish_reason for r in results],
                             dtype=h5py.string_dtype("utf-8"), track_times=False)
            f.create_dataset("truncated", data=np.asarray([r.truncated for r in results], np.int64), track_times=False)
            if results and results[0].logprobs is not None:
                lp, _ = ragged([r.logprobs for r in results], np.float32)
                f.create_dataset("logprobs", data=lp, track_times=False)
        else:
            lp, off = ragged([r.token_logprobs for r in results], np.float32)
            f.create_dataset("token_logprobs", data=lp, track_times=False)
            f.create_dataset("offsets", data=off, track_times=False)
            f.create_dataset("logprob_sum", data=np.asarray([r.logprob_sum for r in results]), track_times=False)
            f.create_dataset("n_tokens", data=np.asarray([r.n_tokens for r in results], np.int64), track_times=False)
            f.create_dataset("perplexity", data=np.asarray([r.perplexity for r in results]), track_times=False)
        f.attrs["mode"], f.attrs["input_shard"], f.attrs["n_records"] = mode, shard.path.name, len(ids)
    info = dict(path=path.name, input=shard.path.name, input_sha256=shard.sha256, n_records=len(ids),
                bytes=path.stat().st_size, sha256=sha256_file(path), seconds=seconds)
    write_json(out_dir / (path.name + ".done"), info)
    return info


def cut_at_stop_strings(tokens: list[int], decode, stops: list[str]) -> tuple[list[int], str, bool]:
    """Shortest prefix of `tokens` whose text contains a stop string (the text is cut before it)."""
    text = decode(tokens)
    hits = [text.find(s) for s in stops if s and s in text]
    if not hits:
        return tokens, text, False
    cut = min(hits)
    for n in range(1, len(tokens) + 1):  # fewest tokens that reach the stop string
        if len(decode(tokens[:n])) >= cut + 1 and any(s in decode(tokens[:n]) for s in stops):
            return tokens[:n], text[:cut], True
    return tokens, text[:cut], True


# ------------------------------------------------------------------------------------ the job


def array_slot(ic) -> tuple[int, int]:
    """(task, tasks) of a job array, or (0, 1) for a plain job."""
    if ic.array_tasks > 1:
        return ic.array_task, ic.array_tasks
    env = os.environ
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        return int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"])
    return 0, 1


def run_infer(spec: JobSpec, comm: Communicator) -> dict:
    ic = spec.infer
    prompts = open_prompt_dataset(ic.prompts)
    if ic.mode == "score" and not prompts.manifest.get("has_continuations"):
        raise InferError(f"infer.mode=score needs continuations in {ic.prompts} (prepare with data.continuation_field)")
    out_dir = Path(spec.run_dir) / "outputs"
    if comm.rank == 0:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            probe = out_dir / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise InferError(f"output dir {out_dir} is not writable ({e.strerror})") from None
    comm.barrier()
    from hpcllm.data.tokenizer import load_tokenizer_file

    tok = load_tokenizer_file(prompts.path / prompts.manifest["tokenizer_file"])
    model = load_model_for(spec, prompts)
    device = comm.device
    dtype = torch.bfloat16 if (ic.dtype == "bf16" or (ic.dtype == "auto" and device.type == "cuda")) else torch.float32
    engine = Engine(model, device=device, dtype=dtype, max_batch_size=ic.batch_size, pad_id=tok.pad_id,
                    overflow=ic.overflow, use_cuda_graphs=ic.cuda_graphs)
    params = SamplingParams(max_new_tokens=ic.max_new_tokens, temperature=ic.temperature, top_k=ic.top_k,
                            top_p=ic.top_p, stop_token_ids=sorted(set(ic.stop_token_ids) | {tok.eos_id}), seed=ic.seed)
    # rank 0 decides what is left (of this array task's share), so every rank works from one list
    task, tasks = array_slot(ic)
    mine_idx = [i for i in range(len(prompts.shards)) if i % tasks == task]
    todo = comm.broadcast_object([i for i in mine_idx if not is_done(out_dir, prompts.shards[i])]
                                 if comm.rank == 0 else None)
    skipped = len(mine_idx) - len(todo)
    if comm.rank == 0 and skipped:
        log.info("resuming: %d of %d shards already done", skipped, len(mine_idx))
    total_records = sum(prompts.shards[i].n_records for i in todo)
    bar = None
    if comm.rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=total_records, unit="rec", desc=f"infer {ic.mode}", mininterval=1.0)
    queue = ShardQueue(comm, todo, ic.schedule == "dynamic")
    t0 = time.perf_counter()
    mine = {"records": 0, "new_tokens": 0, "shards": 0}
    try:
        while (i := queue.next()) is not None:
            shard = prompts.shards[i]
            rec = shard.load()
            ts = time.perf_counter()

            def progress(n, toks):
                mine["new_tokens"] += toks
                if bar is not None:
                    bar.update(n)

            if ic.mode == "generate":
                results: list = engine.generate(rec.prompts, rec.ids, params, return_logprobs=ic.return_logprobs,
                                                progress=progress)
                texts = []
                for r in results:
                    if ic.stop_strings:
                        r.tokens, text, hit = cut_at_stop_strings(r.tokens, tok.decode, ic.stop_strings)
                        if hit:
                            r.finish_reason = "stop"
                            if r.logprobs is not None:
                                r.logprobs = r.logprobs[: len(r.tokens)]
                    else:
                        text = tok.decode(r.tokens)
                    texts.append(text)
            else:
                results = engine.score(rec.prompts, rec.continuations, rec.ids)
                texts = None
                if bar is not None:
                    bar.update(len(results))
            write_output(out_dir, shard, rec.ids, results, ic.mode, texts, time.perf_counter() - ts)
            mine["records"] += len(results)
            mine["shards"] += 1
    finally:
        queue.close()
        if bar is not None:
            bar.close()
    totals = comm.allgather_object(mine)
    summary = {k: sum(t[k] for t in totals) for k in mine} | {"skipped_shards": skipped,
                                                              "seconds": time.perf_counter() - t0}
    comm.barrier()
    missing = [s.path.name for s in prompts.shards if not is_done(out_dir, s)]
    if comm.rank == 0 and missing:  # other array tasks still have shards to do
        log.info("array task %d/%d done; %d shard(s) left to other tasks, no output manifest yet", task, tasks,
                 len(missing))
    elif comm.rank == 0:
        entries = [json.loads((out_dir / (out_name(s) + ".done")).read_text()) for s in prompts.shards]
        write_json(out_dir / "manifest.json", dict(format="hpcllm-outputs", format_version=1, mode=ic.mode,
                                                          prompts=str(prompts.path), model=ic.model,
                                                          n_records=sum(e["n_records"] for e in entries),
                                                          shards=entries))
        rate = summary["new_tokens"] / max(summary["seconds"], 1e-9)
        log.info("infer %s done: %d records in %d shards (%d skipped as done) on %d rank(s), %.0f new tokens/s",
                 ic.mode, summary["records"], summary["shards"], skipped, comm.size, rate)
    return summary


def export_jsonl(run_dir: str | Path, out: str | Path) -> int:
    import h5py

    out_dir = Path(run_dir) / "outputs"
    man_path = out_dir / "manifest.json"
    if not man_path.is_file():
        raise InferError(f"{man_path}: missing — the inference run is not complete")
    man = json.loads(man_path.read_text())
    n = 0
    with atomic_open(out, "w") as fo:
        for e in man["shards"]:
            with h5py.File(out_dir / e["path"], "r") as f:
                ids, off = f["ids"][:], f["offsets"][:]
                for j, rid in enumerate(ids):
                    row = {"id": int(rid)}
                    if man["mode"] == "generate":
                        row["text"] = f["text"][j].decode() if isinstance(f["text"][j], bytes) else f["text"][j]
                        row["tokens"] = f["tokens"][off[j] : off[j + 1]].tolist()
                        fr = f["finish_reason"][j]
                        row["finish_reason"] = fr.decode() if isinstance(fr, bytes) else fr
                    else:
                        row["logprob_sum"] = float(f["logprob_sum"][j])
                        row["n_tokens"] = int(f["n_tokens"][j])
                        row["perplexity"] = float(f["perplexity"][j])
                        row["token_logprobs"] = f["token_logprobs"][off[j] : off[j + 1]].tolist()
                    fo.write(json.dumps(row) + "\n")
                    n += 1
    return n

