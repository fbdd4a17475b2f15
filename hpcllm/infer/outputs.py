"""Inference outputs: `run_dir/outputs/out-NNNNN.h5` per input shard, a `.done` marker beside each,
and `manifest.json` once every shard is done (the format is in docs/inference.md).

A marker records what produced its shard — the fingerprint: the weights' and tokenizer's hashes, the
prompt shards' checksums and every setting that changes outputs — with the shard's size and sha256.
A rerun trusts a shard only when its marker carries this run's fingerprint and the file still has
its checksum; outputs made with other settings are refused with one line naming the setting, unless
the run is started with --force. Readers (resume, export) check a file's checksum before HDF5
opens it, and open the checked bytes in memory: a damaged file is named, never parsed (h5py can
spin forever inside a corrupt file).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from hpcllm.atomic import atomic_path, read_json_object, write_json
from hpcllm.data.prompts import PromptDataset, PromptShard, read_verified
from hpcllm.data.shards import ragged, ragged_ok, read_texts, sha256_file, write_texts
from hpcllm.errors import DataError, InferError

log = logging.getLogger("hpcllm.infer")

FORMAT = "hpcllm-outputs"
FORMAT_VERSION = 2  # 2: text stored as bytes, settings fingerprint, checksums verified on read
MANIFEST = "manifest.json"

# fingerprint keys, in the order a difference is reported, with the setting each comes from
FINGERPRINT_KEYS = {
    "mode": "infer.mode",
    "quantize": "infer.quantize",  # before the weights' sha256, which it changes too
    "model_sha256": "infer.model (sha256 of its weights)",
    "tokenizer_sha256": "the prompts' tokenizer (sha256)",
    "prompts_sha256": "infer.prompts (sha256 of its shard checksums)",
    "dtype": "infer.dtype (resolved)",
    "overflow": "infer.overflow",
    "max_new_tokens": "infer.max_new_tokens",
    "temperature": "infer.temperature",
    "top_k": "infer.top_k",
    "top_p": "infer.top_p",
    "seed": "infer.seed",
    "stop_token_ids": "infer.stop_token_ids (with the tokenizer's end-of-text)",
    "stop_strings": "infer.stop_strings",
    "return_logprobs": "infer.return_logprobs",
}
# what a fingerprint means by a key's absence (left out when it has this value, as by earlier hpcllm)
FINGERPRINT_DEFAULTS = {"quantize": "none"}


def out_name(shard: PromptShard) -> str:
    return f"out-{shard.index:05d}.h5"


def marker_path(out_dir: Path, shard: PromptShard) -> Path:
    return out_dir / (out_name(shard) + ".done")


def begun_path(out_dir: Path, shard: PromptShard) -> Path:
    return out_dir / (out_name(shard) + ".begun")


# ------------------------------------------------------------------------------------ fingerprint


def fingerprint(ic, *, model_sha256: str, prompts: PromptDataset, stop_token_ids: list[int], dtype: str) -> dict:
    """What decides this run's outputs. Settings that cannot change them are left out (the seed and
    top-k/top-p of greedy decoding, sampling settings when scoring; batch size, schedule and rank
    count never do), so a rerun that only changes those resumes."""
    listing = "".join(f"{s.index} {s.sha256}\n" for s in prompts.shards)
    fp = dict(mode=ic.mode, model_sha256=model_sha256, tokenizer_sha256=prompts.tokenizer_sha256,
              prompts_sha256=hashlib.sha256(listing.encode()).hexdigest(), dtype=dtype, overflow=ic.overflow)
    if ic.quantize != "none":  # recorded only when used: markers of full-precision runs stay as they were
        fp["quantize"] = ic.quantize
    if ic.mode == "generate":
        fp.update(max_new_tokens=ic.max_new_tokens, temperature=ic.temperature, stop_token_ids=list(stop_token_ids),
                  stop_strings=list(ic.stop_strings), return_logprobs=ic.return_logprobs)
        if ic.temperature > 0:
            fp.update(top_k=ic.top_k, top_p=ic.top_p, seed=ic.seed)
    return fp


def difference(old, new: dict) -> str | None:
    """The first setting in which two fingerprints differ, as words; None when they agree."""
    if not isinstance(old, dict):
        return "no settings recorded (written by an older hpcllm)"
    for key, setting in FINGERPRINT_KEYS.items():
        was, now = old.get(key, FINGERPRINT_DEFAULTS.get(key)), new.get(key, FINGERPRINT_DEFAULTS.get(key))
        if was != now:
            return f"{setting}: {_show(was)} there, {_show(now)} now"
    return None


def _show(v) -> str:
    if v is None:
        return "not used"
    if isinstance(v, str) and len(v) == 64:  # a sha256
        return v[:12] + "…"
    return json.dumps(v)




def refuse_other_settings(out_dir: Path, fp: dict) -> None:
    """Outputs already in out_dir that another configuration made stop the run: it never mixes them
    with its own or presents them as current."""
    for path in [out_dir / MANIFEST, *sorted(out_dir.glob("out-*.h5.done"))]:
        info = read_json_object(path)
        if info is None:
            continue
        diff = difference(info.get("fingerprint"), fp)
        if diff is not None:
            raise InferError(f"{out_dir} holds outputs made with other settings ({path.name}: {diff}): rerun with "
                             "--force to replace them, or choose a new run_dir")


def remove_outputs(out_dir: Path) -> int:
    """--force: remove the manifest, the markers (done and begun) and the output shards (nothing else)."""
    gone = 0
    for p in [out_dir / MANIFEST, *out_dir.glob("out-*.h5.done"), *out_dir.glob("out-*.h5.begun"),
              *out_dir.glob("out-*.h5")]:
        try:
            p.unlink(missing_ok=True)
        except OSError as e:
            raise InferError(f"--force: cannot remove {p} ({e.strerror or e})") from None
        gone += p.suffix == ".h5"
    return gone


def _marker(out_dir: Path, shard: PromptShard, fp: dict) -> dict | None:
    """The shard's marker when it is well-formed and made by this configuration from this input."""
    info = read_json_object(marker_path(out_dir, shard))
    if info is None or info.get("fingerprint") != fp or info.get("input_sha256") != shard.sha256:
        return None
    if not isinstance(info.get("bytes"), int) or not isinstance(info.get("sha256"), str):
        return None
    return info


