"""ZeRO-1 (`parallel.shard: optimizer`): each rank keeps and updates 1/N of the optimizer state.

Every parameter is cut along its first dimension as `torch.chunk` cuts it (rank r owns rows
[r*c, (r+1)*c), c = ceil(rows / N); the last ranks may own fewer or none) — the layout of a DTensor
with placement Shard(0), so a checkpoint of this state is resharded by torch.distributed.checkpoint
like FSDP2's.

Gradients still go into the flat bucket buffers of the gradient sync (hpcllm.parallel.grad_sync), and
when a bucket is complete during backward, instead of an allreduce:

    copy-in         the bucket's gradients, rank-major: [rank 0's rows of p1, p2, ...][rank 1's rows ...],
                    into one of two staging buffers the buckets take in turn
    reduce-scatter  this rank receives the sum of its own rows (then / N: the mean over ranks)
    step            AdamW on this rank's rows only (parameters that are views of those rows)
    all-gather      every rank's updated rows, copied back into the full parameters

Communication volume equals one allreduce (a reduce-scatter plus an all-gather); the optimizer state
and the optimizer step are 1/N. Weight decay follows the model's own parameter groups.

`Zero1Parts` is the same over the data-parallel ranks of a device mesh, for the plans whose
parameters are tensor-parallel DTensors or a pipeline stage's (hpcllm.parallel.tensor, .pipeline):
each parameter's *local part* is cut along its first dimension over the dp ranks, and the
reduce-scatters start after backward (as those plans' own dp allreduce does), bucket by bucket.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hpcllm.comm import Communicator
from hpcllm.parallel.grad_sync import Bucket, GradSync
from hpcllm.parallel.parts import local_tensor


@dataclass
class _Piece:
    """This rank's rows of one parameter, and where all ranks' rows sit in its bucket's buffers."""

    name: str
    param: torch.nn.Parameter
    local: torch.Tensor  # what is cut: the parameter's values on this rank (a DTensor's local part)
    rows: int  # c: rows per rank (padded: the last ranks' chunks may be short or empty)
    lo: int
    hi: int  # this rank owns rows lo..hi-1
    width: int  # elements per row
    offset: int  # where the piece starts in a rank's part of the bucket
    shard: torch.nn.Parameter | None = None  # the optimizer's parameter: a view of rows lo..hi-1

    @property
    def span(self) -> int:
        return self.rows * self.width


