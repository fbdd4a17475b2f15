"""Job specs: YAML -> typed dataclasses, overrides, and clear errors (exit code 2) for mistakes."""

import subprocess
import sys
import time

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
    assert type(spec) is JobSpec and spec.train.max_steps == 7 and spec.dist.timeout_s == 12.0  # overrides applied
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
        ("kind: train\n", ["train.lr=nan"], "'train.lr' must be a finite number, got nan"),
        ("kind: train\ntrain: {lr: .inf}\n", [], "'train.lr' must be a finite number, got inf"),
        ("kind: train\n", ["train.lr=true"], "'train.lr' must be float, got bool True"),
        ("kind: train\n", ["model.n_head=3"], "model: n_embd (128) must be divisible by n_head (3)"),
        ("kind: train\nmodel: {size: custom, n_layer: 2, n_head: 5, n_embd: 64, block_size: 32}\n", [],
         "n_embd (64) must be divisible by n_head (5)"),
        ("kind: train\n", ["model.n_layer=0"], "model: n_layer must be >= 1, got 0"),
    ],
)
def test_errors_name_key_and_file(tmp_path, text, overrides, message):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_spec(p, overrides)
    assert message in str(e.value)
    assert str(p) in str(e.value) or "override" in str(e.value)


def test_job_kind_is_typed_from_the_registry(tmp_path):
    """The kind is a Literal of the job registry's names, so the loader's own check of typed keys
    covers it: a mistyped kind, in the file or in an override, is named with the file and a suggestion."""
    import typing

    from hpcllm.jobs import kind_names

    assert typing.get_args(typing.get_type_hints(JobSpec)["kind"]) == kind_names() == ("prepare", "train", "infer")
    p = write(tmp_path, "kind: trian\n")
    with pytest.raises(ConfigError) as e:
        load_spec(p)
    assert str(e.value) == f"{p}: 'kind' must be one of 'prepare' | 'train' | 'infer', got 'trian' (did you mean 'train'?)"
    with pytest.raises(ConfigError) as e:
        load_spec(write(tmp_path, "kind: train\n"), ["kind=infr"])
    assert str(e.value).endswith("'kind' must be one of 'prepare' | 'train' | 'infer', got 'infr' (did you mean 'infer'?)")
    with pytest.raises(ConfigError) as e:
        load_spec(write(tmp_path, "name: x\n"))
    assert str(e.value).endswith("missing required key 'kind' (one of 'prepare' | 'train' | 'infer')")


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


@pytest.mark.parametrize("written", ["3e-4", "3E-4", "0.0003", "3.0e-4", "+3e-4", "30e-5"])
def test_floats_as_people_write_them_in_yaml_and_overrides(tmp_path, written):
    # YAML 1.1 reads 3e-4 as a string; every form Python's float() takes is a float here
    p = write(tmp_path, f"kind: train\ntrain: {{lr: {written}, min_lr: 1e-5}}\ndist: {{timeout_s: 1e3}}\n")
    spec = load_spec(p)
    assert spec.train.lr == pytest.approx(3e-4) and isinstance(spec.train.lr, float)
    assert spec.train.min_lr == 1e-5 and spec.dist.timeout_s == 1000.0
    spec = load_spec(write(tmp_path, "kind: train\n"), [f"train.lr={written}", "train.betas=[0.9, 9.5e-1]"])
    assert spec.train.lr == pytest.approx(3e-4) and spec.train.betas == [0.9, 0.95]


# 0.5 KB that expands to 10^9 values: a9 is ten a8s, each ten a7s, ...
BILLION_LAUGHS = ("kind: train\nmodel:\n  rope_scaling:\n    a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
                  + "".join(f"    a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 10)))


@pytest.mark.parametrize("text, message", [
    (BILLION_LAUGHS, "holds more than 100,000 values with its aliases expanded (line 8)"),
    ("kind: train\nmodel: {rope_scaling: " + "[" * 600 + "]" * 600 + "}\n", "nested deeper than 64 levels"),
    ("kind: train\nmodel:\n  rope_scaling:\n" + "".join("  " * (i + 2) + f"k{i}:\n" for i in range(100)),
     "nested deeper than 64 levels"),
    ("kind: train\nname: big\n# " + "x" * (1 << 20) + "\n",
     "is 1,048,601 bytes; a job spec may have at most 1,048,576"),
    ("kind: !!python/object/apply:os.system ['true']\n", "not valid YAML: could not determine a constructor"),
])
def test_specs_that_would_exhaust_the_loader_are_refused_in_one_line(tmp_path, text, message):
    p = write(tmp_path, text)
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as e:
        load_spec(p)
    assert time.monotonic() - t0 < 1.0
    assert str(e.value).startswith(f"{p}: ") and message in str(e.value) and "\n" not in str(e.value), e.value


def test_aliases_within_bounds_still_load(tmp_path):
    spec = load_spec(write(tmp_path, "kind: prepare\ndata: {include: &pats ['*.py', '*.txt'], exclude: *pats}\n"))
    assert spec.data.include == spec.data.exclude == ["*.py", "*.txt"]


def test_overrides_are_read_with_the_same_bounds(tmp_path):
    p = write(tmp_path, "kind: train\n")
    with pytest.raises(ConfigError, match=r"^override 'model\.rope_scaling=\[\[.*nested deeper than 64 levels"):
        load_spec(p, ["model.rope_scaling=" + "[" * 600 + "]" * 600])
    with pytest.raises(ConfigError, match="override 'model.rope_scaling.a.a.a.*: more than 64 keys"):
        load_spec(p, ["model.rope_scaling" + ".a" * 600 + "=1"])
    assert load_spec(p, ["data.include=['*.py', '*.md']"]).data.include == ["*.py", "*.md"]


def test_cli_refuses_a_billion_laughs_in_one_line(tmp_path):
    p = write(tmp_path, BILLION_LAUGHS)
    r = subprocess.run([sys.executable, "-m", "hpcllm.cli", "config", str(p)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert "holds more than 100,000 values with its aliases expanded" in r.stderr
