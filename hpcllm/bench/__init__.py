"""Benchmarks (`hpcllm bench ...`): each prints hpcllm beside its peer, measured in the same run."""
