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


def test_torch_has_the_same_range_in_both():
    spec = re.search(r'"torch([<>=!,.\d]+)"', (REPO / "setup.py").read_text()).group(1)
    assert f"pytorch{spec}" in (REPO / "environment.yml").read_text()


def test_torch_is_a_range_in_setup_py_and_pinned_only_where_the_makefile_installs():
    tree = ast.parse((REPO / "setup.py").read_text())
    requires = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                    and any(isinstance(t, ast.Name) and t.id == "INSTALL_REQUIRES" for t in n.targets))
    torch_req = next(r for r in requires if _name(r) == "torch")
    # a cluster's CUDA torch of another minor version must satisfy it: no exact pin, an upper bound
    assert "==" not in torch_req and ">=" in torch_req and "<" in torch_req.replace("<=", "<"), torch_req
    from packaging.requirements import Requirement

    spec = Requirement(torch_req).specifier
    assert all(v in spec for v in ("2.13.0", "2.14.1", "2.15.0")) and "2.16.0" not in spec, torch_req
    pins = [line for line in (REPO / "constraints.txt").read_text().splitlines() if line.startswith("torch==")]
    assert pins and pins[0].split("==")[1] in spec
    assert "-c constraints.txt" in (REPO / "Makefile").read_text()
