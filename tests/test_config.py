"""Job specs: YAML -> typed dataclasses, overrides, and clear errors (exit code 2) for mistakes."""

import subprocess
import sys

import pytest

from hpcllm.config import JobSpec, apply_overrides, dump_spec, load_spec
from hpcllm.errors import ConfigError


def write(tmp_path, text, name="job.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_load_and_override(tmp_path):
    p = write(tmp_path, "kind: train\nname: t1\nrun_dir: runs/t1\ndist: {backend: mpi, timeout_s: 30}\n")
    spec = load_spec(p, ["dist.timeout_s=12", "train.max_steps=7", "name=007"])
    assert isinstance(spec, JobSpec)
    assert spec.kind == "train" and spec.name == "007"  # str fields keep the text as written
    assert spec.dist.backend == "mpi" and spec.dist.timeout_s == 12.0 and isinstance(spec.dist.timeout_s, float)
    assert spec.train.max_steps == 7
    assert spec.run_dir.startswith("/") and spec.run_dir.endswith("runs/t1")  # made absolute


def test_roundtrip_through_dump(tmp_path):
    p = write(tmp_path, "kind: infer\nname: x\n")
    spec = load_spec(p)
    again = load_spec(write(tmp_path, dump_spec(spec), "dumped.yaml"))
    assert again == spec


def test_name_defaults_to_file_stem(tmp_path):
    assert load_spec(write(tmp_path, "kind: prepare\n", "prep_abc.yaml")).name == "prep_abc"


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("kind: train\ndist: {backnd: mpi}\n", [], "unknown key 'dist.backnd' (did you mean 'dist.backend'?)"),
        ("kind: train\ntrian: {}\n", [], "unknown key 'trian' (did you mean 'train'?)"),
        ("kind: train\n", ["dist.timeout_s=soon"], "'dist.timeout_s' must be float, got str 'soon'"),
        ("kind: train\n", ["train.max_steps=1.5"], "'train.max_steps' must be int, got float 1.5"),
        ("kind: train\n", ["dist.backend=mpii"], "must be one of 'auto' | 'mpi' | 'torch' | 'horovod' | 'single', got 'mpii' (did you mean 'mpi'?)"),
        ("kind: trian\n", [], "'kind' must be one of"),
        ("name: x\n", [], "missing required key 'kind'"),
        ("kind: train\ndist: 3\n", [], "dist: expected a mapping, got int"),
        ("kind: train\n", ["dist.timeout_s=-1"], "dist: timeout_s must be > 0"),
        ("kind: train\n", ["nonsense"], "must look like key=value"),
        ("- a\n- b\n", [], "expected a mapping at top level"),
        ("kind: [\n", [], "not valid YAML"),
    ],
)
def test_errors_name_key_and_file(tmp_path, text, overrides, message):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_spec(p, overrides)
    assert message in str(e.value)
    assert str(p) in str(e.value) or "override" in str(e.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="job spec 'nope.yaml' not found"):
        load_spec("nope.yaml")


def test_override_creates_sections():
    data = apply_overrides({"kind": "train"}, ["train.max_steps=3", "dist.backend=torch"])
    assert data == {"kind": "train", "train": {"max_steps": 3}, "dist": {"backend": "torch"}}


def test_cli_config_prints_resolved_spec_and_exits_2_on_error(tmp_path):
    p = write(tmp_path, "kind: train\nname: cli\n")
    ok = subprocess.run([sys.executable, "-m", "hpcllm.cli", "config", str(p), "train.max_steps=5"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "max_steps: 5" in ok.stdout and "kind: train" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "hpcllm.cli", "config", str(p), "dist.bakend=mpi"],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert "unknown key 'dist.bakend' (did you mean 'dist.backend'?)" in bad.stderr
    assert "Traceback" not in bad.stderr
