"""What every model family provides, so that the trainer, the inference engine and the checkpoints
never name an architecture:

    model = build_model(cfg)                    # hpcllm.model: the family's CausalLM, on the meta device or not
    logits, loss = model(idx, targets)          # training
    cache = model.new_paged_kv_cache(n_blocks, block_size, device, dtype)
    logits, _ = model(tokens, cache=cache, positions=pos, mask=mask)   # inference (hpcllm.infer.engine)

A family's forward is made of three pieces it defines — `embed` (tokens -> hidden), its blocks (with
`block_inputs`, what every block takes besides the hidden state) and `head` (hidden -> logits) — and
`CausalLM.forward` runs them in order, so a pipeline stage (hpcllm.parallel.stages), which runs a
slice of them, runs the same code as the whole model. And a `Family` (the module-level FAMILY of
each family file) maps the model to and from an HF directory: config.json fields and tensor names.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from hpcllm.model.attention import default_positions
from hpcllm.model.paged import PagedKVCache
from hpcllm.model.config import ModelConfig

# torch.nn.init's in-place fills (normal_, kaiming_uniform_, ones_, ...): what modules' constructors call
_INITIALIZERS = frozenset(getattr(nn.init, name) for name in nn.init.__all__ if name.endswith("_"))


class _SkipInitializers(TorchFunctionMode):
    """Returns a torch.nn.init fill's tensor untouched; every other call runs as asked."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _INITIALIZERS:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_device():
    """Modules built inside are on the meta device (shapes only) and their constructors' default
    initializers are skipped. On meta they compute nothing, but the first random fill imports
    torch._dynamo (its meta kernel is a Python reference behind torch._disable_dynamo): ~1.5 s of
    every inference rank's start, measured."""
    with torch.device("meta"), _SkipInitializers():
        yield


