"""`hpcllm export RUN_DIR OUT_DIR`: a checkpoint as an HF model directory."""

from __future__ import annotations


def register(sub, bench) -> None:
    p = sub.add_parser("export", help="write a run's latest checkpoint as an HF model directory (config.json, "
                       "safetensors, tokenizer) that transformers' from_pretrained loads")
    p.add_argument("run_dir", help="a training run dir (its latest checkpoint) or a checkpoint dir")
    p.add_argument("out_dir", help="the HF directory to write")
    p.add_argument("--max-shard-size", default="5GB", help="split the weights into files of at most this size")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"), help="weights dtype (auto: as trained)")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    p.set_defaults(func=_export)


def _export(args) -> int:
    from hpcllm.checkpoint.export import export, parse_size
    from hpcllm.log import setup_logging

    setup_logging(0)
    out = export(args.run_dir, args.out_dir, max_shard_bytes=parse_size(args.max_shard_size), dtype=args.dtype,
                 force=args.force)
    print(out)
    return 0
