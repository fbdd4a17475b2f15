"""Commands of the data layer: data info/verify, tokenizer train, bench data (`hpcllm prepare` is a job: hpcllm.jobs)."""

from __future__ import annotations

import json

from hpcllm.errors import DataError


def register(sub, bench) -> None:
    data = sub.add_parser("data", help="inspect datasets").add_subparsers(dest="data_cmd", metavar="CMD", required=True)
    p = data.add_parser("info", help="shards, tokens, tokenizer of a dataset")
    p.add_argument("dataset")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=_info)
    p = data.add_parser("verify", help="recompute every shard's checksum and check every token id against the "
                                       "vocabulary; non-zero exit naming bad shards")
    p.add_argument("dataset")
    p.set_defaults(func=_verify)

    tok = sub.add_parser("tokenizer", help="tokenizers").add_subparsers(dest="tok_cmd", metavar="CMD", required=True)
    p = tok.add_parser("train", help="train a byte-level BPE tokenizer (HF tokenizers) on text files")
    p.add_argument("--input", nargs="+", required=True, help="files, globs or directories (as data.inputs)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--output", required=True, help="tokenizer.json to write")
    p.add_argument("--include", nargs="*", default=["*"], help="name patterns when walking directories")
    p.set_defaults(func=_tokenizer_train)

    p = bench.add_parser("data", help="loader read throughput beside np.memmap of the same tokens")
    p.add_argument("dataset")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    p.set_defaults(func=_bench)


def _info(args) -> int:
    from hpcllm.data.shards import read_manifest

    man = read_manifest(args.dataset)
    if args.json:
        print(json.dumps(man, indent=2))
        return 0
    print(f"dataset    {args.dataset}  (format v{man['format_version']}, {man['kind']})")
    print(f"tokenizer  {man['tokenizer']}  vocab {man['vocab_size']}  eos {man['eos_id']}  dtype {man['dtype']}")
    if man["kind"] == "tokens":
        for split, v in man["splits"].items():
            n = sum(1 for s in man["shards"] if s["split"] == split)
            print(f"{split:<10} {v['n_tokens']:>14,} tokens  {v['n_docs']:>10,} documents  {n} shard(s)")
    else:
        print(f"prompts    {man['n_records']:,} records in {len(man['shards'])} shard(s)")
    return 0


def _verify(args) -> int:
    from hpcllm.data.prompts import PromptDataset
    from hpcllm.data.shards import read_manifest, token_dataset_problems

    man = read_manifest(args.dataset)
    if man.get("kind") == "prompts":  # the very checks an inference job makes before using a shard
        problems = PromptDataset(args.dataset).verify()
    else:  # what a training job checks at open, plus every checksum and every token id
        problems = token_dataset_problems(args.dataset, man, checksum=True, scan=True)
    if problems:
        raise DataError(f"{len(problems)} problem(s) in {args.dataset}:\n  " + "\n  ".join(problems))
    print(f"{args.dataset}: {len(man['shards'])} shard(s) OK")
    return 0


def _tokenizer_train(args) -> int:
    from hpcllm.data.config import DataConfig
    from hpcllm.data.inputs import find_inputs
    from hpcllm.data.tokenizer import train_bpe

    files = [f.path for f in find_inputs(DataConfig(inputs=args.input, include=args.include))]
    tok = train_bpe(files, args.vocab_size, args.output)
    print(f"wrote {args.output}: vocab {tok.vocab_size}, eos {tok.eos_id}, identity {tok.identity[:20]}...")
    return 0


def _bench(args) -> int:
    from hpcllm.bench.data import main

    return main(args)
