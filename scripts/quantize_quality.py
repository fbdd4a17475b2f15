"""What infer.quantize costs in quality, measured through `hpcllm infer` (docs/inference.md, "Quantized
weights"): score perplexity and greedy agreement of int8 and int4 against full precision.

    python scripts/quantize_quality.py MODEL WORK_DIR [--records 48] [--bytes 128] [--new 64]

MODEL: a model trained with hpcllm on a byte-tokenized corpus (a run dir). The text comes from this
Python's `test` package — left out of `hpcllm demo`'s corpus, so held out for a model trained on it:
each record is `--bytes` bytes of a file as the prompt and the next `--bytes` as the continuation to
score. Greedy agreement: the share of the `--new` generated tokens before a row's first difference
from full precision, averaged over the records, and the share of records that are identical.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import sysconfig
from pathlib import Path

import h5py


def records(n: int, size: int) -> list[dict]:
    files = sorted(Path(sysconfig.get_paths()["stdlib"], "test").glob("test_*.py"))
    out = []
    for f in files[:: max(1, len(files) // n)]:
        text = f.read_bytes().decode("utf-8", errors="ignore")
        mid = len(text) // 2  # past the imports and the licence header
        if len(text) >= 4 * size and len(out) < n:  # (a file of a few lines leaves nothing to score)
            out.append({"id": len(out), "prompt": text[mid:mid + size], "cont": text[mid + size:mid + 2 * size]})
    return out


def hpcllm(*args) -> None:
    p = subprocess.run([sys.executable, "-m", "hpcllm.cli", *map(str, args)], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"hpcllm {' '.join(map(str, args))} failed:\n{p.stderr[-3000:]}")


def read(run_dir: Path) -> dict[int, object]:
    out = {}
    for f in sorted((run_dir / "outputs").glob("out-*.h5")):
        with h5py.File(f) as h:
            ids = h["ids"][:]
            if "tokens" in h:
                off, toks = h["offsets"][:], h["tokens"][:]
                out.update({int(r): toks[off[j]:off[j + 1]].tolist() for j, r in enumerate(ids)})
            else:
                out.update({int(r): (float(s), int(n)) for r, s, n in zip(ids, h["logprob_sum"][:], h["n_tokens"][:])})
    return out


def prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("work")
    ap.add_argument("--records", type=int, default=48)
    ap.add_argument("--bytes", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records(a.records, a.bytes)))
    (work / "prep.json").write_text(json.dumps({"kind": "prepare", "run_dir": str(work / "prep"), "data": {
        "inputs": [str(work / "text.jsonl")], "output": "prompts", "text_field": "prompt", "id_field": "id",
        "continuation_field": "cont", "tokenizer": "byte", "dataset": str(work / "prompts")}}))
    hpcllm("prepare", work / "prep.json")
    res = {}
    for scheme in ("none", "int8", "int4"):
        for mode in ("generate", "score"):
            name = f"{mode}-{scheme}"
            (work / f"{name}.json").write_text(json.dumps({"kind": "infer", "run_dir": str(work / name), "infer": {
                "model": a.model, "prompts": str(work / "prompts"), "mode": mode, "quantize": scheme,
                "temperature": 0.0, "max_new_tokens": a.new, "batch_size": 16}}))
            hpcllm("infer", work / f"{name}.json", "--force")
            res[name] = read(work / name)
    ref = res["generate-none"]
    for scheme in ("none", "int8", "int4"):
        scores = res[f"score-{scheme}"].values()
        ppl = math.exp(-sum(s for s, _ in scores) / sum(n for _, n in scores))
        gen = res[f"generate-{scheme}"]
        agree = sum(prefix(gen[i], ref[i]) / max(len(ref[i]), 1) for i in ref) / len(ref)
        same = sum(gen[i] == ref[i] for i in ref) / len(ref)
        print(f"{scheme:5s} perplexity {ppl:.4f}  greedy agreement {agree:.3f} (tokens before the first difference), "
              f"{same:.3f} of records identical  [{len(ref)} records, {a.new} new tokens]")


if __name__ == "__main__":
    main()
