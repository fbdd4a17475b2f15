"""`hpcllm bench infer` runs end to end on a tiny model beside both of HF's caches (figures go to
docs/performance.md; on a GPU the static cache is always the peer)."""

import re


def test_bench_infer_prints_hpcllm_beside_hf_dynamic_and_static_cache(cli):
    p = cli("bench", "infer", "--model", "tiny", "--batch-size", "2", "--prompt-len", "8", "--new-tokens", "8",
            "--hf-static-cache", timeout=300)
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


def test_bench_infer_chat_workload_prints_the_ratio_sharing_and_cache_memory(cli):
    p = cli("bench", "infer", "--arch", "llama", "--model", "tiny", "--workload", "chat", "--prompts", "10",
            "--batch-size", "4", "--system-len", "40", "--user-len", "8", "--median-new", "4", "--new-tokens", "12",
            timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "10 prompts: system 40 + user" in p.stdout, p.stdout
    got = dict(re.findall(r"  (hpcllm, prefix sharing|hpcllm, no sharing|HF generate\(\)|HF generate\(\), static cache)"
                          r"\s+([\d,.]+) new tokens/s", p.stdout))
    assert len(got) == 4 and all(float(v.replace(",", "")) > 0 for v in got.values()), p.stdout
    tps = {k: float(v.replace(",", "")) for k, v in got.items()}
    best = max(tps["HF generate()"], tps["HF generate(), static cache"])
    for k in ("hpcllm, prefix sharing", "hpcllm, no sharing"):
        ratio = float(re.search(rf"ratio {k} / HF generate\(\) \(faster cache\)\s+(\d+\.\d\d)x", p.stdout)[1])
        assert abs(ratio - tps[k] / best) <= 0.02 + 0.02 * ratio, (k, p.stdout)
    # every record's tokens agree (greedy, a 40-token system prompt: two 16-token blocks shared by 9 of 10)
    for k in ("hpcllm, no sharing", "HF generate()", "HF generate(), static cache"):
        assert f"{k}: 10/10 records' tokens equal to hpcllm's" in p.stdout, p.stdout
    assert "hpcllm, prefix sharing: 288/" in p.stdout and "hpcllm, no sharing: 0/" in p.stdout, p.stdout
    held = re.search(r"hpcllm, prefix sharing: .* (\d+\.\d\d)x a token's keys and values per token in flight", p.stdout)
    static = re.search(r"a static cache \(HF's\): .* (\d+\.\d\d)x a token's keys", p.stdout)
    assert float(held[1]) < 1 < float(static[1]), p.stdout  # shared blocks: less than one token's worth each
