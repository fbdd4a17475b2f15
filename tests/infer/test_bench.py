"""`hpcllm bench infer` runs end to end on a tiny model beside both of HF's caches (figures go to
docs/performance.md; on a GPU the static cache is always the peer)."""

import re
import subprocess
import sys


def test_bench_infer_prints_hpcllm_beside_hf_dynamic_and_static_cache():
    p = subprocess.run([sys.executable, "-m", "hpcllm.cli", "bench", "infer", "--model", "tiny", "--batch-size", "2",
                        "--prompt-len", "8", "--new-tokens", "8", "--hf-static-cache"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    got = dict(re.findall(r"(hpcllm engine|HF generate\(\)|HF generate\(\), static cache)\s+([\d,]+) new tokens/s",
                          p.stdout))
    assert set(got) == {"hpcllm engine", "HF generate()", "HF generate(), static cache"}, p.stdout
    assert all(float(v.replace(",", "")) > 0 for v in got.values())
    assert len(re.findall(r"ratio hpcllm / HF generate\(\).*\s\d+\.\d\dx", p.stdout)) == 2, p.stdout
