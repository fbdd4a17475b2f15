"""The inference job: `hpcllm infer SPEC` over a sharded prompt dataset, on 1..N ranks.

Input shards are the units of work, handed out by hpcllm.infer.schedule (`dynamic`: to whichever
rank is free; `static`: shard i to rank i % N). Each shard is checked against the prompt manifest's
checksum before it is used, and becomes `run_dir/outputs/out-NNNNN.h5` plus a `.done` marker
recording the settings that made it (hpcllm.infer.outputs). A rerun or requeued job skips the
shards that are done with the same settings and still intact, and refuses outputs made with other
settings; rank 0 writes `outputs/manifest.json` last. On any error no rank waits for its peers: the
error goes up to the CLI, which reports it and ends every rank.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from functools import partial
from pathlib import Path

import torch

from hpcllm import monitor
from hpcllm.comm import Communicator
from hpcllm.config import JobSpec
from hpcllm.data.prompts import PromptDataset, open_prompt_dataset
from hpcllm.errors import ConfigError, DataError, IncompleteError, InferError
from hpcllm.infer.config import array_slot
from hpcllm.infer.engine import Engine
from hpcllm.infer.outputs import (MANIFEST, done_and_intact, fingerprint, is_marked_done, mark_begun, marker_path,
                                  refuse_other_settings, remove_outputs, write_manifest, write_output)
from hpcllm.infer.quantize import check_supported, load_quantized
from hpcllm.infer.sampling import SamplingParams
from hpcllm.infer.schedule import make_queue

log = logging.getLogger("hpcllm.infer")


# ------------------------------------------------------------------------------------ model


def load_model_for(spec: JobSpec, prompts: PromptDataset, device: torch.device | str = "cpu"):
    """(model, extra stop ids): an hpcllm checkpoint, or an HF model directory (any family its
    config.json names; its generation_config.json's eos ids stop a row too). With infer.quantize
    the weights are quantized as they stream in (hpcllm.infer.quantize), int4 packed for `device`."""
    scheme = spec.infer.quantize
    path = Path(spec.infer.model)
    if not spec.infer.model or not path.exists():
        raise InferError(f"infer.model '{spec.infer.model}' not found (an hpcllm run/checkpoint dir, or an HF "
                         "model directory / a model.safetensors inside one)")
    is_hpcllm = (path / "checkpoints").is_dir() or (path / "meta.json").is_file()
    if is_hpcllm:
        from hpcllm.data.shards import read_manifest
        from hpcllm.checkpoint import load_trained_model, stream_checkpoint, trained_model_on_meta

        if scheme == "none":
            model, cfg, dataset = load_trained_model(path)
        else:
            model, cfg, dataset, ckpt = trained_model_on_meta(path)
            model = load_quantized(model, scheme, device, partial(stream_checkpoint, ckpt))
        try:
            tok_id = read_manifest(dataset)["tokenizer"]
        except DataError:
            tok_id = None  # the training data moved: fall back to the vocabulary check below
        if tok_id is not None and tok_id != prompts.tokenizer_id:
            raise InferError(f"tokenizer mismatch: model {path} was trained with '{tok_id}', prompts {prompts.path} "
                             f"were tokenized with '{prompts.tokenizer_id}' — re-prepare the prompts with the model's "
                             "tokenizer")
        extra_stops: list[int] = []
    else:
        from hpcllm.data.tokenizer import check_model_tokenizer, tokenizer_identity_of
        from hpcllm.model import load_hf_model
        from hpcllm.model.fit import check_fits
        from hpcllm.model.hf import generation_eos, hf_model_on_meta, model_dir, read_config, stream_hf_weights

        d = model_dir(path)
        check_model_tokenizer(d, prompts.tokenizer_id, prompts.path)
        tok_id = tokenizer_identity_of(d)
        # every rank reads the whole model in fp32 on the CPU first (a tp plan cuts it afterwards);
        # quantized, at least 1 or 1/2 byte a parameter (embeddings and norms stay fp32)
        check_fits(read_config(d)[1], bytes_per_param={"none": 4, "int8": 1, "int4": 0.5}[scheme], device="cpu",
                   source=f"{d}/config.json")
        if scheme == "none":
            model, cfg = load_hf_model(path)
        else:
            model, cfg = hf_model_on_meta(path)
            model = load_quantized(model, scheme, device, partial(stream_hf_weights, path))
        extra_stops = [t for t in generation_eos(d) if 0 <= t < prompts.vocab_size]
    n = model.config.vocab_size
    # the same tokenizer may have fewer tokens than the embedding (rows padded to a multiple of 64 or
    # 128, as Llama and Qwen ship): more is an error; with no tokenizer identity to compare, equal
    if prompts.vocab_size > n or (tok_id is None and prompts.vocab_size != n):
        where = f"{model_dir_of(path)}/config.json vocab_size={n}" if not is_hpcllm else f"model {path} has {n} tokens"
        raise InferError(f"vocabulary mismatch: {where}, but the prompts' tokenizer "
                         f"{prompts.path / prompts.tokenizer_file} has {prompts.vocab_size}")
    return model, extra_stops


def model_dir_of(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 of the weights as loaded (names, dtypes, shapes, bytes; a tied tensor once): the same
    for an HF file and an hpcllm checkpoint of the same weights, and it changes when a run dir's
    latest checkpoint does."""
    h, seen = hashlib.sha256(), set()
    for name, t in sorted(model.state_dict().items()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


# ------------------------------------------------------------------------------------ text


def output_text(tokens: list[int], stopped: bool, decode_bytes, stops: list[bytes]) -> tuple[list[int], bytes, bool]:
    """(tokens, text, cut): the text of a row's new tokens as bytes, without the stop token that
    ended the row and cut before the first stop string; the tokens then end where the stop string
    is complete."""
    body = tokens[:-1] if stopped else tokens
    text = decode_bytes(body)
    hits = [text.find(s) for s in stops if s in text]
    if not hits:
        return tokens, text, False
    cut = min(hits)
    for n in range(1, len(body) + 1):  # fewest tokens whose text holds a stop string
        if any(s in decode_bytes(body[:n]) for s in stops):
            return body[:n], text[:cut], True
    return body, text[:cut], True


def stop_string_check(stops: list[bytes], decode_bytes):
    """For the engine's `stop_when`: whether a row's text holds a stop string. The text of its last
    few tokens is searched first (a stop string of n bytes completed by the last token lies within
    its last n tokens), the whole text only when that finds one — so a tokenizer whose decoded
    slices differ from the whole (a dropped leading space) never ends a row early by mistake."""
    if not stops:
        return None
    span = max(len(s) for s in stops) + 1

    def stopped(tokens: list[int]) -> bool:
        tail = decode_bytes(tokens[-span:])
        return any(s in tail for s in stops) and any(s in decode_bytes(tokens) for s in stops)

    return stopped


# ------------------------------------------------------------------------------------ the job


def check_stop_tokens(ic, prompts: PromptDataset) -> None:
    for i, t in enumerate(ic.stop_token_ids):
        if t >= prompts.vocab_size:
            raise ConfigError(f"infer.stop_token_ids[{i}] = {t} is outside the vocabulary of {prompts.vocab_size} "
                              f"tokens ({prompts.tokenizer_id}, the tokenizer of {prompts.path})")


def prepare_out_dir(out_dir: Path, fp: dict, force: bool) -> None:
    """Rank 0: the output dir exists and is writable; outputs of other settings are refused (or, with
    --force, removed); the manifest goes, to come back when every shard is done."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise InferError(f"output dir {out_dir} is not writable ({e.strerror or e})") from None
    if force:
        n = remove_outputs(out_dir)
        if n:
            log.info("--force: removed %d output shard(s) of an earlier run", n)
    refuse_other_settings(out_dir, fp)
    (out_dir / MANIFEST).unlink(missing_ok=True)


def run_infer(spec: JobSpec, comm: Communicator, force: bool = False, start_id: str | None = None) -> dict:
    """Generate or score this job's (this array task's) prompt shards; `start_id`: the job start's id
    (hpcllm.provenance), which the shards' markers and the live metrics name."""
    ic = spec.infer
    prompts = open_prompt_dataset(ic.prompts)
    prompts.check_files()
    check_stop_tokens(ic, prompts)
    if ic.mode == "score" and not prompts.manifest.get("has_continuations"):
        raise InferError(f"infer.mode=score needs continuations in {ic.prompts} (prepare with data.continuation_field)")
    out_dir = Path(spec.run_dir) / "outputs"
    tok = prompts.load_tokenizer()
    device = comm.device
    check_supported(ic.quantize, device, spec.parallel.tp)  # before seconds are spent loading
    model, model_stops = load_model_for(spec, prompts, device)
    dtype = torch.bfloat16 if (ic.dtype == "bf16" or (ic.dtype == "auto" and device.type == "cuda")) else torch.float32
    stop_ids = sorted(set(ic.stop_token_ids) | {tok.eos_id} | set(model_stops))
    # rank 0 checks what is already there and decides what is left (of this array task's share)
    task, tasks = array_slot(ic)
    mine_idx = [i for i in range(len(prompts.shards)) if i % tasks == task]
    plan = None
    if comm.rank == 0:
        fp = fingerprint(ic, model_sha256=weights_sha256(model), prompts=prompts, stop_token_ids=stop_ids,
                         dtype="bf16" if dtype == torch.bfloat16 else "fp32")
        prepare_out_dir(out_dir, fp, force)
        plan = (fp, [i for i in mine_idx if not done_and_intact(out_dir, prompts.shards[i], fp)])
    fp, todo = comm.broadcast_object(plan)
    tp, tp_group = spec.parallel.tp, None
    if tp > 1:  # every rank loaded the whole model; each keeps its heads and its part of each layer
        from hpcllm.parallel.layout import check_model
        from hpcllm.parallel.parallelize import for_inference

        try:
            spec.parallel.data_parallel(comm.size)
            check_model(spec.parallel, model.config)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        model, tp_group = for_inference(model, comm, tp)
    leader = comm.rank % tp == 0  # the rank of its tensor-parallel group that writes the outputs
    engine = Engine(model, device=device, dtype=dtype, max_batch_size=ic.batch_size, pad_id=tok.pad_id,
                    overflow=ic.overflow, use_cuda_graphs=ic.cuda_graphs, share_prefixes=ic.prefix_sharing)
    params = SamplingParams(max_new_tokens=ic.max_new_tokens, temperature=ic.temperature, top_k=ic.top_k,
                            top_p=ic.top_p, stop_token_ids=stop_ids, seed=ic.seed)
    stops = [s.encode("utf-8") for s in ic.stop_strings]
    stop_when = stop_string_check(stops, tok.decode_bytes)
    skipped = len(mine_idx) - len(todo)
    queue = make_queue(comm, todo, ic.schedule, tp, tp_group)
    # rank 0 exports live progress from the done markers of this start's shards (hpcllm.monitor)
    monitor.current().infer_started(out_dir, {marker_path(out_dir, prompts.shards[i]).name: prompts.shards[i].n_records
                                              for i in todo}, [prompts.shards[i].n_records for i in mine_idx],
                                    start_id, getattr(queue, "pending", None))
    if comm.rank == 0:
        if skipped:
            log.info("resuming: %d of %d shards already done", skipped, len(mine_idx))
        log.info("schedule: %s", queue.description)
    bar = None
    if comm.rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=sum(prompts.shards[i].n_records for i in todo), unit="rec", desc=f"infer {ic.mode}",
                   mininterval=1.0)
    t0 = time.perf_counter()
    mine = {"records": 0, "new_tokens": 0, "shards": 0}

    def progress(n, toks):
        if leader:
            mine["new_tokens"] += toks
        if bar is not None:
            bar.update(n)

    try:
        while (i := queue.next()) is not None:
            shard = prompts.shards[i]
            if leader:
                mark_begun(out_dir, shard, comm.rank, start_id)
            rec = shard.load()
            ts = time.perf_counter()
            if ic.mode == "generate":
                results: list = engine.generate(rec.prompts, rec.ids, params, return_logprobs=ic.return_logprobs,
                                                progress=progress, stop_when=stop_when)
                texts = []
                for r in results:
                    r.tokens, text, cut = output_text(r.tokens, r.finish_reason == "stop", tok.decode_bytes, stops)
                    if cut:
                        r.finish_reason = "stop"
                    if r.logprobs is not None:
                        r.logprobs = r.logprobs[: len(r.tokens)]
                    texts.append(text)
            else:
                results = engine.score(rec.prompts, rec.continuations, rec.ids)
                texts = None
                progress(len(results), 0)
            if not leader:  # its group's leader has the same results and writes them
                continue
            write_output(out_dir, shard, rec.ids, results, ic.mode, texts, fp, time.perf_counter() - ts, comm.rank,
                         start_id)
            mine["records"] += len(results)
            mine["shards"] += 1
    except BaseException:
        queue.abandon()  # no goodbye to the peers: the CLI reports the error and ends every rank
        raise
    finally:
        if bar is not None:
            bar.close()
    # a rank that is done waits here for the others' last shard: that wait counts against
    # dist.timeout_s like any collective (docs/inference.md: keep a shard's work below it)
    totals = comm.allgather_object(mine)
    queue.close()
    summary = {k: sum(t[k] for t in totals) for k in mine} | {"skipped_shards": skipped,
                                                              "seconds": time.perf_counter() - t0}
    if comm.rank == 0:
        missing = [s.path.name for s in prompts.shards if not is_marked_done(out_dir, s, fp)]
        if missing and tasks > 1:  # other array tasks still have shards to do
            log.info("array task %d/%d done; %d shard(s) left to other tasks, no output manifest yet", task, tasks,
                     len(missing))
        elif missing:
            raise IncompleteError(f"{out_dir}: {len(missing)} shard(s) not done at the end of the run "
                                  f"(first: {missing[0]}): was the output dir changed while the job ran?")
        else:
            write_manifest(out_dir, prompts, fp, str(ic.model))
            rate = summary["new_tokens"] / max(summary["seconds"], 1e-9)
            log.info("infer %s done: %d records in %d shards (%d skipped as done) on %d rank(s), %.0f new tokens/s",
                     ic.mode, summary["records"], summary["shards"], skipped, comm.size, rate)
    comm.barrier()
    return summary


def export_jsonl(run_dir: str | Path, out: str | Path) -> int:
    """Every record of a finished run as JSON lines, each output shard checked before it is read."""
    import json

    from hpcllm.atomic import atomic_open
    from hpcllm.infer.outputs import MANIFEST, read_outputs_manifest, read_rows
    from hpcllm.paths import inside

    out_dir = Path(run_dir) / "outputs"
    man = read_outputs_manifest(out_dir)
    # every shard the manifest names is in the outputs dir, a link out of it included, before any is read
    paths = [inside(out_dir, e["path"], what=f"{out_dir / MANIFEST}: shard") for e in man["shards"]]
    n = 0
    with atomic_open(out, "w") as fo:
        for path, e in zip(paths, man["shards"]):
            for row in read_rows(path, e, man["mode"]):
                fo.write(json.dumps(row) + "\n")
                n += 1
    return n
