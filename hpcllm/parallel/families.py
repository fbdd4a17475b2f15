"""Each model family's tensor-parallel split, written as data: which linear layers split their
outputs (column) or inputs (row) over the tp ranks, the vocabulary-split embedding and head, and
with `sequence_parallel` which norms run on sequence slices and which modules gather the whole
sequence. `tp_plan` turns it into the {module path: style} that `parallelize_module` applies
(hpcllm.parallel.styles); `tp_split_dim` reads from the same table which dimension of each
parameter is split — without torch, for `hpcllm plan` (hpcllm.parallel.estimate).

The models themselves know nothing of parallelism; this is the one place a family's module names
meet the parallel layer (the pipeline asks the model for its pieces: `CausalLM.embed`,
`block_inputs`, `head`, `embedding_modules`, `head_modules`).

Adding a family: one entry in TP_LAYOUTS (keyed by `model.arch`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class TpLayout:
    column: tuple[str, ...]  # in each block: output features split (weight rows and bias)
    row: tuple[str, ...]  # in each block: input features split (weight columns; the bias whole)
    embedding: str  # the token embedding: split by vocabulary rows
    head: str  # the output head: split by vocabulary rows of its weight (the logits' columns)
    # sequence parallel: the norms in each block and after the blocks that run on sequence slices,
    # the block modules whose input is gathered whole, and the modules whose output is sliced
    block_norms: tuple[str, ...] = ()
    gathered: tuple[str, ...] = ()
    final_norms: tuple[str, ...] = ()
    sliced: tuple[str, ...] = ()


TP_LAYOUTS: dict[str, TpLayout] = {
    # sequence parallel: LayerNorms (weight and bias) on sequence slices, attention and the MLP on whole
    # sequences; every rank looks up all positions alike and keeps its slice to add to its tokens' slice
    "gpt2": TpLayout(column=("attn.c_attn", "mlp.c_fc"), row=("attn.c_proj", "mlp.c_proj"),
                     embedding="transformer.wte", head="lm_head", block_norms=("ln_1", "ln_2"),
                     gathered=("attn", "mlp"), final_norms=("transformer.ln_f",), sliced=("transformer.wpe",)),
    # sequence parallel: RMSNorms on sequence slices; attention gathers the whole sequence first, so the
    # rotary cos/sin of every position (computed whole in forward) apply to q and k as on one rank
    "llama": TpLayout(column=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
                              "mlp.up_proj"), row=("self_attn.o_proj", "mlp.down_proj"),
                      embedding="model.embed_tokens", head="lm_head",
                      block_norms=("input_layernorm", "post_attention_layernorm"), gathered=("self_attn", "mlp"),
                      final_norms=("model.norm",)),
}


def tp_plan(model, vocab_parallel: bool, sequence_parallel: bool = False) -> dict:
    """The tensor-parallel plan of `model`'s family (NotImplementedError for a family without one)."""
    from hpcllm.model.shapes import blocks_path
    from hpcllm.parallel.styles import block_plan, sequence_plan, vocab_plan

    arch = model.config.arch
    if arch not in TP_LAYOUTS:
        raise NotImplementedError(f"{type(model).__name__} (arch {arch}) has no tensor-parallel plan: add one to "
                                  "hpcllm/parallel/families.py")
    t, sp = TP_LAYOUTS[arch], sequence_parallel
    block = block_plan(column=t.column, row=t.row, sequence_parallel=sp)
    if sp:
        block.update(sequence_plan(norms=t.block_norms, gathered=t.gathered))
    blocks = blocks_path(model)
    plan = {**vocab_plan(t.embedding, t.head, vocab_parallel, sequence_parallel=sp),
            **{f"{blocks}.{i}.{k}": v for i in range(model.config.n_layer) for k, v in block.items()}}
    if sp:
        plan.update(sequence_plan(norms=t.final_norms, sliced=t.sliced))
    return plan


def tp_split_dim(arch: str, blocks: str, name: str) -> int | None:
    """The dimension of parameter `name` that tensor parallelism splits (None: whole on every tp
    rank): a column layer's output features (its weight's rows, and its bias), a row layer's input
    features (its weight's columns; its bias is added after the sum over the tp ranks, so whole),
    the embedding's and the head's vocabulary rows. `blocks`: the path of the model's blocks."""
    t = TP_LAYOUTS.get(arch)
    if t is None:
        return None
    module, _, kind = name.rpartition(".")
    if module in (t.embedding, t.head):
        return None if kind == "bias" and module == t.embedding else 0
    inner = re.fullmatch(rf"{re.escape(blocks)}\.\d+\.(.+)", module)
    if inner and inner.group(1) in t.column:
        return 0
    if inner and inner.group(1) in t.row:
        return None if kind == "bias" else 1
    return None
