"""Tokenizers: the built-in byte-level one (needs nothing) and byte-level BPE through HF `tokenizers`.

A tokenizer has an `identity` string recorded in every dataset it makes ("byte-v1", or
"bpe:<sha256 of tokenizer.json>"); a job using a different tokenizer than its data is refused.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from hpcllm.atomic import atomic_path, write_bytes, write_text
from hpcllm.errors import DataError


class ByteTokenizer:
    """Token = byte value (0..255) + <|endoftext|> (256) + <|pad|> (257). Lossless for any bytes."""

    identity = "byte-v1"
    vocab_size = 258
    eos_id = 256
    pad_id = 257

    def encode_bytes(self, data: bytes) -> list[int]:
        return list(data)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: list[int]) -> bytes:
        """The exact bytes (special tokens dropped): NULs and invalid UTF-8 included."""
        return bytes(i for i in ids if i < 256)

    def save(self, path: Path) -> None:
        write_text(path, '{"type": "hpcllm-byte", "version": 1}\n')


class BPETokenizer:
    """A byte-level BPE `tokenizer.json` (trained by `hpcllm tokenizer train`, or e.g. GPT-2's)."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        self.path = Path(path)
        raw = self.path.read_bytes()
        try:
            self.tok = Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:
            raise DataError(f"{self.path}: not a valid tokenizer.json ({e})") from None
        self.identity = "bpe:" + hashlib.sha256(raw).hexdigest()
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        eos = next((t for t in ("<|endoftext|>", "</s>", "<eos>") if self.tok.token_to_id(t) is not None), None)
        if eos is None:
            raise DataError(f"{self.path}: tokenizer has no end-of-text token (<|endoftext|>)")
        self.eos_id = self.tok.token_to_id(eos)
        pad = self.tok.token_to_id("<|pad|>")
        self.pad_id = pad if pad is not None else self.eos_id

    def encode_bytes(self, data: bytes) -> list[int]:
        return self.encode(data.decode("utf-8", errors="replace"))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def decode_bytes(self, ids: list[int]) -> bytes:
        """UTF-8 of the decoded text; the decoder has already replaced a partial multi-byte sequence
        (a token sequence cut mid-character) with U+FFFD."""
        return self.decode(ids).encode("utf-8")

    def save(self, path: Path) -> None:
        write_bytes(path, self.path.read_bytes())


Tokenizer = ByteTokenizer | BPETokenizer


def load_tokenizer_file(name: str | Path) -> Tokenizer:
    """"byte", or the path of a tokenizer.json (an hpcllm byte marker file is accepted too)."""
    if str(name) == "byte":
        return ByteTokenizer()
    p = Path(name)
    if not p.is_file():
        raise DataError(f"tokenizer '{p}' not found (use 'byte' or a tokenizer.json path)")
    head = p.read_bytes()[:200]
    if b'"hpcllm-byte"' in head:
        return ByteTokenizer()
    return BPETokenizer(p)


def train_bpe(files: list[str], vocab_size: int, output: str | Path) -> BPETokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenisation) and write tokenizer.json atomically."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if not files:
        raise DataError("tokenizer train: no input files")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # read the files ourselves: invalid UTF-8 is replaced (U+FFFD) instead of aborting the training
    tok.train_from_iterator((Path(f).read_bytes().decode("utf-8", errors="replace") for f in files), trainer)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tok.save(str(tmp))
    return BPETokenizer(out)
