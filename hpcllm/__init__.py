"""hpcllm: data-parallel GPT training and batched offline inference on MPI/Slurm clusters."""

import os

__version__ = "0.1.0"

# Let torch's CPU allocator back large tensors with transparent huge pages, as numpy already does:
# measured here, a 16 MB MPI allreduce on a torch tensor was 15% slower than on a numpy array
# without it (TLB misses in the shared-memory copy), and equal with it. Read lazily by torch.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