def done_and_intact(out_dir: Path, shard: PromptShard, fp: dict) -> bool:
    """Resume: the shard is done when its marker is this run's and the output has its checksum.
    A damaged output is logged and done again."""
    info = _marker(out_dir, shard, fp)
    if info is None:
        return False
    try:
        read_verified(out_dir / out_name(shard), info["bytes"], info["sha256"])
    except DataError as e:
        log.warning("%s — the shard is done again", e)
        return False
    return True


def marked_done(out_dir: Path, shard: PromptShard) -> dict | None:
    """The shard's marker if it is for this input and its output has the recorded size and
    checksum, whatever configuration made it (the batch script's completeness check: no model to
    fingerprint there). The file is hashed, never parsed, so a damaged one cannot hang the check."""
    info = read_json_object(marker_path(out_dir, shard))
    path = out_dir / out_name(shard)
    if info is None or info.get("input_sha256") != shard.sha256 or "fingerprint" not in info:
        return None
    if not isinstance(info.get("bytes"), int) or not path.is_file() or path.stat().st_size != info["bytes"]:
        return None
    if sha256_file(path) != info.get("sha256"):
        return None
    return info


def is_marked_done(out_dir: Path, shard: PromptShard, fp: dict) -> bool:
    """Cheap form of done_and_intact (marker and size), for the end of a run."""
    info = _marker(out_dir, shard, fp)
    path = out_dir / out_name(shard)
    return info is not None and path.is_file() and path.stat().st_size == info["bytes"]


# ------------------------------------------------------------------------------------ writing


def mark_begun(out_dir: Path, shard: PromptShard, rank: int, start_id: str | None = None) -> None:
    """Record that job start `start_id` (hpcllm.provenance) began the shard (out-NNNNN.h5.begun: every
    attempt, in order), so that `hpcllm report` can name the shards a start began and never finished —
    the work a retried task redid. One writer at a time: a shard is handed to one rank of one start."""
    path = begun_path(out_dir, shard)
    attempts = (read_json_object(path) or {}).get("attempts")
    attempts = attempts if isinstance(attempts, list) else []
    attempts.append(dict(start=start_id, rank=rank, time=time.time()))
    try:
        write_json(path, {"attempts": attempts})
    except OSError as e:
        raise InferError(f"cannot write {path}: {e.strerror or e}") from None


def write_output(out_dir: Path, shard: PromptShard, ids: list[int], results: list, mode: str,
                 texts: list[bytes] | None, fp: dict, seconds: float, rank: int | None = None,
                 start_id: str | None = None) -> dict:
    """The output shard (atomically), then its marker (naming the rank and job start that wrote it)."""
    import h5py

    path = out_dir / out_name(shard)
    try:
        with atomic_path(path) as tmp, h5py.File(tmp, "w", libver=("v110", "v110")) as f:
            f.create_dataset("ids", data=np.asarray(ids, dtype=np.int64), track_times=False)
            if mode == "generate":
                tokens, off = ragged([r.tokens for r in results], np.int64)
                f.create_dataset("tokens", data=tokens, track_times=False)
                f.create_dataset("offsets", data=off, track_times=False)
                write_texts(f, texts)
                f.create_dataset("finish_reason", data=[r.finish_reason for r in results],
                                 dtype=h5py.string_dtype("utf-8"), track_times=False)
                f.create_dataset("truncated", data=np.asarray([r.truncated for r in results], np.int64),
                                 track_times=False)
                if results and results[0].logprobs is not None:
                    lp, _ = ragged([r.logprobs for r in results], np.float32)
                    f.create_dataset("logprobs", data=lp, track_times=False)
            else:
                lp, off = ragged([r.token_logprobs for r in results], np.float32)
                f.create_dataset("token_logprobs", data=lp, track_times=False)
                f.create_dataset("offsets", data=off, track_times=False)
                f.create_dataset("logprob_sum", data=np.asarray([r.logprob_sum for r in results]), track_times=False)
                f.create_dataset("n_tokens", data=np.asarray([r.n_tokens for r in results], np.int64),
                                 track_times=False)
                f.create_dataset("perplexity", data=np.asarray([r.perplexity for r in results]), track_times=False)
            f.attrs["mode"], f.attrs["input_shard"], f.attrs["n_records"] = mode, shard.path.name, len(ids)
        data = path.read_bytes()
        info = dict(path=path.name, input=shard.path.name, input_sha256=shard.sha256, n_records=len(ids),
                    bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), seconds=seconds, fingerprint=fp)
        # who did it and when, for `hpcllm report` (per-shard latency, rank load balance, shards redone)
        info.update(rank=rank, finished_at=time.time(), start=start_id,
                    new_tokens=sum(len(r.tokens) for r in results) if mode == "generate" else 0)
        write_json(marker_path(out_dir, shard), info)
    except OSError as e:
        raise InferError(f"cannot write {path}: {e.strerror or e}") from None
    return info


