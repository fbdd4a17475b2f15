"""`hpcllm plan`'s report, line for line, as it was when it built the model on the meta device to
count it (before it counted from the config alone, without torch): the figures of a tp x pp plan of
a model.init directory, and of a plan that does not fit with the plans that would (plus, since, the
checkpoint-interval line)."""

import json
from pathlib import Path

from hpcllm.cli import main

REPO = Path(__file__).resolve().parents[2]
LLAMA_DIR = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 3,
             "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64, "intermediate_size": 160,
             "max_position_embeddings": 128, "vocab_size": 503, "rms_norm_eps": 1e-5}

HF_LLAMA_TP2_PP2 = """\
plan of train job 'train_tiny' on 8 rank(s): parallel.shard=none, tp=2, pp=2 -> mesh pp=2 x dp=2 x tp=2 (dist.backend torch)
  model: llama custom, 0.2M parameters, 3 layers, 4 heads (2 kv), vocabulary 503
  rank r = (pp_rank x 2 + dp_rank) x 2 + tp_rank: stage s on ranks [s*4, (s+1)*4); the 2 stages of a pipeline read the same batches, each stage's layers split over its tp groups of 2 adjacent ranks
  stage 0 (ranks 0..3): embedding, layers 0..1; 0.9 MiB of weights, gradients and AdamW state per rank
  stage 1 (ranks 4..7): layer 2, head and loss; 0.6 MiB of weights, gradients and AdamW state per rank
  schedule 1f1b: 4 micro-batch(es) per step, bubble (pp-1)/(micro-batches+pp-1) = 20% of each step idle per stage
  tp rank t holds query heads [t*2, (t+1)*2), kv heads [t*1, ...), 1/2 of every MLP and of the vocabulary rows; norms whole (logits split: loss_parallel)
  23 of 30 parameter tensors split over tp
  batch: 64 sequences/step = 2 data-parallel rank(s) x batch 8 x 4 micro-step(s); 16384 tokens/step
  memory per rank of stage 0 (rank 0) (estimate, fp32 weights + AdamW, activations not included): parameters 0.2 MiB, gradients 0.2 MiB, optimizer state 0.5 MiB; total 0.9 MiB (0.306x of one rank holding everything)
  fit in 1.00 GiB per rank: state 0.9 MiB + activations ~19.0 MiB (batch 8 x seq 256, fp32; estimate) = 19.9 MiB: FITS, margin 0.98 GiB (98%) for buffers, allocator slack and the CUDA context
  checkpoint interval (Young/Daly) on 4 node(s): needs a measured save time (metrics.jsonl's ckpt_s: a run that checkpointed at train.ckpt_interval) and a failure rate (train.node_mtbf_hours, or a run whose starts failed)
"""

GPT2_NO_BIAS_DOES_NOT_FIT = """\
plan of train job 'train_tiny' on 8 rank(s): parallel.shard=full, tp=2, pp=2 -> mesh pp=2 x dp=2 x tp=2 (dist.backend torch)
  model: gpt2 tiny, 0.5M parameters, 4 layers, 4 heads (4 kv), vocabulary 333
  rank r = (pp_rank x 2 + dp_rank) x 2 + tp_rank: stage s on ranks [s*4, (s+1)*4); the 2 stages of a pipeline read the same batches, each stage's layers split over its tp groups of 2 adjacent ranks
  stage 0 (ranks 0..3): embedding, layers 0..1; 1.3 MiB of weights, gradients and AdamW state per rank
  stage 1 (ranks 4..7): layers 2..3, head and loss; 1.1 MiB of weights, gradients and AdamW state per rank
  schedule 1f1b: 2 micro-batch(es) per step, bubble (pp-1)/(micro-batches+pp-1) = 33% of each step idle per stage; raise train.global_batch_size for more micro-batches
  tp rank t holds query heads [t*2, (t+1)*2), kv heads [t*2, ...), 1/2 of every MLP and of the vocabulary rows; norms whole (logits split: loss_parallel)
  parallel.shard=full: parameters, gradients and optimizer state sharded over the 2 data-parallel rank(s) of each stage
  17 of 27 parameter tensors split over tp
  batch: 32 sequences/step = 2 data-parallel rank(s) x batch 8 x 2 micro-step(s); 8192 tokens/step
  memory per rank of stage 0 (rank 0) (estimate, fp32 weights + AdamW, activations not included): parameters 0.3 MiB, gradients 0.3 MiB, optimizer state 0.7 MiB; total 1.3 MiB (0.158x of one rank holding everything)
  fit in 20.0 MiB per rank: state 1.3 MiB + activations ~35.3 MiB (batch 8 x seq 256, fp32; estimate) = 36.6 MiB: DOES NOT FIT, short by 16.6 MiB
  plans on 8 ranks that fit (same estimates; the fewest changes first):
    parallel.pp=1, train.activation_checkpointing=true: 14.9 MiB per rank
    parallel.tp=4, parallel.pp=1: 18.9 MiB per rank
    parallel.shard=none, parallel.tp=4: 19.2 MiB per rank
    parallel.shard=none, parallel.pp=1, train.activation_checkpointing=true: 18.2 MiB per rank
    parallel.shard=optimizer, parallel.pp=1, train.activation_checkpointing=true: 16.6 MiB per rank
"""


def test_a_plan_of_a_model_directory_prints_what_it_printed(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_DIR))
    code = main(["plan", str(REPO / "jobs/train_tiny.yaml"), f"run_dir={tmp_path / 'run'}", f"model.init={tmp_path}",
                 "--world", "8", "parallel.tp=2", "parallel.pp=2", "train.grad_accum=4", "--memory-per-rank", "1GiB"])
    assert code == 0
    assert capsys.readouterr().out == HF_LLAMA_TP2_PP2


def test_a_plan_that_does_not_fit_prints_what_it_printed(tmp_path, capsys):
    code = main(["plan", str(REPO / "jobs/train_tiny.yaml"), f"run_dir={tmp_path / 'run'}", "model.vocab_size=333",
                 "model.bias=false", "model.ffn_dim=200", "--world", "8", "parallel.tp=2", "parallel.pp=2",
                 "train.grad_accum=2", "parallel.shard=full", "--memory-per-rank", "20MiB"])
    out, err = capsys.readouterr()
    assert code == 2 and "the plan does not fit in 20.0 MiB per rank" in err
    assert out == GPT2_NO_BIAS_DOES_NOT_FIT
