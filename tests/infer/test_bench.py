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
    tps = {k: float(v.replace(",", "")) for k, v in got.items()}
    assert all(v > 0 for v in tps.values())
    # each ratio is hpcllm's figure over the peer's, as printed (to the rounding of the printed figures)
    ratios = dict(re.findall(r"ratio hpcllm / (HF generate\(\)(?:, static cache)?)\s+(\d+\.\d\d)x", p.stdout))
    assert set(ratios) == {"HF generate()", "HF generate(), static cache"}, p.stdout
    for peer, ratio in ratios.items():
        assert abs(float(ratio) - tps["hpcllm engine"] / tps[peer]) <= 0.01 + 0.01 * float(ratio), (peer, p.stdout)
    # the peers really generated: 2 rows x 8 new tokens each, greedy, the same tokens as hpcllm's engine
    for peer in ("HF generate()", "HF generate(), static cache"):
        assert f"{peer}: 2 x 8 new tokens, 16/16 equal to hpcllm's" in p.stdout, p.stdout