class _ShardedState:
    """What both ZeRO-1s share: the pieces and the staging slots of `self.buckets` (each with
    .params, in the order their gradients are complete), the optimizer over this rank's rows, the
    rank-major copies, clipping, and the step with its all-gather — over `self.comm` (every rank of
    the job for Zero1; the dp ranks of a mesh for Zero1Parts)."""

    comm: Communicator
    buckets: list

    def _shard(self, names: dict, full_optimizer) -> None:
        n, r = self.comm.size, self.comm.rank
        self.pieces: dict[torch.nn.Parameter, _Piece] = {}
        for b in self.buckets:
            b.pieces, offset = [], 0
            for p in b.params:
                local = local_tensor(p.data)
                d0 = local.shape[0] if local.dim() else 1
                c = math.ceil(d0 / n)
                lo, hi = min(r * c, d0), min((r + 1) * c, d0)
                piece = _Piece(names[p], p, local, c, lo, hi, local.numel() // max(d0, 1), offset)
                b.pieces.append(piece)
                self.pieces[p] = piece
                offset += piece.span
            b.span = offset
            ref = local_tensor(b.params[0].data)
            b.shard = torch.zeros(offset, device=ref.device, dtype=ref.dtype)  # my rows
            for piece in b.pieces:
                if piece.hi > piece.lo:
                    rows = piece.local.view(-1, piece.width)[piece.lo : piece.hi]
                    piece.shard = torch.nn.Parameter(rows.view(piece.hi - piece.lo, *piece.local.shape[1:]))
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
            ref = self.buckets[slot].shard
            self._slots.append(torch.zeros(by_slot[slot], device=ref.device, dtype=ref.dtype))
        for b in self.buckets:
            b.send = self._slots[b.slot][: n * b.span]  # a view: the slot, as this bucket lays it out
        self._slot_user: dict[int, object] = {}  # the bucket whose collective last used each slot
        # the model's own groups (weight decay on matrices only, ...) over this rank's rows
        groups = []
        for g in full_optimizer.param_groups:
            shards = [self.pieces[p].shard for p in g["params"] if p in self.pieces and self.pieces[p].shard is not None]
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": shards})
        self.optimizer = type(full_optimizer)(groups)  # each group carries every setting (lr, betas, ...)

    # -- rank-major layout -------------------------------------------------------------------
    def _ranks_view(self, b, piece: _Piece) -> torch.Tensor:
        """(N, rows, width) view of `piece` in the rank-major buffer b.send."""
        k = b.shard.numel()
        return b.send.view(self.comm.size, k)[:, piece.offset : piece.offset + piece.span].view(
            self.comm.size, piece.rows, piece.width)

    def _rank_rows(self, piece: _Piece, d0: int):
        """(rank, lo, hi): the rows of a d0-row parameter each rank owns (torch.chunk's cut)."""
        for r in range(self.comm.size):
            yield r, min(r * piece.rows, d0), min((r + 1) * piece.rows, d0)

    def _copy_in(self, b) -> None:
        for piece in b.pieces:
            dst = self._ranks_view(b, piece)
            if piece.param.grad is None:  # a parameter this rank's backward never reached: zero
                dst.zero_()
                continue
            src = local_tensor(piece.param.grad).reshape(-1, piece.width)  # (in the parameter's layout)
            if piece.rows * self.comm.size == src.shape[0]:  # an even cut: one copy
                dst.copy_(src.view_as(dst))
                continue
            for r, lo, hi in self._rank_rows(piece, src.shape[0]):
                dst[r, : hi - lo].copy_(src[lo:hi])
                dst[r, hi - lo :].zero_()

    def _copy_out(self, b) -> None:
        with torch.no_grad():
            for piece in b.pieces:
                src, dst = self._ranks_view(b, piece), piece.local.view(-1, piece.width)
                if piece.rows * self.comm.size == dst.shape[0]:
                    dst.copy_(src.reshape(dst.shape))
                    continue
                for r, lo, hi in self._rank_rows(piece, dst.shape[0]):
                    dst[lo:hi].copy_(src[r, : hi - lo])

    def _take_slot(self, b) -> None:
        """Before b writes its staging slot: the earlier bucket's collective on it is done (its
        all-gathered rows copied out first, in step())."""
        prev = self._slot_user.get(b.slot)
        if prev is not None and prev is not b and prev.work is not None:
            prev.work.wait()  # (idempotent: finish() waits on it again for free)
        self._slot_user[b.slot] = b

    def _reduce_scatter(self, b):
        self._take_slot(b)
        self._copy_in(b)
        return self.comm.reduce_scatter(b.shard, b.send, "sum", async_op=True)

    # -- clipping, step, all-gather ------------------------------------------------------------
    def _clip(self, sq: torch.Tensor, allreduce, max_norm: float) -> float:
        """Scale every bucket's rows so that the norm sqrt(allreduce(sq)) is at most `max_norm`."""
        allreduce(sq)
        norm = sq.sqrt()
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for b in self.buckets:
            b.shard.mul_(coef.to(b.shard.dtype))
        return float(norm.item())

    def step(self) -> None:
        self.optimizer.step()
        in_flight: list = []

        def land(b) -> None:  # every rank's updated rows of b, back into the parameters
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
        """Bytes of the buffers ZeRO-1 adds to the gradients (the two rank-major staging slots,
        this rank's rows of every bucket)."""
        return (sum(t.numel() * t.element_size() for t in self._slots)
                + sum(b.shard.numel() * b.shard.element_size() for b in self.buckets))


class Zero1(GradSync, _ShardedState):
    """The gradient sync and the optimizer of ZeRO-1 in one: `finish()` leaves this rank's rows of
    the mean gradient in `self.optimizer`'s parameters; `step()` updates them and all-gathers."""

    def __init__(self, model: torch.nn.Module, comm: Communicator, bucket_mb: float, full_optimizer):
        super().__init__(list(model.parameters()), comm, bucket_mb)
        self._shard({p: name for name, p in model.named_parameters()}, full_optimizer)

    # -- the gradient sync's collective: reduce-scatter ----------------------------------------
    def _launch(self, b: Bucket):
        return self._reduce_scatter(b)

    def _complete(self, b: Bucket) -> None:
        b.shard.div_(self.comm.size)

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip the (global) gradient norm as torch.nn.utils.clip_grad_norm_ does for the whole
        model: the squared norms of every rank's rows are summed in one small allreduce."""
        sq = torch.zeros(1, device=self.comm.device, dtype=torch.float32)
        for b in self.buckets:
            sq += b.shard.float().pow(2).sum()
        return self._clip(sq, lambda t: self.comm.allreduce(t, "sum"), max_norm)


class _PartBucket:
    def __init__(self, params: list[torch.nn.Parameter]):
        self.params, self.work = params, None


class Zero1Parts(_ShardedState):
    """ZeRO-1 over `comm`, the data-parallel ranks of a mesh, for parameters that are parts: a
    tensor-parallel DTensor's local part, or a pipeline stage's parameters. `finish()` (after
    backward, with the parameters' own gradients complete) reduce-scatters them bucket by bucket
    and frees them; `step()` updates this rank's rows and all-gathers them.

    `copies[p]`: how many ranks of the world hold each row of p's part (tensor parallelism
    replicates the norms over its tp ranks); `clip_grad_norm` counts every element once."""

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], comm: Communicator, bucket_mb: float,
                 full_optimizer, copies: dict[torch.nn.Parameter, int]):
        self.comm, self.copies = comm, copies
        limit, size, current = int(bucket_mb * 2**20), 0, []
        self.buckets: list[_PartBucket] = []
        for _, p in reversed([(n, p) for n, p in named_params if p.requires_grad]):  # backward's order
            local = local_tensor(p.data)
            if current and (size >= limit or local_tensor(current[-1].data).dtype != local.dtype):
                self.buckets.append(_PartBucket(current))
                current, size = [], 0
            current.append(p)
            size += local.numel() * local.element_size()
        if current:
            self.buckets.append(_PartBucket(current))
        self._shard({p: name for name, p in named_params}, full_optimizer)

    def finish(self) -> None:
        """Each bucket's gradients reduce-scattered (two staging slots in turn), then / N."""
        for i, b in enumerate(self.buckets):
            b.work = self._reduce_scatter(b)
            b.work.label = f"bucket {i + 1}/{len(self.buckets)}"
            for p in b.params:
                p.grad = None  # copied into the slot: this rank's rows come back in b.shard
        for b in self.buckets:
            b.work.wait()
            b.work = None
            b.shard.div_(self.comm.size)

    def clip_grad_norm(self, max_norm: float, skip=frozenset()) -> float:
        """The whole model's gradient norm from every rank's rows — each divided by its copies,
        those of the parameters in `skip` (counted by another rank: a tied weight) left out — summed
        over the world in one allreduce."""
        import torch.distributed as dist

        sq = torch.zeros((), device=self.comm.device, dtype=torch.float32)
        for piece in self.pieces.values():
            if piece.shard is not None and piece.param not in skip:
                sq += piece.shard.grad.float().pow(2).sum() / self.copies.get(piece.param, 1)
        return self._clip(sq, dist.all_reduce, max_norm)


