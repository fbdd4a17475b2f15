"""Run reports: a provenance record per job start (provenance.py), the summary of a run over all its
starts (report.py), its PNG timeline (timeline.py) and `hpcllm report RUN_DIR` (cli.py)."""
