"""Reading token datasets: `open_dataset` (validated at open) and `TokenLoader` (rank-aware batches).

Windows of seq_len+1 tokens sit on a grid of slots (slot k starts at epoch_shift + k*(seq_len+1)).
Each epoch visits the slots in an order fixed by (seed, epoch) — a permutation in `random` mode, in
order in `sequential` mode — and micro-step s takes the next world_size*batch_size slots: rank r
the r-th block of batch_size. So windows are disjoint across ranks (and within an epoch), the union
over ranks is exactly what one process with the global batch would read, and the position
(epoch, slots consumed) is the whole loader state: resume continues at exactly the next batch.
An epoch is a whole number of optimizer steps of `global_batch` slots, and the position is counted
in slots: a run resumed on another number of ranks (the same global batch, another accumulation)
reads exactly the slots the first run would have read next.

Shards are contiguous uncompressed HDF5 datasets, memory-mapped at their file offset: a random
1025-token window is one memcpy, as fast as a raw .bin memmap.
"""

from __future__ import annotations

import logging
import queue
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
import numpy as np
import torch

from hpcllm.data.shards import first_out_of_vocab, member, open_token_manifest, out_of_vocab, read_manifest
from hpcllm.errors import DataError

log = logging.getLogger("hpcllm.data")

# h5py chunk cache for the fallback (chunked) read path: 64 MiB, a prime number of slots
RDCC_NBYTES = 64 << 20
RDCC_NSLOTS = 10007


@dataclass
class _Shard:
    path: Path
    start: int  # global offset in the split
    n_tokens: int
    offset: int | None = None  # byte offset of /tokens in the file when contiguous (memory-mappable)
    array: np.ndarray | None = None


class Dataset:
    """A prepared token dataset, checked when opened — the manifest's numbers (each split's size is
    what its shards hold, shards tile it), every shard inside the dataset directory and present with
    its size, dtype, vocab, token count and attributes, its tokens stored in the file as declared —
    so a bad dataset fails here, naming the file, not mid-training. These checks read metadata only;
    the token ids themselves are checked as they are read (one max over each read, or over each of
    the loader's batches), and all of them at once by `hpcllm data verify`."""

    def __init__(self, path: str | Path, *, checksum: bool = False):
        self.path = Path(path)
        self.manifest = man = open_token_manifest(self.path, checksum=checksum)
        self.vocab_size, self.eos_id, self.pad_id = man["vocab_size"], man["eos_id"], man["pad_id"]
        self.tokenizer_id, self.dtype = man["tokenizer"], np.dtype(man["dtype"])
        # the largest id the vocabulary has; None when the token type cannot hold a larger one
        self._max_id = self.dtype.type(self.vocab_size - 1) if self.vocab_size - 1 < np.iinfo(self.dtype).max else None
        self._shards: dict[str, list[_Shard]] = {}
        for e in sorted(man["shards"], key=lambda e: e["token_offset"]):
            sh = _Shard(member(self.path, e["path"], "shard"), e["token_offset"], e["n_tokens"])
            sh.offset = _contiguous_offset(sh.path)
            self._shards.setdefault(e["split"], []).append(sh)
        # HDF5 is touched here, on the opening thread, and then only through np.memmap — unless a
        # shard is chunked/compressed: those are read with h5py, and then only from one thread
        self.h5py_reads = any(sh.offset is None for shards in self._shards.values() for sh in shards)

    @property
    def splits(self) -> list[str]:
        return [s for s, v in self.manifest["splits"].items() if v["n_tokens"] > 0]

    def num_tokens(self, split: str) -> int:
        return self.manifest["splits"].get(split, {}).get("n_tokens", 0)

    def read(self, split: str, start: int, length: int, *, check: bool = True) -> np.ndarray:
        """tokens[start:start+length] of a split's stream (may span shards): only what the shards
        hold, and only ids inside the vocabulary — anything else is a DataError naming the shard.
        check=False leaves the ids to the caller (`ids_ok`: one max over a whole batch)."""
        n = self.num_tokens(split)
        if start < 0 or length < 0 or start + length > n:
            raise DataError(f"{self.path}: tokens [{start}, {start + length}) of split '{split}', which holds {n}")
        out = np.empty(length, dtype=self.dtype)
        pos, end, filled = start, start + length, 0
        for sh in self._shards.get(split, []):
            if sh.start + sh.n_tokens <= pos or sh.start >= end:
                continue
            lo, hi = pos - sh.start, min(end, sh.start + sh.n_tokens) - sh.start
            piece = out[filled : filled + hi - lo]
            piece[:] = self._array(sh)[lo:hi]
            # the model indexes its embedding with these: an id past it is named here, not an
            # IndexError (or a device-side assert) inside the forward pass. One max per window.
            if check and self._max_id is not None and piece.size and piece.max() > self._max_id:
                raise DataError(out_of_vocab(sh.path, *first_out_of_vocab(piece, self.vocab_size, start=lo),
                                             self.vocab_size))
            filled += hi - lo
            pos = sh.start + hi
            if pos >= end:
                break
        if filled != length:  # the manifest's shards tile the split (checked at open): never reached
            raise DataError(f"{self.path}: split '{split}' has no shard for tokens [{pos}, {end})")
        return out

    def ids_ok(self, tokens: np.ndarray) -> bool:
        """Every id in tokens is inside the vocabulary (one max)."""
        return self._max_id is None or not tokens.size or not tokens.max() > self._max_id

    def _array(self, sh: _Shard) -> np.ndarray:
        # mapped lazily, in the process that reads: no mapping or HDF5 handle crosses a fork
        if sh.array is None:
            if sh.offset is not None:
                try:
                    sh.array = np.memmap(sh.path, dtype=self.dtype, mode="r", offset=sh.offset, shape=(sh.n_tokens,))
                except (OSError, ValueError) as e:
                    raise DataError(f"{sh.path}: cannot be read ({e})") from None
            else:  # a shard rewritten chunked/compressed by another tool: slower, still correct
                import h5py

                f = h5py.File(sh.path, "r", rdcc_nbytes=RDCC_NBYTES, rdcc_nslots=RDCC_NSLOTS)
                sh.array = f["tokens"]
        return sh.array