def sharded_optim_state(zero: _ShardedState, model, layout) -> dict:
    """A ZeRO-1's optimizer state by parameter name: each moment this rank's rows of it as a DTensor
    of the whole parameter — `layout(p)` gives its (mesh, placements): Shard(0) over the ranks of
    the ZeRO-1, with a tensor-parallel parameter's own placement beside it — for DCP to reshard."""
    from torch.distributed.tensor import DTensor

    optim = {}
    for name, p in model.named_parameters():
        piece = zero.pieces[p]
        st = zero.local_state(piece)
        if not st:  # before the first step: zeros to load into (AdamW's own initial state)
            rows = (piece.hi - piece.lo,) + tuple(piece.local.shape[1:])
            st = {"step": torch.zeros((), dtype=torch.float32),
                  "exp_avg": torch.zeros(rows, dtype=piece.local.dtype, device=piece.local.device),
                  "exp_avg_sq": torch.zeros(rows, dtype=piece.local.dtype, device=piece.local.device)}
        mesh, placements = layout(p)
        optim[name] = {"step": st["step"], **{
            k: DTensor.from_local(st[k], mesh, placements, run_check=False, shape=p.shape, stride=p.stride())
            for k in ("exp_avg", "exp_avg_sq")}}
    return optim


def adopt_sharded_optim_state(zero: _ShardedState, model, state: dict) -> None:
    """After an in-place load into a tree from `sharded_optim_state`: its rows become the state of
    this rank's shards."""
    for name, p in model.named_parameters():
        piece = zero.pieces[p]
        if piece.shard is not None:
            st = state["optim"][name]
            zero.optimizer.state[piece.shard] = {"step": st["step"], "exp_avg": st["exp_avg"].to_local(),
                                                 "exp_avg_sq": st["exp_avg_sq"].to_local()}
