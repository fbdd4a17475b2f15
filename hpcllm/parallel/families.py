"""Each model family's tensor-parallel plan: {module path: style} for `parallelize_module`, written
with hpcllm.parallel.styles — which linear layers split their outputs (column) or inputs (row) over
the tp ranks, and with `sequence_parallel` which norms run on sequence slices and which modules
gather the whole sequence. The models themselves know nothing of parallelism; this is the one
place a family's module names meet the parallel layer (the pipeline asks the model for its pieces:
`CausalLM.embed`, `block_inputs`, `head`, `embedding_modules`, `head_modules`).

Adding a family: one function below and one entry in TP_PLANS (keyed by `model.arch`).
"""

from __future__ import annotations

from collections.abc import Callable

from hpcllm.parallel.styles import block_plan, sequence_plan, vocab_plan


def gpt2_tp_plan(model, vocab_parallel: bool, sequence_parallel: bool = False) -> dict:
    sp = sequence_parallel
    block = block_plan(column=("attn.c_attn", "mlp.c_fc"), row=("attn.c_proj", "mlp.c_proj"), sequence_parallel=sp)
    if sp:  # LayerNorms (weight and bias) on sequence slices; attention and the MLP on whole sequences
        block.update(sequence_plan(norms=("ln_1", "ln_2"), gathered=("attn", "mlp")))
    plan = {**vocab_plan("transformer.wte", "lm_head", vocab_parallel, sequence_parallel=sp),
            **{f"transformer.h.{i}.{k}": v for i in range(model.config.n_layer) for k, v in block.items()}}
    if sp:  # every rank looks up all positions alike and keeps its slice to add to its tokens' slice
        plan.update(sequence_plan(norms=("transformer.ln_f",), sliced=("transformer.wpe",)))
    return plan


def llama_tp_plan(model, vocab_parallel: bool, sequence_parallel: bool = False) -> dict:
    sp = sequence_parallel
    block = block_plan(column=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
                               "mlp.up_proj"), row=("self_attn.o_proj", "mlp.down_proj"), sequence_parallel=sp)
    if sp:  # RMSNorms on sequence slices; attention gathers the whole sequence first, so the rotary
        # cos/sin of every position (computed whole in forward) apply to q and k as on one rank
        block.update(sequence_plan(norms=("input_layernorm", "post_attention_layernorm"),
                                   gathered=("self_attn", "mlp")))
    plan = {**vocab_plan("model.embed_tokens", "lm_head", vocab_parallel, sequence_parallel=sp),
            **{f"model.layers.{i}.{k}": v for i in range(model.config.n_layer) for k, v in block.items()}}
    if sp:
        plan.update(sequence_plan(norms=("model.norm",)))
    return plan


TP_PLANS: dict[str, Callable[..., dict]] = {"gpt2": gpt2_tp_plan, "llama": llama_tp_plan}


def tp_plan(model, vocab_parallel: bool, sequence_parallel: bool = False) -> dict:
    """The tensor-parallel plan of `model`'s family (NotImplementedError for a family without one)."""
    arch = model.config.arch
    if arch not in TP_PLANS:
        raise NotImplementedError(f"{type(model).__name__} (arch {arch}) has no tensor-parallel plan: add one to "
                                  "hpcllm/parallel/families.py")
    return TP_PLANS[arch](model, vocab_parallel, sequence_parallel)
