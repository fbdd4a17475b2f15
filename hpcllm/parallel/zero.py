"""ZeRO-1 (`parallel.shard: optimizer`): each rank keeps and updates 1/N of the optimizer state.

Every parameter is cut along its first dimension as `torch.chunk` cuts it (rank r owns rows
[r*c, (r+1)*c), c = ceil(rows / N); the last ranks may own fewer or none) — the layout of a DTensor
with placement Shard(0), so a checkpoint of this state is resharded by torch.distributed.checkpoint
like FSDP2's.

Gradients still go into the flat bucket buffers of the gradient sync (hpcllm.train.grad_sync), and
when a bucket is complete during backward, instead of an allreduce:

    copy-in         the bucket's gradients, rank-major: [rank 0's rows of p1, p2, ...][rank 1's rows ...],
                    into one of two staging buffers the buckets take in turn
    reduce-scatter  this rank receives the sum of its own rows (then / N: the mean over ranks)
    step            AdamW on this rank's rows only (parameters that are views of those rows)
    all-gather      every rank's updated rows, copied back into the full parameters

Communication volume equals one allreduce (a reduce-scatter plus an all-gather); the optimizer state
and the optimizer step are 1/N. Weight decay follows the model's own parameter groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hpcllm.comm import Communicator
from hpcllm.train.grad_sync import GradSync, _Bucket


@dataclass
class _Piece:
    """This rank's rows of one parameter, and where all ranks' rows sit in its bucket's buffers."""

    name: str
    param: torch.nn.Parameter
    rows: int  # c: rows per rank (padded: the last ranks' chunks may be short or empty)
    lo: int
    hi: int  # this rank owns rows lo..hi-1
    width: int  # elements per row
    offset: int  # where the piece starts in a rank's part of the bucket
    shard: torch.nn.Parameter | None = None  # the optimizer's parameter: a view of rows lo..hi-1

    @property
    def span(self) -> int:
        return self.rows * self.width


