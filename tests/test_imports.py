"""How hpcllm's modules import each other: no circles and no import of a layer above
(scripts/import_cycles.py reads the source, function-level imports included), and the commands
people run on login nodes never import torch (seconds each, on a shared node).

The layers, lowest first (hpcllm/parallel/__init__.py writes them down):
    comm < model < parallel < train < infer < jobs < launch < cli
Each package's cli.py registers its commands and belongs to the cli layer."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

KNOWN: list[set[str]] = []  # circles allowed for now: none
LAYERS = ["hpcllm.comm", "hpcllm.model", "hpcllm.parallel", "hpcllm.train", "hpcllm.infer", "hpcllm.jobs",
          "hpcllm.launch"]
# the submitit task's entry point runs the command line in the job's process, as `srun hpcllm` does
ENTRY_POINTS = {("hpcllm.launch.submit", "hpcllm.cli")}


def _import_cycles():
    spec = importlib.util.spec_from_file_location("import_cycles", REPO / "scripts" / "import_cycles.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_no_import_circles():
    """Every import a module can run (function-level ones included) and, separately, those too that
    only a type checker reads: no circle beyond the known one."""
    ic = _import_cycles()
    for type_checking in (False, True):
        found = ic.cycles(ic.import_graph(REPO / "hpcllm", type_checking=type_checking))
        extra = [c for c in found if not any(set(c) <= known for known in KNOWN)]
        assert not extra, f"import circle(s){' (type checking)' if type_checking else ''}: {extra}"


def _layer(mod: str) -> int | None:
    if mod.endswith(".cli") or mod in ("hpcllm.cli", "hpcllm.bench") or mod.startswith("hpcllm.bench."):
        return len(LAYERS)  # the commands: the top
    return next((i for i, p in enumerate(LAYERS) if mod == p or mod.startswith(p + ".")), None)


def test_no_layer_imports_one_above_it():
    ic = _import_cycles()
    upward = []
    for mod, targets in ic.import_graph(REPO / "hpcllm").items():
        for t in targets:
            a, b = _layer(mod), _layer(t)
            if a is not None and b is not None and b > a and (mod, t) not in ENTRY_POINTS:
                upward.append((mod, t))
    assert not upward, f"imports of a layer above: {sorted(upward)}"
    # the check can fail: a function-level import is an edge like any other
    assert "hpcllm.model.hf" in ic.import_graph(REPO / "hpcllm")["hpcllm.parallel.materialize"]


def test_the_cycle_finder_finds_a_circle(tmp_path):
    """The check above can fail: a function-level import that closes a circle is found, one under
    TYPE_CHECKING only when asked for."""
    ic = _import_cycles()
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.a import x\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import d\n")
    (pkg / "d.py").write_text("import pkg.c\n")
    assert ic.cycles(ic.import_graph(pkg)) == [["pkg.a", "pkg.b"]]
    assert ic.cycles(ic.import_graph(pkg, type_checking=True)) == [["pkg.a", "pkg.b"], ["pkg.c", "pkg.d"]]


# Each command in this one process, in turn: its exit code and whether torch (or transformers) had
# been imported by then. sbatch --test-only is skipped (shutil.which finds no sbatch): Slurm's own
# verdict needs a controller, and it is a subprocess that cannot import anything into this one.
LOGIN_COMMANDS = r"""
import contextlib, io, json, shutil, sys
shutil.which = lambda *a, **k: None
from hpcllm.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        code = main(argv)
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
    out.append([argv[0], code, len(printed.getvalue()), heavy[:3]])
print(json.dumps(out))
"""


def test_login_node_commands_import_no_torch(tmp_path):
    """`hpcllm config`, `render`, `submit --dry-run` of each job kind and `plan` read specs and print
    scripts or figures: importing torch would cost them seconds (`plan` counts the model from its
    config, hpcllm.model.shapes; a model.init directory's from its config.json)."""
    (tmp_path / "ds").mkdir()  # an input that exists is all a dry run checks
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(
        {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "hidden_size": 32, "intermediate_size": 64, "max_position_embeddings": 64,
         "vocab_size": 99, "tie_word_embeddings": True}))
    common = [f"run_dir={tmp_path / 'run'}"]
    train = ["jobs/train_tiny.yaml", f"data.dataset={tmp_path / 'ds'}"] + common
    infer = ["jobs/infer_generate.yaml", f"infer.prompts={tmp_path / 'ds'}", f"infer.model={tmp_path / 'ds'}"] + common
    prepare = ["jobs/prepare_stdlib.yaml", f"data.dataset={tmp_path / 'out'}"] + common
    argvs = [["config", *train], ["render", *train], ["render", *infer], ["render", *prepare],
             ["submit", "--dry-run", *train], ["submit", "--dry-run", *infer], ["submit", "--dry-run", *prepare],
             ["plan", *train, "model.vocab_size=512", "--world", "8", "parallel.tp=2", "parallel.pp=2",
              "train.grad_accum=2", "parallel.shard=full", "--memory-per-rank", "1GiB"],
             ["plan", "jobs/train_llama_tiny.yaml", *common, f"model.init={hf}", "--world", "4", "parallel.tp=2"]]
    p = subprocess.run([sys.executable, "-c", LOGIN_COMMANDS, json.dumps(argvs)], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads(p.stdout.splitlines()[-1])
    assert [r[:2] for r in results] == [[a[0], 0] for a in argvs], p.stderr[-3000:]
    assert all(printed > 100 for _, _, printed, _ in results)  # each printed its spec, script or plan
    assert all(heavy == [] for *_, heavy in results), results
