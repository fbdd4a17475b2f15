"""Which KV-cache blocks are free, which rows hold which, and which prompt prefixes the pool holds.

A prompt's full blocks are named by a chained digest of its tokens (block i's name covers tokens
0 .. (i+1)*BS-1, so equal names mean equal prefixes, not only equal blocks). A row admitted with a
prompt whose first blocks are already held takes those blocks read-only and computes only the rest;
the blocks it computes are named at admission, so rows admitted in the same step share them too
(their keys are written in the same prefill forward, layer by layer before any row reads that
layer). A block nobody holds any more but that names a prefix is kept, least recently used first
out, until its memory is needed: a system prompt is computed once per job, not once per batch.

The pool starts small and doubles when a block is needed and none is free or evictable, up to
`max_blocks` (every row at its largest: it never has to refuse). Block 0 is the scratch block
(hpcllm.model.paged.SCRATCH) and never handed out.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from hpcllm.model.paged import SCRATCH, PagedKVCache


class BlockPool:
    def __init__(self, cache: PagedKVCache, max_blocks: int, share_prefixes: bool = True):
        self.cache, self.max_blocks, self.share_prefixes = cache, max_blocks, share_prefixes
        self.block_size = cache.block_size
        self.refs = [0] * cache.n_blocks
        self.free = list(range(cache.n_blocks - 1, SCRATCH, -1))  # popped from the end: low ids first
        self.name_of: dict[int, bytes] = {}
        self.block_named: dict[bytes, int] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()  # named, held by no row; oldest first
        self.held = 0  # blocks held by at least one row
        self.peak_held = 0
        self.reused_tokens = 0  # prompt tokens taken from the pool instead of computed
        self.pending: set[int] = set()  # blocks named since the last `written()`: their keys are not in yet

    # ------------------------------------------------------------------------------- names
    def names(self, prompt: list[int]) -> list[bytes]:
        """The names of the prompt's full blocks, in order."""
        out, h, bs = [], b"", self.block_size
        for i in range(len(prompt) // bs):
            h = hashlib.blake2b(h + array("q", prompt[i * bs : (i + 1) * bs]).tobytes(), digest_size=16).digest()
            out.append(h)
        return out

    # ------------------------------------------------------------------------------- a row
    def reads_pending(self, prompt: list[int]) -> bool:
        """Whether the prompt would share a block whose keys the next forward is still to write. The
        engine admits such a row a step later: sharing within one forward is correct (each layer
        writes before it reads), but the row that writes the prefix is long and the rows that share
        it short, and one forward pads them all to the longest."""
        if not self.pending:
            return False
        for name in self.names(prompt)[: (len(prompt) - 1) // self.block_size]:
            b = self.block_named.get(name)
            if b is None:
                return False
            if b in self.pending:
                return True
        return False

    def written(self) -> None:
        """The forward that computes the admitted rows' prompts has run."""
        self.pending.clear()

    def admit(self, prompt: list[int], reuse_before: int | None = None) -> tuple[list[int], int]:
        """Blocks for a new row's prompt and how many of its tokens they already hold: a multiple of
        the block size, at most `reuse_before` (tokens from there on are computed, for their logits;
        by default the prompt's last token)."""
        names = self.names(prompt) if self.share_prefixes else []
        usable = (len(prompt) - 1 if reuse_before is None else reuse_before) // self.block_size
        blocks: list[int] = []
        for name in names[:usable]:
            b = self.block_named.get(name)
            if b is None:
                break
            self._hold(b)
            blocks.append(b)
        cached = len(blocks) * self.block_size
        self.reused_tokens += cached
        while len(blocks) * self.block_size < len(prompt):
            b = self.allocate()
            if len(blocks) < len(names):  # a full block of the prompt: name it for later rows
                name = names[len(blocks)]
                if name not in self.block_named:
                    self.block_named[name], self.name_of[b] = b, name
                    self.pending.add(b)
            blocks.append(b)
        return blocks, cached

    def allocate(self) -> int:
        if not self.free:
            if self.evictable:
                b, _ = self.evictable.popitem(last=False)
                del self.block_named[self.name_of.pop(b)]
                self.free.append(b)
            else:
                self._grow()
        b = self.free.pop()
        self._hold(b)
        return b

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self.held -= 1
                if b in self.name_of:
                    self.evictable[b] = None
                else:
                    self.free.append(b)

    def _hold(self, b: int) -> None:
        if self.refs[b] == 0:
            self.evictable.pop(b, None)
            self.held += 1
            self.peak_held = max(self.peak_held, self.held)
        self.refs[b] += 1

    def _grow(self) -> None:
        old = self.cache.n_blocks
        new = min(self.max_blocks, 2 * old)
        if new <= old:  # cannot happen while max_blocks covers every row at its largest
            raise RuntimeError(f"KV cache pool exhausted at {old} blocks")
        self.cache.grow(new)
        self.refs.extend([0] * (new - old))
        self.free = list(range(new - 1, old - 1, -1)) + self.free

    def forget_prefixes(self) -> None:
        """Drop every evictable named block (the pool's memory is kept)."""
        for b in self.evictable:
            del self.block_named[self.name_of.pop(b)]
            self.free.append(b)
        self.evictable.clear()
        self.pending.clear()