class CausalLM(nn.Module):
    """Base of every family's model: a decoder-only LM over `config`."""

    config: ModelConfig
    # train.activation_checkpointing: each block's activations are recomputed in backward instead
    # of kept (memory ~ one block's activations instead of n_layer's, for ~1/3 more compute)
    activation_checkpointing: bool = False
    tp_size: int = 1  # tensor-parallel ranks the model is split over (set when the parallel layer splits it)

    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, in order: the unit of FSDP sharding and activation checkpointing."""
        raise NotImplementedError

    # module paths of the pieces around the blocks: what a pipeline stage keeps only when it runs them
    embedding_modules: tuple[str, ...] = ()
    head_modules: tuple[str, ...] = ()

    def embed(self, idx: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) at `positions` (B or 1, T) -> the hidden state (B, T, n_embd)."""
        raise NotImplementedError

    def block_inputs(self, x: torch.Tensor, positions: torch.Tensor) -> tuple:
        """What every block takes after the hidden state, computed once per forward from the
        positions (Llama's rotary cos and sin); a pipeline stage recomputes it from its input."""
        return ()

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The hidden state -> logits (B, T, vocab): the final norm and the output projection."""
        raise NotImplementedError

    def forward(self, idx, targets=None, *, cache: PagedKVCache | None = None, positions=None, mask=None,
                logits_at: torch.Tensor | None = None):
        """idx (B, T) -> logits (B, T, vocab), loss (mean cross-entropy over targets != -1, or None).

        With the inference engine's `cache`, keys and values go where the cache says, and the engine
        gives each token's `positions` (B, T) and the `mask` of what it attends to (hpcllm.model.paged);
        without, the rows are whole sequences from position 0. `logits_at` (B, K): the
        positions of each row whose logits are wanted (B, K, vocab) — a prefill needs only its last
        token's, and the output projection over every position would cost a quarter of a small model's
        prefill."""
        if positions is None:
            positions = default_positions(idx, self.config.block_size)
        x = self.embed(idx, positions)
        extra = self.block_inputs(x, positions)
        for i, block in enumerate(self.blocks()):
            x = self.run_block(block, x, *extra, i, cache, mask)
        if logits_at is not None:
            x = x[torch.arange(x.shape[0], device=x.device)[:, None], logits_at]
        logits = self.head(x)
        return logits, self.loss(logits, targets)

    def run_block(self, block: nn.Module, *args):
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def tie_weights(self) -> None:
        """Share the output head with the token embedding when the config says so. Called at
        construction, and again after `to_empty` (materialising a model built on the meta device
        gives every parameter its own storage)."""

    def materialize(self, device) -> "CausalLM":
        """A model built on the meta device, given (uninitialised) storage on `device`."""
        # Module.to_empty, but with torch.empty: empty_like of a meta tensor runs a Python reference
        # that imports sympy (~0.5 s of every inference rank's start, measured)
        model = self._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))
        model.tie_weights()
        return model

    def lookup_only_parameters(self) -> list[nn.Parameter]:
        """Parameters used only as lookup tables (no matmul): left out of the FLOP count."""
        return []

    def init_weights(self, seed: int | None = None) -> "CausalLM":
        """N(0, 0.02) for matrices, residual output projections scaled by 1/sqrt(2 * n_layer)
        (GPT-2's scheme); zeros for biases; ones for norm weights."""
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, value in self.initial_values(seed):
                params[name].copy_(value)
        return self

    def initial_values(self, seed: int | None = None):
        """(name, whole initial value) for each parameter in turn (a tied one once), drawn on the CPU
        from one generator in the parameters' order. One value exists at a time: a model sharded
        (or cut into a pipeline stage) before it was materialised keeps each rank's part of the
        values it holds (hpcllm.parallel.materialize) and equals, part for part, the whole model
        `init_weights` gives on one rank."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        resid = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            shape = p.shape
            if len(shape) >= 2:
                std = resid if name.endswith(self.residual_projections) else 0.02
                value = torch.randn(shape, generator=gen, device="cpu").mul_(std)
            elif name.endswith("bias"):
                value = torch.zeros(shape, device="cpu")
            else:  # norm weights
                value = torch.ones(shape, device="cpu")
            yield name, value
            del value  # before the next is drawn: one whole value alive at a time

    residual_projections: tuple[str, ...] = ()  # parameter name suffixes scaled down at init

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - sum(p.numel() for p in self.lookup_only_parameters()) if non_embedding else n

    def estimate_flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6N plus attention (PaLM appendix B)."""
        c = self.config
        T = seq_len or c.block_size
        return 6 * self.num_params() + 12 * c.n_layer * c.n_head * c.head_dim * T

    def new_paged_kv_cache(self, n_blocks: int, block_size: int, device, dtype=torch.float32) -> PagedKVCache:
        c = self.config
        return PagedKVCache(c.n_layer, c.n_kv_head // self.tp_size, c.head_dim, n_blocks, block_size, device, dtype)

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor | None:
        """Mean cross-entropy over targets != -1 (in fp32 whatever the logits' dtype)."""
        if targets is None:
            return None
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    def configure_optimizer(self, weight_decay: float, lr: float, betas=(0.9, 0.95), fused: bool | None = None,
                            foreach: bool | None = None):
        """AdamW; weight decay on matrices only (not biases, norms); fused kernel on CUDA; `foreach`
        False: one parameter at a time (DTensor and plain parameters mixed)."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        if fused is None:
            fused = next(self.parameters()).is_cuda and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=bool(fused), foreach=foreach)


@dataclass(frozen=True)
class Family:
    """A family's model class and its HF mapping (see hpcllm/model/hf.py for the directory format)."""

    name: str
    model: type[CausalLM]
    # config.json (as a dict) -> ModelConfig; raises ValueError naming the field for what it refuses
    config_from_hf: Callable[[dict], ModelConfig]
    config_to_hf: Callable[[ModelConfig], dict]
    # HF tensor name -> ours (None: a tensor to skip, e.g. a rotary cache); ours -> HF
    name_from_hf: Callable[[str], str | None]
    name_to_hf: Callable[[str], str]
    # tensor as stored by HF -> ours, and back, given the model config (e.g. GPT-2's Conv1D weights
    # are transposed and its fused q/k/v rows reordered by head)
    tensor_from_hf: Callable[[str, torch.Tensor, ModelConfig], torch.Tensor] = lambda name, t, cfg: t
    tensor_to_hf: Callable[[str, torch.Tensor, ModelConfig], torch.Tensor] = lambda name, t, cfg: t
    # tensor as a single-file checkpoint of an earlier hpcllm stored it -> ours
    tensor_from_legacy: Callable[[str, torch.Tensor, ModelConfig], torch.Tensor] = lambda name, t, cfg: t
