"""The training tests' corpus: real Python source (the stdlib's email package, ~30 files, a few
hundred KB), prepared into a dataset with the byte tokenizer."""

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