class Zero1(GradSync):
    """The gradient sync and the optimizer of ZeRO-1 in one: `finish()` leaves this rank's rows of
    the mean gradient in `self.optimizer`'s parameters; `step()` updates them and all-gathers."""

    def __init__(self, model: torch.nn.Module, comm: Communicator, bucket_mb: float, full_optimizer):
        super().__init__(list(model.parameters()), comm, bucket_mb)
        n, r = comm.size, comm.rank
        names = {p: name for name, p in model.named_parameters()}
        self.pieces: dict[torch.nn.Parameter, _Piece] = {}
        for b in self.buckets:
            b.pieces, offset = [], 0
            for p in b.params:
                d0 = p.shape[0] if p.dim() else 1
                c = math.ceil(d0 / n)
                lo, hi = min(r * c, d0), min((r + 1) * c, d0)
                piece = _Piece(names[p], p, c, lo, hi, p.numel() // max(d0, 1), offset)
                b.pieces.append(piece)
                self.pieces[p] = piece
                offset += piece.span
            b.span = offset
            b.shard = torch.zeros(offset, device=b.buffer.device, dtype=b.buffer.dtype)  # my rows
            for piece in b.pieces:
                if piece.hi > piece.lo:
                    rows = piece.param.data.view(-1, piece.width)[piece.lo : piece.hi]
                    piece.shard = torch.nn.Parameter(rows.view(piece.hi - piece.lo, *piece.param.shape[1:]))
                    piece.shard.grad = b.shard[piece.offset : piece.offset + rows.numel()].view_as(piece.shard)
        # The rank-major staging buffer each bucket's collective reads (reduce-scatter) or writes
        # (all-gather): two of them, used by the buckets in turn, sized for the largest bucket — a
        # bucket waits for the one two before it to finish with its slot. A buffer per bucket would
        # double the gradients' memory (N x its rows for every bucket), which is what ZeRO-1 saves.
        self._slots: list[torch.Tensor] = []
        by_slot: dict[int, int] = {}
        for i, b in enumerate(self.buckets):
            b.slot = i % 2
            by_slot[b.slot] = max(by_slot.get(b.slot, 0), n * b.span)
        for slot in sorted(by_slot):
            ref = self.buckets[slot].buffer
            self._slots.append(torch.zeros(by_slot[slot], device=ref.device, dtype=ref.dtype))
        for b in self.buckets:
            b.send = self._slots[b.slot][: n * b.span]  # a view: the slot, as this bucket lays it out
        self._slot_user: dict[int, _Bucket] = {}  # the bucket whose collective last used each slot
        # the model's own groups (weight decay on matrices only, ...) over this rank's rows
        groups = []
        for g in full_optimizer.param_groups:
            shards = [self.pieces[p].shard for p in g["params"] if self.pieces[p].shard is not None]
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": shards})
        self.optimizer = type(full_optimizer)(groups)  # each group carries every setting (lr, betas, ...)

    # -- rank-major layout -------------------------------------------------------------------
    def _ranks_view(self, b: _Bucket, piece: _Piece) -> torch.Tensor:
        """(N, rows, width) view of `piece` in the rank-major buffer b.send."""
        k = b.shard.numel()
        return b.send.view(self.comm.size, k)[:, piece.offset : piece.offset + piece.span].view(
            self.comm.size, piece.rows, piece.width)

    def _rank_rows(self, piece: _Piece, d0: int):
        """(rank, lo, hi): the rows of a d0-row parameter each rank owns (torch.chunk's cut)."""
        for r in range(self.comm.size):
            yield r, min(r * piece.rows, d0), min((r + 1) * piece.rows, d0)

    def _copy_in(self, b: _Bucket) -> None:
        for piece in b.pieces:
            dst, src = self._ranks_view(b, piece), piece.param.grad.view(-1, piece.width)
            if piece.rows * self.comm.size == src.shape[0]:  # an even cut: one copy
                dst.copy_(src.view_as(dst))
                continue
            for r, lo, hi in self._rank_rows(piece, src.shape[0]):
                dst[r, : hi - lo].copy_(src[lo:hi])
                dst[r, hi - lo :].zero_()

    def _copy_out(self, b: _Bucket) -> None:
        with torch.no_grad():
            for piece in b.pieces:
                src, dst = self._ranks_view(b, piece), piece.param.data.view(-1, piece.width)
                if piece.rows * self.comm.size == dst.shape[0]:
                    dst.copy_(src.reshape(dst.shape))
                    continue
                for r, lo, hi in self._rank_rows(piece, dst.shape[0]):
                    dst[lo:hi].copy_(src[r, : hi - lo])

    # -- the gradient sync's collective: reduce-scatter ----------------------------------------
    def _take_slot(self, b: _Bucket) -> None:
        """Before b writes its staging slot: the earlier bucket's collective on it is done (its
        all-gathered rows copied out first, in step())."""
        prev = self._slot_user.get(b.slot)
        if prev is not None and prev is not b and prev.work is not None:
            prev.work.wait()  # (idempotent: finish() waits on it again for free)
        self._slot_user[b.slot] = b

    def _launch(self, b: _Bucket):
        self._take_slot(b)
        self._copy_in(b)
        return self.comm.reduce_scatter(b.shard, b.send, "sum", async_op=True)

    def _complete(self, b: _Bucket) -> None:
        b.shard.div_(self.comm.size)

    # -- clipping, step, all-gather ------------------------------------------------------------
    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip the (global) gradient norm as torch.nn.utils.clip_grad_norm_ does for the whole
        model: the squared norms of every rank's rows are summed in one small allreduce."""
        sq = torch.zeros(1, device=self.comm.device, dtype=torch.float32)
        for b in self.buckets:
            sq += b.shard.float().pow(2).sum()
        self.comm.allreduce(sq, "sum")
        norm = sq.sqrt()
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for b in self.buckets:
            b.shard.mul_(coef.to(b.shard.dtype))
        return float(norm.item())

    def step(self) -> None:
        self.optimizer.step()
        in_flight: list[_Bucket] = []

        def land(b: _Bucket) -> None:  # every rank's updated rows of b, back into the parameters
            b.work.wait()
            b.work = None
            self._copy_out(b)

        for i, b in enumerate(self.buckets):  # my updated rows; every rank's, rank-major into b.send
            for piece in b.pieces:
                if piece.shard is not None:
                    b.shard[piece.offset : piece.offset + piece.shard.numel()].copy_(piece.shard.detach().view(-1))
            prev = self._slot_user.get(b.slot)
            if prev in in_flight:  # its slot is b's: land it first
                in_flight.remove(prev)
                land(prev)
            self._slot_user[b.slot] = b
            b.work = self.comm.all_gather(b.send, b.shard, async_op=True)
            b.work.label = f"bucket {i + 1}/{len(self.buckets)}"
            in_flight.append(b)
        for b in in_flight:
            land(b)
        # b.shard now holds parameters, not gradients: the next reduce-scatter overwrites it

    def local_state(self, piece: _Piece) -> dict[str, torch.Tensor] | None:
        return self.optimizer.state.get(piece.shard) if piece.shard is not None else None

    def communication_bytes(self) -> int:
        """Bytes of the buffers ZeRO-1 adds to the gradient buckets (the two rank-major staging
        slots, this rank's rows of every bucket)."""
        return (sum(t.numel() * t.element_size() for t in self._slots)
                + sum(b.shard.numel() * b.shard.element_size() for b in self.buckets))
