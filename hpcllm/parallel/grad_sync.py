"""Bucketed gradient allreduce overlapped with the backward pass — one mechanism for every backend.

Gradients live in flat bucket buffers (each parameter's .grad is a view into its bucket, so nothing
is copied). Buckets hold parameters in reverse order, the order backward produces their gradients.
A post-accumulate-grad hook counts each bucket's gradients; when a bucket is complete its allreduce
is launched asynchronously through the communicator, in bucket order on every rank (collectives
must be issued in the same order everywhere). `finish()` launches what is left, waits for all and
averages once (the plan times it: hpcllm.parallel.plans). On gradient-accumulation micro-steps
(`sync=False`) the hooks do nothing: no communication until the last micro-step. With one rank
there is nothing to synchronise: no buckets, no hooks, no collectives, and `zero_grad` frees the
gradients as a plain training loop does.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from hpcllm.comm import Communicator, Work


class Bucket:
    """A flat gradient buffer over some parameters (their .grad are views of it), and its collective."""

    def __init__(self, params: list[torch.nn.Parameter], device, dtype):
        self.params = params
        self.buffer = torch.zeros(sum(p.numel() for p in params), device=device, dtype=dtype)
        self.ready = 0
        self.work: Work | None = None


class GradSync:
    def __init__(self, params: list[torch.nn.Parameter], comm: Communicator, bucket_mb: float):
        self.comm = comm
        self.active = comm.size > 1
        self.sync = True
        self.params = params = [p for p in params if p.requires_grad]
        limit = int(bucket_mb * 2**20)
        self.buckets: list[Bucket] = []
        current: list[torch.nn.Parameter] = []
        size = 0
        for p in reversed(params if self.active else []):
            current.append(p)
            size += p.numel() * p.element_size()
            if size >= limit:
                self.buckets.append(Bucket(current, p.device, p.dtype))
                current, size = [], 0
        if current:
            self.buckets.append(Bucket(current, current[0].device, current[0].dtype))
        self._bucket_of = {}
        for i, b in enumerate(self.buckets):
            offset = 0
            for p in b.params:
                n = p.numel()
                p.grad = b.buffer[offset : offset + n].view_as(p)  # gradient as a bucket view
                self._bucket_of[p] = i
                offset += n
                p.register_post_accumulate_grad_hook(self._on_grad)
        self._next = 0  # next bucket to launch

    def broadcast_parameters(self, params: list[torch.Tensor], src: int = 0) -> None:
        """Make every rank start from rank `src`'s values (one broadcast per flat buffer)."""
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in params:
            by_dtype.setdefault(t.dtype, []).append(t)
        with torch.no_grad():
            for ts in by_dtype.values():
                flat = _flatten_dense_tensors([t.data for t in ts])
                self.comm.broadcast(flat, src)
                for t, v in zip(ts, _unflatten_dense_tensors(flat, ts)):
                    t.data.copy_(v)

    @contextmanager
    def no_sync(self):
        """Accumulation micro-steps: gradients accumulate locally, nothing is communicated."""
        self.sync = False
        try:
            yield
        finally:
            self.sync = True

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self.sync:
            return
        self.comm.progress()  # advance the buckets already in flight (MPI on CPU needs the calls)
        b = self.buckets[self._bucket_of[p]]
        b.ready += 1
        if b.ready == len(b.params):
            self._launch_ready()

    def _launch_ready(self) -> None:
        while self._next < len(self.buckets) and self.buckets[self._next].ready == len(self.buckets[self._next].params):
            b = self.buckets[self._next]
            b.work = self._launch(b)
            self._next += 1
            b.work.label = f"bucket {self._next}/{len(self.buckets)}"

    def _launch(self, b: Bucket) -> Work:
        """Start the bucket's collective (a subclass may reduce-scatter instead: hpcllm.parallel.zero)."""
        return self.comm.allreduce(b.buffer, "sum", async_op=True)

    def _complete(self, b: Bucket) -> None:
        """After the bucket's collective: the gradients are the mean over the ranks."""
        b.buffer.div_(self.comm.size)

    def finish(self) -> None:
        """Wait for every bucket (launching those whose gradients never came, e.g. unused
        parameters, whose gradient is zero) and average once."""
        if not self.active:
            return
        for b in self.buckets[self._next :]:
            b.ready = len(b.params)
        self._launch_ready()
        for b in self.buckets:
            b.work.wait()
            b.work, b.ready = None, 0
            self._complete(b)
        self._next = 0

    def zero_grad(self) -> None:
        if not self.active:
            for p in self.params:
                p.grad = None
            return
        for b in self.buckets:
            b.buffer.zero_()
