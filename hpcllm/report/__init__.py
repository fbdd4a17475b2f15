"""Run reports, read from what the jobs wrote: the summary of a run over all its starts (report.py,
from run_dir/provenance.jsonl — written by hpcllm.provenance — metrics.jsonl and the inference
markers), its PNG timeline (timeline.py) and `hpcllm report RUN_DIR` (cli.py). Nothing here is
imported by a running job: this package only reads."""
