"""The training tests' corpora, prepared into datasets with the byte tokenizer: real Python source
(the stdlib's email package, ~30 files, a few hundred KB), and a small synthetic one for the tests
that only need steps to take a while (Slurm, signals, run reports)."""

import json
import subprocess
import sys
from pathlib import Path


def prepare_python_corpus(root: Path, val_fraction: float) -> Path:
    import email

    corpus = root / "corpus"
    corpus.mkdir()
    for p in sorted(Path(email.__file__).parent.glob("*.py")):
        (corpus / p.name).write_text(p.read_text())
    spec = root / "prep.yaml"
    spec.write_text(json.dumps({"kind": "prepare", "run_dir": str(root / "prep"),
                                "data": {"inputs": [str(corpus)], "dataset": str(root / "ds"),
                                         "val_fraction": val_fraction}}))
    p = subprocess.run([sys.executable, "-m", "hpcllm.cli", "prepare", str(spec)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return root / "ds"


def prepare_small_corpus(root: Path) -> Path:
    """12 short synthetic documents (~30 KB), 20% of them for validation: root/ds."""
    corpus = root / "c"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"{i}.txt").write_text(f"document {i} " + "lorem ipsum dolor " * (150 + 7 * i))
    prep = root / "prep.yaml"
    prep.write_text(json.dumps({"kind": "prepare", "run_dir": str(root / "p"),
                                "data": {"inputs": [str(corpus)], "dataset": str(root / "ds"), "val_fraction": 0.2}}))
    p = subprocess.run([sys.executable, "-m", "hpcllm.cli", "prepare", str(prep)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return root / "ds"
