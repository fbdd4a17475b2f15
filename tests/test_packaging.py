"""setup.py and environment.yml must name the same dependencies, so conda and pip installs can't drift."""

import ast
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
CONDA_NAMES = {"pytorch": "torch"}  # conda-forge name -> PyPI name
CONDA_ONLY = {"python", "pip", "openmpi"}  # the interpreter and the MPI mpi4py is built with


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _setup_lists() -> tuple[set, set]:
    tree = ast.parse((REPO / "setup.py").read_text())
    values = {
        t.id: ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign)
        for t in node.targets
        if isinstance(t, ast.Name) and t.id in ("INSTALL_REQUIRES", "EXTRAS_REQUIRE")
    }
    return {_name(r) for r in values["INSTALL_REQUIRES"]}, {_name(r) for r in values["EXTRAS_REQUIRE"]["dev"]}


def _conda_lists() -> tuple[set, set]:
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    conda, pip = set(), set()
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            pip |= {_name(d) for d in dep["pip"]}
        else:
            n = _name(dep)
            conda.add(CONDA_NAMES.get(n, n))
    return conda - CONDA_ONLY, pip


def test_environment_yml_matches_setup_py():
    runtime, dev = _setup_lists()
    conda, pip = _conda_lists()
    assert conda | pip == runtime | dev, (
        f"only in setup.py: {sorted((runtime | dev) - (conda | pip))}; "
        f"only in environment.yml: {sorted((conda | pip) - (runtime | dev))}"
    )
    assert "mpi4py" in conda


def test_torch_is_pinned_in_both():
    tree = (REPO / "setup.py").read_text()
    pin = re.search(r'"torch==([\d.]+)"', tree).group(1)
    env = (REPO / "environment.yml").read_text()
    assert f"pytorch={pin}" in env
