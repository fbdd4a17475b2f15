"""`hpcllm bench data DATASET`: loader throughput beside a plain np.memmap of the same tokens.

The peer reads the split's tokens through np.memmap of a raw .bin copy (the nanoGPT way); hpcllm's
loader reads the HDF5 shards. Both draw the same random window starts; rounds alternate.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from hpcllm.data.loader import TokenLoader, open_dataset


def _rate(fn, seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += fn()
    return n / (time.perf_counter() - t0)


def main(args) -> int:
    ds = open_dataset(args.dataset)
    split = "train"
    n = ds.num_tokens(split)
    T, B = args.seq_len, args.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "tokens.bin"
        ds.read(split, 0, n).tofile(raw)  # the peer's format: one flat binary file
        mm = np.memmap(raw, dtype=ds.dtype, mode="r")
        rng = np.random.default_rng(0)

        def memmap_random() -> int:
            starts = rng.integers(0, n - T - 1, B)
            np.stack([mm[s : s + T + 1] for s in starts]).astype(np.int64)
            return B * (T + 1)

        seq_pos = [0]

        def memmap_seq() -> int:
            s = seq_pos[0]
            if s + B * (T + 1) > n:
                s = 0
            mm[s : s + B * (T + 1)].astype(np.int64).reshape(B, T + 1)
            seq_pos[0] = s + B * (T + 1)
            return B * (T + 1)

        loaders = {m: TokenLoader(ds, split, seq_len=T, batch_size=B, mode=m, prefetch=0) for m in ("random", "sequential")}

        def loader_fn(m):
            def f() -> int:
                loaders[m].next_batch()
                return B * (T + 1)
            return f

        print(f"# hpcllm bench data: {args.dataset} ({n:,} {split} tokens, {ds.dtype}), windows of {T + 1} tokens, batch {B}")
        print(f"# {'pattern':<11} {'np.memmap tok/s':>16} {'hpcllm tok/s':>14} {'ratio':>7}")
        for name, peer, ours in (("random", memmap_random, loader_fn("random")), ("sequential", memmap_seq, loader_fn("sequential"))):
            p_rates, o_rates = [], []
            for _ in range(3):
                p_rates.append(_rate(peer, args.seconds / 3))
                o_rates.append(_rate(ours, args.seconds / 3))
            p, o = statistics.median(p_rates), statistics.median(o_rates)
            print(f"  {name:<11} {p:>16,.0f} {o:>14,.0f} {o / p:>6.2f}x")
        for ld in loaders.values():
            ld.close()
    return 0
