"""`hpcllm demo` / `make demo`: the embedded default, start to finish, nothing downloaded.

1. prepare this Python's standard library sources as a byte-level dataset (runs/data/stdlib)
2. train a tiny GPT on 2 MPI ranks on the CPU for a few minutes
3. plot the run (train and val loss, throughput) to RUN_DIR/training.png
4. sample from the trained model with the inference engine
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from hpcllm.errors import HpcllmError

PREPARE = {
    "kind": "prepare", "name": "demo_prepare", "run_dir": "runs/demo_prepare",
    "data": {"inputs": ["stdlib:"], "include": ["*.py"], "dataset": "runs/data/stdlib", "tokenizer": "byte",
             "exclude": ["site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__",
                         "ensurepip", "tkinter", "pydoc_data"],
             "val_fraction": 0.05, "shard_tokens": 4_000_000},
}


def train_spec(run_dir: str) -> dict:
    return {
        "kind": "train", "name": "demo", "run_dir": run_dir,
        "dist": {"backend": "auto", "timeout_s": 300, "bucket_mb": 1},
        "data": {"dataset": "runs/data/stdlib"},
        "model": {"size": "tiny"},
        "train": {"max_steps": 800, "batch_size": 8, "seq_len": 256, "lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 40,
                  "eval_interval": 100, "eval_batches": 8, "log_interval": 20, "ckpt_interval": 200},
    }


def run_demo(ranks: int, run_dir: str, overrides: list[str]) -> int:
    from hpcllm.comm import DistConfig, detect_world, init_comm
    from hpcllm.config import load_spec
    from hpcllm.data.prepare import prepare
    from hpcllm.log import setup_logging

    setup_logging(0)
    if detect_world().size > 1:
        raise HpcllmError("run `hpcllm demo` itself, not under mpirun/srun: it starts its own ranks")
    ds = Path(PREPARE["data"]["dataset"])
    if not (ds / "manifest.json").exists():
        print(f"[demo 1/4] preparing the embedded corpus (Python {sys.version.split()[0]} stdlib sources) -> {ds}")
        comm = init_comm(DistConfig(backend="single"))
        prepare(load_spec(None, base=PREPARE).data, comm)
    else:
        print(f"[demo 1/4] dataset {ds} already prepared")
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    spec_path = Path(run_dir) / "demo_train.yaml"
    spec_path.write_text(yaml.safe_dump(train_spec(run_dir), sort_keys=False))
    spec = load_spec(spec_path, overrides)  # validate the overrides here, before starting ranks
    print(f"[demo 2/4] training a {spec.model.size} GPT on {ranks} MPI rank(s): {spec.train.max_steps} steps "
          f"of {ranks}x{spec.train.batch_size}x{spec.train.seq_len} tokens (spec: {spec_path})")
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "hpcllm.cli", "train", str(spec_path), *overrides]
    if ranks > 1:
        cmd = ["mpirun", "-np", str(ranks), "--oversubscribe", "--bind-to", "none", *cmd]
    rc = subprocess.call(cmd, env=env)
    if rc != 0:
        raise HpcllmError(f"demo training exited with status {rc} (logs: {run_dir}/logs/)")
    from hpcllm.train.metrics import read_metrics
    from hpcllm.train.plot import plot_run

    recs = read_metrics(run_dir)
    vals = [(r["step"], r["val_loss"]) for r in recs if r.get("val_loss") is not None]
    print(f"[demo 3/4] train loss {recs[0]['loss']:.3f} (step {recs[0]['step']}) -> {recs[-1]['loss']:.3f} "
          f"(step {recs[-1]['step']}); val loss " + " -> ".join(f"{v:.3f}" for _, v in vals))
    print(f"           plot: {plot_run(run_dir)}")
    print("[demo 4/4] a sample from the model (greedy would repeat itself; temperature 0.8, top-k 40):")
    print(sample(run_dir, spec.train.sample_prompt, 300))
    return 0


def sample(run_dir: str, prompt: str, n_tokens: int, temperature: float = 0.8, seed: int = 0) -> str:
    from hpcllm.data import load_tokenizer
    from hpcllm.infer.engine import Engine
    from hpcllm.infer.sampling import SamplingParams
    from hpcllm.checkpoint import load_trained_model

    model, cfg, dataset = load_trained_model(run_dir)
    tok = load_tokenizer(dataset)
    n_tokens = min(n_tokens, cfg.block_size - len(tok.encode(prompt)))
    engine = Engine(model, max_batch_size=1, pad_id=tok.pad_id)
    res = engine.generate([tok.encode(prompt)], [0], SamplingParams(max_new_tokens=n_tokens, temperature=temperature,
                                                                     top_k=40, seed=seed, stop_token_ids=[tok.eos_id]))
    return prompt + tok.decode(res[0].tokens)
