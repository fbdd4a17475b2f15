"""What the inference job tests share: tiny models, prompt datasets, specs, running the CLI on 1 or N
ranks, and reading outputs back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import torch

from tests.cli_session import CLI, CliSession  # noqa: F401 (CliSession: for the test modules)
from tests.mpi_util import mpi_env, run_mpi



def tiny_model(out: Path, seed: int = 3, vocab: int = 258) -> Path:
    from hpcllm.model import ModelConfig, build_model, save_hf_model

    model = build_model(ModelConfig(size="custom", n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=vocab).resolve())
    save_hf_model(model.init_weights(seed), out)
    return out


def constant_model(out: Path, favourites: dict[int, float]) -> Path:
    """A model whose next-token logits are the same after any input: the final layer norm's weight
    is 0, so every hidden state is its bias b, and logits = wte @ b. Token t gets logit
    `favourites[t]`, every other token about 0 — e.g. {0: 10} always generates byte 0 (NUL)."""
    from hpcllm.model import ModelConfig, build_model, save_hf_model

    model = build_model(ModelConfig(size="custom", n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=258).resolve())
    model.init_weights(1)
    with torch.no_grad():
        b = torch.zeros(32)
        b[0] = 1.0
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(b)
        model.transformer.wte.weight[:, 0] = 0.0
        for t, logit in favourites.items():
            model.transformer.wte.weight[t, 0] = logit
    save_hf_model(model, out)
    return out


def prepare_prompts(root: Path, records: list[dict], per_shard: int = 3, name: str = "prompts", cli=None,
                    **data) -> subprocess.CompletedProcess:
    """`hpcllm prepare` of JSONL records ({"id", "prompt"[, "cont"]}) into root/name; `cli`: what runs
    the command (a CliSession's run), else a process of its own."""
    (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    d = {"inputs": [str(root / f"{name}.jsonl")], "output": "prompts", "text_field": "prompt", "id_field": "id",
         "prompts_per_shard": per_shard, "dataset": str(root / name), **data}
    spec = root / f"prep-{name}.yaml"
    spec.write_text(json.dumps({"kind": "prepare", "run_dir": str(root / f"prep-{name}"), "data": d}))
    if cli is not None:
        return cli("prepare", spec)
    return subprocess.run([*CLI, "prepare", str(spec)], capture_output=True, text=True, timeout=120)


def infer_spec(root: Path, name: str, **infer) -> Path:
    """An infer job spec root/NAME.yaml (run_dir root/NAME); `model` and `prompts` are required."""
    i = {"max_new_tokens": 12, "temperature": 0.9, "top_k": 20, "seed": 4, "batch_size": 4,
         **{k: str(v) if isinstance(v, Path) else v for k, v in infer.items()}}
    p = root / f"{name}.yaml"
    p.write_text(json.dumps({"kind": "infer", "name": name, "run_dir": str(root / name), "infer": i}))
    return p


def run_cli(*args, n: int = 1, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """`hpcllm ARGS` on one process, or on n ranks under mpirun."""
    cmd = [*CLI, *map(str, args)]
    if n == 1:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    return run_mpi(n, cmd, timeout=timeout, env=env)


def run_torchrun(*args, n: int = 2, timeout: float = 120) -> subprocess.CompletedProcess:
    """`hpcllm ARGS` on n workers started by torchrun (no MPI at all)."""
    env = {k: v for k, v in mpi_env().items() if not k.startswith(("OMPI_", "PMIX_"))}
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", f"--nproc-per-node={n}", "-m", "hpcllm.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def outputs(run_dir: Path) -> dict:
    """record id -> generated tokens (generate) or rounded log-prob sum (score), from the manifest's shards."""
    out = {}
    man = json.loads((Path(run_dir) / "outputs" / "manifest.json").read_text())
    for e in man["shards"]:
        with h5py.File(Path(run_dir) / "outputs" / e["path"]) as f:
            off = f["offsets"][:]
            for j, rid in enumerate(f["ids"][:]):
                if "tokens" in f:
                    out[int(rid)] = f["tokens"][off[j] : off[j + 1]].tolist()
                else:
                    out[int(rid)] = round(float(f["logprob_sum"][j]), 4)
    return out


def output_texts(run_dir: Path) -> dict[int, bytes]:
    out = {}
    for p in sorted((Path(run_dir) / "outputs").glob("out-*.h5")):
        with h5py.File(p) as f:
            data, off = f["text"][:].tobytes(), f["text_offsets"][:]
            for j, rid in enumerate(f["ids"][:]):
                out[int(rid)] = data[off[j] : off[j + 1]]
    return out


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))


def model_and_prompts(root: Path, records: list[dict], cli, per_shard: int = 3) -> Path:
    """`root/model` (tiny_model) and `root/prompts` (the records prepared in shards of `per_shard`)."""
    tiny_model(root / "model")
    p = prepare_prompts(root, records, per_shard=per_shard, cli=cli)
    assert p.returncode == 0, p.stderr
    return root
