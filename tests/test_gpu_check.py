"""scripts/gpu_check.sh, as far as a machine without a GPU can check it — a GPU session is short and
rare, so a typo must not be what it finds: the script parses, every hpcllm command in it parses
with the CLI's own parser, every test file it names holds `gpu` tests, and its time budget cuts and
skips parts as its header says."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

from hpcllm.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.sh"


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", **env})


def parts() -> list[tuple[str, int, list[str]]]:
    p = run_script(GPU_CHECK_DRY_RUN="1")
    assert p.returncode == 0, p.stderr
    got = []
    for line in p.stdout.splitlines():
        _, name, limit, *argv = shlex.split(line)
        got.append((name, int(limit), argv))
    return got


def test_the_script_parses():
    p = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_every_part_is_a_command_that_exists():
    names = [name for name, _, _ in parts()]
    assert names == ["env", "bench-infer-chat", "pytest-gpu-parallel", "bench-plans", "pytest-gpu", "bench-train",
                     "bench-infer", "bench-infer-llama", "bench-checkpoint"]
    parser = build_parser()
    for name, limit, argv in parts():
        assert 0 < limit <= 300, (name, limit)
        if argv[1:3] == ["-m", "hpcllm.cli"]:
            args = parser.parse_args(argv[3:])  # exits (SystemExit) on an option the CLI does not have
            assert args.device == "cuda", name
        elif argv[1:3] == ["-m", "pytest"]:
            files = [a for a in argv if a.startswith("tests/")]
            p = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", *files],
                               capture_output=True, text=True, cwd=REPO, timeout=120)
            assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
            for f in files:  # each file named holds gpu-marked tests
                assert re.search(rf"^{re.escape(f)}::\S+", p.stdout, re.M), (f, p.stdout)
    plans = next(argv for name, _, argv in parts() if name == "bench-plans")
    assert {"--ranks", "--shard", "--tp-overhead", "--no-compile"} <= set(plans)
    assert plans[plans.index("--shard") + 1] == "none,full" and plans[plans.index("--ranks") + 1] == "1"


def test_each_part_gets_a_log_a_limit_and_its_exit_status(tmp_path):
    # every command fails at once (python is `false`): each part is still run, logged and counted
    p = run_script(str(tmp_path / "out"), PYTHON="false")
    assert p.returncode == 1, p.stdout
    logs = sorted(f.name for f in (tmp_path / "out").iterdir())
    assert logs == sorted(f"{n}.txt" for n, _, _ in parts())
    bench = (tmp_path / "out" / "bench-plans.txt").read_text()
    assert re.search(r"^== bench-plans \(\d\d:\d\d:\d\d, limit 150s\): false -m hpcllm.cli bench train", bench), bench
    assert re.search(r"^== bench-plans: exit 1 after \d+s$", bench, re.M), bench
    assert "SOME PART FAILED, WAS CUT OR SKIPPED" in p.stdout


def test_the_budget_cuts_a_part_to_what_is_left_then_skips_the_rest(tmp_path):
    p = run_script(str(tmp_path / "out"), PYTHON="false", GPU_CHECK_BUDGET_S="45")
    assert p.returncode == 1
    # 45 s, less timeout's 10 s of grace: the first part's 30 s fit, the second's 150 s are cut to 35
    # (34 if the first part ended past a second's boundary)
    assert re.search(r"^== env \(.*, limit 30s\)", p.stdout, re.M), p.stdout
    cut = re.search(r"^== pytest-gpu-parallel \(.*, limit (\d+)s \(cut to what is left of the 45s budget\)\)",
                    p.stdout, re.M)
    assert cut and 30 <= int(cut[1]) <= 35, p.stdout
    p = run_script(str(tmp_path / "out2"), PYTHON="false", GPU_CHECK_BUDGET_S="25")
    assert p.returncode == 1
    assert re.findall(r"^== (\S+): SKIPPED, \d+s left of the 25s budget$", p.stdout, re.M) == \
        [n for n, _, _ in parts()], p.stdout