def _contiguous_offset(path: Path) -> int | None:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            d = f["tokens"]
            offset = d.id.get_offset()
            return offset if d.chunks is None and d.compression is None and offset is not None else None
    except (OSError, KeyError) as e:
        raise DataError(f"{path}: unreadable HDF5 shard ({e})") from None


def open_dataset(path: str | Path, *, checksum: bool = False) -> Dataset:
    return path if isinstance(path, Dataset) else Dataset(path, checksum=checksum)


def load_tokenizer(dataset: str | Path):
    """The tokenizer a dataset was made with (checked against the manifest's identity)."""
    from hpcllm.data.tokenizer import load_tokenizer_file

    d = Path(dataset.path if isinstance(dataset, Dataset) else dataset)
    man = read_manifest(d)
    path = member(d, man.get("tokenizer_file"), "tokenizer_file")
    tok = load_tokenizer_file(path)
    if tok.identity != man["tokenizer"]:
        raise DataError(f"{path}: tokenizer is {tok.identity}, manifest says {man['tokenizer']}")
    return tok


class TokenLoader:
    def __init__(self, dataset, split: str = "train", *, seq_len: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, mode: str = "random", device="cpu", prefetch: int = 2,
                 global_batch: int = 0):
        self.ds = open_dataset(dataset)
        if split not in self.ds.manifest["splits"] or self.ds.num_tokens(split) == 0:
            raise DataError(f"{self.ds.path}: split '{split}' is empty or missing (splits: {self.ds.splits})")
        if mode not in ("random", "sequential"):
            raise ValueError(f"mode must be random or sequential, got {mode!r}")
        self.split, self.seq_len, self.B = split, seq_len, batch_size
        self.rank, self.world, self.seed, self.mode = rank, world_size, seed, mode
        self.device = torch.device(device)
        self.window = seq_len + 1
        self.per_step = world_size * batch_size
        self.global_batch = global_batch or self.per_step  # slots per optimizer step
        if self.global_batch % self.per_step:
            raise ValueError(f"global batch {self.global_batch} is not a multiple of {world_size} x {batch_size}")
        n = self.ds.num_tokens(split)
        self.slots = (n - 1) // self.window if mode == "random" else n // self.window
        if self.slots < self.global_batch:
            raise DataError(
                f"{self.ds.path}: split '{split}' has {n} tokens, too few for a global batch of "
                f"{self.global_batch} x {self.window}-token windows ({world_size} rank(s) x batch {batch_size})"
            )
        # micro-steps per epoch: whole optimizer steps only, the same epochs on any number of ranks
        self.steps_per_epoch = (self.slots // self.global_batch) * (self.global_batch // self.per_step)
        self.epoch, self.step_in_epoch = 0, 0
        # chunked shards are read through h5py, which must stay on one thread: no prefetch thread
        self.prefetch = 0 if self.ds.h5py_reads else prefetch
        self._order: tuple[int, np.ndarray | None, int] | None = None
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -- position and state ------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The position in slots (windows) — the same on any number of ranks — and what fixes the order."""
        return dict(epoch=self.epoch, slot=self.step_in_epoch * self.per_step, global_batch=self.global_batch,
                    seed=self.seed, seq_len=self.seq_len, split=self.split, mode=self.mode,
                    world_size=self.world, batch_size=self.B)

    def load_state_dict(self, state: dict) -> None:
        if "slot" not in state:
            raise DataError("cannot resume the loader: its position was saved by an earlier hpcllm (per rank, not "
                            "in slots); start a new run_dir (model.init can start from an exported model)")
        for k in ("global_batch", "seq_len", "split", "mode", "seed"):
            if state.get(k) != getattr(self, k):
                raise DataError(f"cannot resume the loader: checkpoint has {k}={state.get(k)!r}, this run "
                                f"{getattr(self, k)!r}")
        slot = int(state["slot"])
        if slot % self.per_step:
            raise DataError(f"cannot resume the loader: position {slot} is not a multiple of {self.world} rank(s) x "
                            f"batch {self.B}")
        self._stop_prefetch()
        self.epoch, self.step_in_epoch = int(state["epoch"]), slot // self.per_step

    # -- batches ------------------------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> tuple[np.ndarray | None, int]:
        if self._order is None or self._order[0] != epoch:
            if self.mode == "random":
                rng = np.random.default_rng([self.seed, epoch])
                # move the slot grid by a random offset each epoch, within the tokens left over
                spare = self.ds.num_tokens(self.split) - self.slots * self.window
                shift = int(rng.integers(0, min(spare, self.window - 1) + 1))
                self._order = (epoch, rng.permutation(self.slots), shift)
            else:
                self._order = (epoch, None, 0)
        return self._order[1], self._order[2]

    def _make_batch(self, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        perm, shift = self._epoch_order(epoch)
        first = step * self.per_step + self.rank * self.B
        if perm is None:  # consecutive slots: one contiguous read
            starts = [first * self.window]
            buf = self.ds.read(self.split, starts[0], self.B * self.window, check=False).reshape(self.B, self.window)
        else:
            starts = [shift + int(s) * self.window for s in perm[first : first + self.B]]
            buf = np.stack([self.ds.read(self.split, s, self.window, check=False) for s in starts])
        if not self.ds.ids_ok(buf):  # one max per batch; the checked reads name the shard and position
            for s in starts:
                self.ds.read(self.split, s, buf.size if perm is None else self.window)
            raise DataError(f"{self.ds.path}: a token id outside the vocabulary of {self.ds.vocab_size} in split "
                            f"'{self.split}'")  # the checked reads above name it first
        t = torch.from_numpy(buf.astype(np.int64))
        x, y = t[:, :-1], t[:, 1:]
        if self.device.type == "cuda":
            x, y = x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x, y

    def _advance(self, epoch: int, step: int) -> tuple[int, int]:
        step += 1
        return (epoch + 1, 0) if step >= self.steps_per_epoch else (epoch, step)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prefetch <= 0:
            batch = self._make_batch(self.epoch, self.step_in_epoch)
        else:
            if self._thread is None:
                self._start_prefetch()
            batch = self._take()
        self.epoch, self.step_in_epoch = self._advance(self.epoch, self.step_in_epoch)
        return batch

    def _take(self):
        """The next prefetched batch. Never waits on a worker that has died: the queue is polled and
        the worker's liveness checked, so a lost worker is an error, not a hang. (A worker that is
        alive but slow is timed by the caller: the trainer marks this wait for the stall watchdog.)"""
        while True:
            try:
                item = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise DataError(f"{self.ds.path}: the prefetch thread of split '{self.split}' died without "
                                    "a batch or an error") from None
                continue
            if isinstance(item, BaseException):
                self._stop_prefetch()
                raise item
            return item

    def batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first n batches of the split (sequential evaluation), independent of the position."""
        n = min(n, self.steps_per_epoch)
        return [self._make_batch(0, s) for s in range(n)]

    # -- background prefetch ------------------------------------------------------------------
    def _start_prefetch(self) -> None:
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.prefetch)
        epoch, step = self.epoch, self.step_in_epoch

        q, stop = self._queue, self._stop

        def put(item) -> bool:  # False once asked to stop: never blocks on a full queue for good
            while not stop.is_set():
                try:
                    q.put(item, timeout=_POLL_S)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            e, s = epoch, step
            try:
                while put(self._make_batch(e, s)):
                    e, s = self._advance(e, s)
            except BaseException as exc:  # surfaces in next_batch on the main thread
                put(exc)

        self._thread = threading.Thread(target=work, name="hpcllm-prefetch", daemon=True)
        self._thread.start()
        _LIVE.add(self)

    def _stop_prefetch(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            # the worker only reads memory maps and checks the stop flag every _POLL_S
            thread.join(timeout=30)
            if thread.is_alive():
                log.warning("the prefetch thread of %s did not stop within 30 s", self.ds.path)
            self._queue = None
        _LIVE.discard(self)

    def close(self) -> None:
        self._stop_prefetch()


_POLL_S = 0.1
# Loaders with a running prefetch thread are stopped when the interpreter starts to exit, before any
# atexit handler (MPI_Finalize, h5py's cleanup) runs: a daemon thread still reading when those run
# is frozen mid-call at finalization, which can deadlock the exit. (threading's own exit hook runs
# before atexit; concurrent.futures uses it for the same reason.)
_LIVE: "weakref.WeakSet[TokenLoader]" = weakref.WeakSet()


def _stop_all_prefetch() -> None:
    for ld in list(_LIVE):
        ld.close()


threading._register_atexit(_stop_all_prefetch)
