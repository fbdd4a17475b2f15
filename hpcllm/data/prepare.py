"""`hpcllm prepare`: text -> tokens -> sharded HDF5, on one process or N MPI ranks, same bytes out.

How N ranks produce the dataset one process would:
  1. rank 0 lists the input files (sorted) and broadcasts the list; rank r takes a contiguous block
     of files balanced by size, so concatenating the ranks' documents in rank order is the global
     order;
  2. each rank tokenizes its documents (eos after each) and sorts them into train/val by a seeded
     hash of (file key, document index) — not by rank;
  3. an exclusive scan of the per-rank token and document counts says where each rank's tokens
     start in each split's stream; every rank writes its tokens at that offset into one raw staging
     file per split (a shared filesystem is what clusters have);
  4. shards are cut at fixed global offsets (shard_tokens) and written round-robin by the ranks from
     the staging file, each to a temporary name, renamed when complete;
  5. after a barrier rank 0 writes the tokenizer file and, last, manifest.json.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from hpcllm.data.chat import check_messages
from hpcllm.data.config import DataConfig
from hpcllm.data.inputs import InputFile, find_inputs, iter_documents, iter_jsonl, is_jsonl
from hpcllm.atomic import remove_stale_tmp, write_json
from hpcllm import monitor
from hpcllm.comm import Communicator
from hpcllm.data.shards import (FORMAT, FORMAT_VERSION, MANIFEST, sha256_file, token_dtype, write_prompt_shard,
                                write_token_shard)
from hpcllm.data.tokenizer import ByteTokenizer, load_tokenizer_file
from hpcllm.errors import DataError

log = logging.getLogger("hpcllm.data")
SPLITS = ("train", "val")
TOKENIZER_FILE = "tokenizer.json"


def split_of(key: str, index: int, seed: int, val_fraction: float) -> str:
    h = hashlib.sha256(f"{seed}\0{key}\0{index}".encode()).digest()
    return "val" if int.from_bytes(h[:8], "little") / 2**64 < val_fraction else "train"


def _my_block(files: list[InputFile], rank: int, size: int) -> list[InputFile]:
    """Contiguous block of files for `rank`, balanced by bytes (the same answer on every rank)."""
    total = sum(f.size for f in files) or 1
    out, acc = [], 0
    for f in files:
        owner = min(size - 1, acc * size // total)
        acc += f.size
        if owner == rank:
            out.append(f)
    return out


def _progress(comm: Communicator, total: int, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, unit_scale=True, disable=comm.rank != 0, desc="prepare", mininterval=1.0)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextlib.contextmanager
def _writing(path: Path, remove: tuple[Path, ...] = ()):
    """An OSError while writing the dataset — a full disk, a quota, a read-only directory — as one
    DataError naming the file (h5py's own message spans several lines). `remove`: the staging files,
    which would otherwise keep the disk full until the next run clears them."""
    try:
        yield
    except (OSError, RuntimeError) as raised:
        # h5py closing a file whose write failed raises a RuntimeError over the write's OSError
        e = raised if isinstance(raised, OSError) else raised.__context__
        if not isinstance(e, OSError):
            raise
        for p in remove:
            p.unlink(missing_ok=True)
        reason = os.strerror(e.errno) if e.errno else str(e).splitlines()[0]
        hint = ": free some space, or choose another data.dataset" if e.errno in DISK_FULL else ""
        raise DataError(f"cannot write {path}: {reason}{hint}") from None


def _short_of_space(out: Path, totals: dict, dtype: np.dtype, shard_tokens: int) -> str | None:
    """Why the dataset will not fit on out's filesystem, or None. It needs the staging files (the
    tokens and document starts) and, beside them, the shards (the same again, plus HDF5's headers),
    less the shards of an earlier run that the new ones replace."""
    staged = sum(t * dtype.itemsize + d * 8 for t, d in totals.values())
    names = [f"{s}-{i:05d}.h5" for s, (t, _) in totals.items() for i in range(-(-t // shard_tokens))]
    replaced = sum((out / n).stat().st_size for n in names if (out / n).is_file())
    needed = 2 * staged + SHARD_OVERHEAD * len(names) - replaced
    free = shutil.disk_usage(out).free
    if needed <= free:
        return None
    return (f"{out}: the dataset needs about {needed / 2**20:,.1f} MiB free while it is written (staged tokens, then "
            f"shards), and its filesystem has {free / 2**20:,.1f} MiB: free some space, or choose another data.dataset")


SHARD_OVERHEAD = 16384  # an HDF5 shard's headers and attributes: ~7 KB measured


def _reserve(fh, nbytes: int) -> None:
    """Size a staging file, taking its blocks now where the filesystem can (so a full disk fails here);
    elsewhere it stays sparse until written."""
    try:
        if nbytes:
            os.posix_fallocate(fh.fileno(), 0, nbytes)
    except OSError as e:
        if e.errno in DISK_FULL:
            raise
        fh.truncate(nbytes)  # no fallocate on this filesystem (EOPNOTSUPP, EINVAL)


def _write_at(path: Path, offset: int, data: np.ndarray) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(memoryview(np.ascontiguousarray(data)).cast("B"))
        fh.flush()


def prepare(cfg: DataConfig, comm: Communicator) -> dict:
    """Build the dataset at cfg.dataset; returns the summary (same on every rank)."""
    if not cfg.dataset:
        raise DataError("data.dataset (the output directory) is not set")
    if cfg.output == "prompts":
        return prepare_prompts(cfg, comm)
    t0 = time.perf_counter()
    out = Path(cfg.dataset)
    tok = load_tokenizer_file(cfg.tokenizer)
    dtype = token_dtype(tok.vocab_size)
    files = comm.broadcast_object(find_inputs(cfg) if comm.rank == 0 else None)
    staging = tuple(out / f".{s}.{what}.tmp" for s in SPLITS for what in ("tokens", "docs"))
    if comm.rank == 0:
        with _writing(out):
            out.mkdir(parents=True, exist_ok=True)
            (out / MANIFEST).unlink(missing_ok=True)  # from here on the directory is "unfinished"
            remove_stale_tmp(out)
    comm.barrier()

    # 1-2: tokenize my documents
    mine = _my_block(files, comm.rank, comm.size)
    streams: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    lengths: dict[str, list[int]] = {s: [] for s in SPLITS}
    empty = replaced = 0
    bar = _progress(comm, sum(f.size for f in mine), "B")
    mon = monitor.current()  # live Prometheus metrics (hpcllm.monitor): rank 0's share
    mon.prepare_started(sum(f.size for f in mine))
    for f in mine:
        for i, doc in enumerate(iter_documents(f, cfg)):
            if len(doc) == 0:
                empty += 1
                continue
            if isinstance(doc, bytes) and not isinstance(tok, ByteTokenizer):
                try:
                    doc.decode("utf-8")
                except UnicodeDecodeError:
                    replaced += 1
            ids = tok.encode_document(doc)  # framed as the tokenizer frames a text (Llama: BOS first)
            if not ids or ids[-1] != tok.eos_id:
                ids.append(tok.eos_id)
            split = split_of(f.key, i, cfg.split_seed, cfg.val_fraction)
            streams[split].append(np.asarray(ids, dtype=dtype))
            lengths[split].append(len(ids))
            mon.prepared_document(len(ids))
        bar.update(f.size)
        mon.prepared_file(f.size)
    bar.close()

    # 3: place my tokens in each split's global stream
    shard_entries = []
    offsets, totals = {}, {}
    for split in SPLITS:
        tok_off, tok_total = comm.exscan(sum(lengths[split]))
        doc_off, doc_total = comm.exscan(len(lengths[split]))
        offsets[split], totals[split] = (tok_off, doc_off), (tok_total, doc_total)
    short = comm.broadcast_object(_short_of_space(out, totals, dtype, cfg.shard_tokens) if comm.rank == 0 else None)
    if short:  # every rank says it, before a byte is written: a full disk mid-way fails less clearly
        raise DataError(short)
    for split in SPLITS:
        (tok_off, doc_off), (tok_total, doc_total) = offsets[split], totals[split]
        if tok_total == 0:
            continue
        raw, docs = out / f".{split}.tokens.tmp", out / f".{split}.docs.tmp"  # in `staging`
        if comm.rank == 0:
            for path, nbytes in ((raw, tok_total * dtype.itemsize), (docs, doc_total * 8)):
                with _writing(path, staging), open(path, "wb") as fh:
                    _reserve(fh, nbytes)
        comm.barrier()
        if lengths[split]:
            # written, not memory-mapped: a write to a full disk fails (ENOSPC), a store into a mapping
            # of it kills the process (SIGBUS) with no word of why
            starts = tok_off + np.concatenate([[0], np.cumsum(lengths[split][:-1])]).astype(np.int64)
            with _writing(raw, staging):
                _write_at(raw, tok_off * dtype.itemsize, np.concatenate(streams[split]))
            with _writing(docs, staging):
                _write_at(docs, doc_off * 8, starts)
        comm.barrier()
        # 4: shards at fixed global offsets, round-robin over ranks
        tokens = np.memmap(raw, dtype=dtype, mode="r", shape=(tok_total,))
        doc_starts = np.memmap(docs, dtype=np.int64, mode="r", shape=(doc_total,))
        n_shards = -(-tok_total // cfg.shard_tokens)
        for i in range(comm.rank, n_shards, comm.size):
            lo, hi = i * cfg.shard_tokens, min((i + 1) * cfg.shard_tokens, tok_total)
            d_lo, d_hi = np.searchsorted(doc_starts, [lo, hi])
            name = f"{split}-{i:05d}.h5"
            attrs = dict(split=split, shard_index=i, token_offset=lo, n_tokens=hi - lo, n_docs=int(d_hi - d_lo),
                         dtype=dtype.name, vocab_size=tok.vocab_size, eos_id=tok.eos_id, tokenizer=tok.identity)
            with _writing(out / name, staging):  # atomic: a shard that failed to be written is not left behind
                write_token_shard(out / name, np.asarray(tokens[lo:hi]), np.asarray(doc_starts[d_lo:d_hi]) - lo, attrs)
            shard_entries.append(dict(path=name, split=split, index=i, token_offset=lo, n_tokens=hi - lo,
                                      n_docs=int(d_hi - d_lo), bytes=(out / name).stat().st_size,
                                      sha256=sha256_file(out / name)))
        del tokens, doc_starts
    all_entries = sorted((e for part in comm.allgather_object(shard_entries) for e in part),
                         key=lambda e: (SPLITS.index(e["split"]), e["index"]))
    counts = comm.allgather_object((empty, replaced))
    comm.barrier()

    # 5: tokenizer, manifest last
    summary = dict(documents=sum(totals[s][1] for s in SPLITS), tokens=sum(totals[s][0] for s in SPLITS),
                   shards=len(all_entries), empty_documents=sum(c[0] for c in counts),
                   non_utf8_documents=sum(c[1] for c in counts), files=len(files),
                   seconds=time.perf_counter() - t0)
    if comm.rank == 0:
        for split in SPLITS:
            for p in (out / f".{split}.tokens.tmp", out / f".{split}.docs.tmp"):
                p.unlink(missing_ok=True)
        listed = {e["path"] for e in all_entries}
        for old in out.glob("*-[0-9][0-9][0-9][0-9][0-9].h5"):
            if old.name not in listed:
                old.unlink()  # left by an earlier run with another shard layout
        with _writing(out / TOKENIZER_FILE):
            tok.save(out / TOKENIZER_FILE)
        manifest = dict(
            format=FORMAT, format_version=FORMAT_VERSION, kind="tokens", tokenizer=tok.identity,
            tokenizer_file=TOKENIZER_FILE, tokenizer_sha256=sha256_file(out / TOKENIZER_FILE),
            vocab_size=tok.vocab_size, eos_id=tok.eos_id, pad_id=tok.pad_id, dtype=dtype.name,
            shard_tokens=cfg.shard_tokens, val_fraction=cfg.val_fraction, split_seed=cfg.split_seed,
            splits={s: dict(n_tokens=totals[s][0], n_docs=totals[s][1]) for s in SPLITS},
            shards=all_entries,
        )
        with _writing(out / MANIFEST):
            write_json(out / MANIFEST, manifest)
        rate = summary["tokens"] / max(summary["seconds"], 1e-9)
        log.info("prepared %s: %d documents (%d empty skipped%s), %d tokens, %d shards, %.0f tokens/s on %d rank(s)",
                 out, summary["documents"], summary["empty_documents"],
                 f", {summary['non_utf8_documents']} with invalid UTF-8 replaced" if summary["non_utf8_documents"] else "",
                 summary["tokens"], summary["shards"], rate, comm.size)
        for s in SPLITS:
            if totals[s][0] == 0:
                log.warning("split '%s' is empty (val_fraction=%g, %d documents)", s, cfg.val_fraction, summary["documents"])
    comm.barrier()
    return summary


# ------------------------------------------------------------------------------------ prompts


def _utf8(text: str, where: str, field: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # JSON allows "\ud800", which is no character at all
        raise DataError(f"{where}: field '{field}' is not valid Unicode (a lone surrogate escape such as "
                        "\\ud800)") from None


def read_records(cfg: DataConfig) -> list[dict]:
    """Prompt records in input order: {'id', 'text' (bytes), 'where' (file:line), 'continuation'?}.
    JSONL: one record per line. Text files: one prompt per line (doc_split=line), per blank-line
    block or per file, kept as bytes; empty ones (and blank lines) are not records, as `prepare`
    skips empty documents, and ids are numbered from 0 across all files."""
    records, seen = [], {}
    for f in find_inputs(cfg):
        if is_jsonl(f.path, cfg):
            for lineno, obj in iter_jsonl(f.path):
                where = f"{f.path}:{lineno}"
                text, messages = obj.get(cfg.text_field), obj.get(cfg.messages_field) if cfg.messages_field else None
                if messages is not None and text is not None:
                    raise DataError(f"{where}: both '{cfg.text_field}' and '{cfg.messages_field}': give one")
                if messages is None and not isinstance(text, str):
                    raise DataError(f"{where}: field '{cfg.text_field}' (or '{cfg.messages_field}', a chat) missing or "
                                    "not a string")
                rid = obj.get(cfg.id_field) if cfg.id_field else len(records)
                if isinstance(rid, bool) or not isinstance(rid, int):
                    raise DataError(f"{where}: id field '{cfg.id_field}' must be an integer, got {rid!r}")
                if rid in seen:
                    raise DataError(f"{where}: duplicate record id {rid} (first at {seen[rid]})")
                seen[rid] = where
                if messages is not None:
                    rec = dict(id=rid, messages=check_messages(messages, where), where=where)
                else:
                    rec = dict(id=rid, text=_utf8(text, where, cfg.text_field), where=where)
                if cfg.continuation_field:
                    cont = obj.get(cfg.continuation_field)
                    if not isinstance(cont, str):
                        raise DataError(f"{where}: field '{cfg.continuation_field}' missing or not a string")
                    rec["continuation"] = _utf8(cont, where, cfg.continuation_field)
                records.append(rec)
        else:
            for i, doc in enumerate(iter_documents(f, cfg), 1):
                data = doc if isinstance(doc, bytes) else doc.encode("utf-8")
                if not data or (cfg.doc_split == "line" and not data.strip()):
                    continue
                where = f"{f.path}:{i}" if cfg.doc_split == "line" else f"{f.path} (document {i})"
                records.append(dict(id=len(records), text=data, where=where))
    return records


def _encode_record(tok, rec: dict, field: str, what: str) -> list[int]:
    """Tokens of a record's text; an empty prompt or continuation is refused here, naming the record,
    rather than by the inference job after other shards are done."""
    # a plain prompt is framed as the tokenizer frames a text (as transformers' tokenizer(text)); a
    # rendered chat already holds its special tokens (as apply_chat_template); a continuation is plain text
    framed = field == "text" and not rec.get("chat")
    ids = tok.encode_document(rec[field]) if framed else tok.encode_bytes(rec[field])
    if not ids:
        raise DataError(f"{rec['where']}: record {rec['id']}: empty {what} — give it text or leave the record out")
    return ids


def prepare_prompts(cfg: DataConfig, comm: Communicator) -> dict:
    """Prompt shards (`prompts-NNNNN.h5`, `prompts_per_shard` records each). Rank 0 does the work —
    prompt sets are small next to training corpora — while the other ranks wait."""
    t0 = time.perf_counter()
    summary = None
    if comm.rank == 0:
        out = Path(cfg.dataset)
        with _writing(out):
            out.mkdir(parents=True, exist_ok=True)
            (out / MANIFEST).unlink(missing_ok=True)
        tok = load_tokenizer_file(cfg.tokenizer)
        dtype = token_dtype(tok.vocab_size)
        records = read_records(cfg)
        if not records:
            raise DataError(f"data.inputs {cfg.inputs}: no prompt records found")
        for r in records:  # a chat is rendered by the tokenizer's template; the text holds its special tokens
            if "messages" in r:
                text = tok.render_chat(r.pop("messages"), r["where"])
                r["text"], r["chat"] = _utf8(text, r["where"], cfg.messages_field), True
        per = cfg.prompts_per_shard
        prompts = [_encode_record(tok, r, "text", "prompt") for r in records]
        conts = [_encode_record(tok, r, "continuation", "continuation") for r in records] \
            if cfg.continuation_field else None
        entries = []
        for i in range(0, len(records), per):
            chunk = records[i : i + per]
            name = f"prompts-{i // per:05d}.h5"
            with _writing(out / name):
                write_prompt_shard(out / name, prompts[i : i + per], [r["id"] for r in chunk], dtype,
                                   dict(shard_index=i // per, n_records=len(chunk), dtype=dtype.name,
                                        vocab_size=tok.vocab_size, eos_id=tok.eos_id, tokenizer=tok.identity),
                                   texts=[r["text"] for r in chunk] if cfg.keep_text else None,
                                   continuations=conts[i : i + per] if conts is not None else None)
            entries.append(dict(path=name, split="prompts", index=i // per, n_records=len(chunk),
                                bytes=(out / name).stat().st_size, sha256=sha256_file(out / name)))
        listed = {e["path"] for e in entries}
        for old in out.glob("prompts-*.h5"):
            if old.name not in listed:
                old.unlink()
        with _writing(out / TOKENIZER_FILE):
            tok.save(out / TOKENIZER_FILE)
        with _writing(out / MANIFEST):
            write_json(out / MANIFEST, dict(
                format=FORMAT, format_version=FORMAT_VERSION, kind="prompts", tokenizer=tok.identity,
                tokenizer_file=TOKENIZER_FILE, tokenizer_sha256=sha256_file(out / TOKENIZER_FILE),
                vocab_size=tok.vocab_size, eos_id=tok.eos_id, pad_id=tok.pad_id, dtype=dtype.name,
                n_records=len(records), has_text=cfg.keep_text, has_continuations=bool(cfg.continuation_field),
                shards=entries))
        summary = dict(records=len(records), shards=len(entries), seconds=time.perf_counter() - t0)
        log.info("prepared %s: %d prompt records in %d shards", out, summary["records"], summary["shards"])
    return comm.broadcast_object(summary)