def write_manifest(out_dir: Path, prompts: PromptDataset, fp: dict, model: str) -> dict:
    """manifest.json, last: every shard's marker content (this run's, checked by the caller)."""
    entries = []
    for s in prompts.shards:
        info = read_json_object(marker_path(out_dir, s))
        entries.append({k: v for k, v in info.items() if k != "fingerprint"})
    man = dict(format=FORMAT, format_version=FORMAT_VERSION, mode=fp["mode"], fingerprint=fp,
               prompts=str(prompts.path), model=model, n_records=sum(e["n_records"] for e in entries),
               shards=entries)
    write_json(out_dir / MANIFEST, man)
    return man


# ------------------------------------------------------------------------------------ reading


def read_outputs_manifest(out_dir: Path) -> dict:
    path = out_dir / MANIFEST
    if not path.is_file():
        raise InferError(f"{path}: missing — the inference run is not complete (rerun it to finish)")
    man = read_json_object(path)
    if man is None or man.get("format") != FORMAT:
        raise DataError(f"{path}: not a readable hpcllm outputs manifest (corrupt?)")
    if man.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}: outputs format_version {man.get('format_version')} (this hpcllm reads "
                        f"{FORMAT_VERSION}): rerun the inference with --force to rewrite them")
    shards = man.get("shards")
    ok = isinstance(shards, list) and man.get("mode") in ("generate", "score") and all(
        isinstance(e, dict) and isinstance(e.get("path"), str) and "/" not in e["path"]
        and isinstance(e.get("bytes"), int) and isinstance(e.get("sha256"), str)
        and isinstance(e.get("n_records"), int) for e in shards)
    if not ok:
        raise DataError(f"{path}: corrupt manifest (a shard entry lacks path, bytes, sha256 or n_records)")
    return man


def read_rows(path: Path, entry: dict, mode: str) -> Iterator[dict]:
    """The records of one output shard as export rows, after checking its checksum and structure."""
    import h5py

    data = read_verified(path, entry["bytes"], entry["sha256"])
    n = entry["n_records"]
    try:
        with h5py.File(io.BytesIO(data), "r") as f:
            ids, off = f["ids"][:], f["offsets"][:]
            values = f["tokens"][:] if mode == "generate" else f["token_logprobs"][:]
            if len(ids) != n or not ragged_ok(off, n, len(values)):
                raise DataError(f"{path}: inconsistent output shard ({len(ids)} ids, {len(off)} offsets, "
                                f"{len(values)} values; the manifest says {n} records)")
            if mode == "generate":
                texts, cols = read_texts(f, n, path), {"finish_reason": f["finish_reason"][:]}
                if texts is None:
                    raise DataError(f"{path}: no /text")
            else:
                cols = {k: f[k][:] for k in ("logprob_sum", "n_tokens", "perplexity")}
            if any(len(c) != n for c in cols.values()):
                raise DataError(f"{path}: inconsistent output shard (a column does not have {n} records)")
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"{path}: unreadable output shard ({e})") from None
    for j in range(n):
        row = {"id": int(ids[j])}
        if mode == "generate":
            # the stored bytes are exact; JSON needs text, so invalid UTF-8 becomes U+FFFD here
            row["text"] = texts[j].decode("utf-8", errors="replace")
            row["tokens"] = values[off[j] : off[j + 1]].tolist()
            fr = cols["finish_reason"][j]
            row["finish_reason"] = fr.decode() if isinstance(fr, bytes) else str(fr)
        else:
            row["logprob_sum"] = float(cols["logprob_sum"][j])
            row["n_tokens"] = int(cols["n_tokens"][j])
            row["perplexity"] = float(cols["perplexity"][j])
            row["token_logprobs"] = values[off[j] : off[j + 1]].tolist()
        yield row
