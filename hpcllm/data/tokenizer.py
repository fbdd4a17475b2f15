"""Tokenizers: the built-in byte-level one (needs nothing) and any HF tokenizer.json through `tokenizers`
(a model directory as downloaded, or one trained by `hpcllm tokenizer train`).

A tokenizer has an `identity` string recorded in every dataset it makes ("byte-v1", or
"bpe:<sha256 of tokenizer.json>"); a job using a different tokenizer than its data is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from hpcllm.atomic import atomic_path, write_bytes, write_text
from hpcllm.errors import DataError
from hpcllm.paths import model_file


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

    def encode_document(self, data: bytes | str) -> list[int]:
        return list(data) if isinstance(data, bytes) else self.encode(data)

    def render_chat(self, messages: list, where: str) -> str:
        raise DataError(f"{where}: a 'messages' record needs a tokenizer with a chat template (data.tokenizer: "
                        "a model directory), not the byte tokenizer")

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: list[int]) -> bytes:
        """The exact bytes (special tokens dropped): NULs and invalid UTF-8 included."""
        return bytes(i for i in ids if i < 256)

    def save(self, path: Path) -> None:
        write_text(path, '{"type": "hpcllm-byte", "version": 1}\n')

    def save_hf(self, out: Path) -> None:
        """As an HF tokenizer (tokenizer.json + tokenizer_config.json) that gives the same ids."""
        write_text(out / TOKENIZER_JSON, byte_tokenizer_json(self.eos_id, self.pad_id))
        write_text(out / TOKENIZER_CONFIG, json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": None,
             "clean_up_tokenization_spaces": False, "eos_token": "<|endoftext|>", "pad_token": "<|pad|>"},
            indent=2) + "\n")


class HFTokenizer:
    """An HF `tokenizer.json` (any model: byte-level BPE as GPT-2/Llama 3/Qwen, SentencePiece-style
    BPE as Llama 2/Mistral, ...), with the special tokens and the chat template of the
    `tokenizer_config.json` / `generation_config.json` / `chat_template.jinja` beside it when the
    file is named tokenizer.json (a model directory as downloaded, or a dataset made from one).

    The identity is the sha256 of tokenizer.json: the text -> ids map. Which token ends a document
    is recorded in each dataset's manifest (eos_id) beside it."""

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
        # the files beside it, inside its directory (or its Hugging Face cache repo: hpcllm.paths)
        beside = self.path.parent if self.path.name == TOKENIZER_JSON else None
        config = _read_json(model_file(beside, TOKENIZER_CONFIG)) if beside else {}
        generation = _read_json(model_file(beside, "generation_config.json")) if beside else {}
        self.chat_template = _chat_template(beside, config)
        self.special_tokens = {k: _token_text(config.get(k)) for k in SPECIAL_TOKEN_KEYS}
        self.eos_id = self._eos_id(config, generation)
        self.special_tokens["eos_token"] = self.tok.id_to_token(self.eos_id)
        pad = self._id_of(self.special_tokens["pad_token"], "pad_token") if self.special_tokens["pad_token"] else None
        if pad is None and _is_id(generation.get("pad_token_id"), self.vocab_size):  # Qwen, Mistral name it there
            pad = generation["pad_token_id"]
        if pad is None:
            pad = self.tok.token_to_id("<|pad|>")
        self.pad_id = pad if pad is not None else self.eos_id
        self.special_tokens = {k: v for k, v in self.special_tokens.items() if v is not None}

    def _id_of(self, text: str, key: str) -> int:
        i = self.tok.token_to_id(text)
        if i is None:
            raise DataError(f"{self.path.parent / TOKENIZER_CONFIG}: {key} {text!r} is not in {self.path}")
        return i

    def _eos_id(self, config: dict, generation: dict) -> int:
        """tokenizer_config.json's eos_token, else generation_config.json's (first) eos_token_id, else
        the usual names."""
        if self.special_tokens.get("eos_token"):
            return self._id_of(self.special_tokens["eos_token"], "eos_token")
        gen = generation.get("eos_token_id")
        gen = gen[0] if isinstance(gen, list) and gen else gen
        if isinstance(gen, int) and not isinstance(gen, bool):
            if not 0 <= gen < self.vocab_size:
                raise DataError(f"{self.path.parent / 'generation_config.json'}: eos_token_id {gen} is outside the "
                                f"vocabulary of {self.vocab_size}")
            return gen
        for name in EOS_NAMES:
            if self.tok.token_to_id(name) is not None:
                return self.tok.token_to_id(name)
        raise DataError(f"{self.path}: tokenizer has no end-of-text token (no eos_token in {TOKENIZER_CONFIG}, "
                        f"none of {', '.join(EOS_NAMES)})")

    def encode_bytes(self, data: bytes) -> list[int]:
        return self.encode(data.decode("utf-8", errors="replace"))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_document(self, data: bytes | str) -> list[int]:
        """A document or prompt as the tokenizer frames a text (its post-processor: Llama's BOS, for
        one; nothing for GPT-2 or Qwen) — what transformers' `tokenizer(text)` gives."""
        text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
        return self.tok.encode(text, add_special_tokens=True).ids

    def render_chat(self, messages: list, where: str) -> str:
        from hpcllm.data.chat import render_chat

        if self.chat_template is None:
            raise DataError(f"{where}: a 'messages' record, but tokenizer {self.path} has no chat_template "
                            f"(in {TOKENIZER_CONFIG} or chat_template.jinja beside it)")
        return render_chat(self.chat_template, messages, self.special_tokens, where)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def decode_bytes(self, ids: list[int]) -> bytes:
        """UTF-8 of the decoded text; the decoder has already replaced a partial multi-byte sequence
        (a token sequence cut mid-character) with U+FFFD."""
        return self.decode(ids).encode("utf-8")

    def save_hf(self, out: Path) -> None:
        self.save(out / TOKENIZER_JSON)

    def save(self, path: Path) -> None:
        """tokenizer.json, and the special tokens and chat template as a tokenizer_config.json beside it
        (so the copy loads as this tokenizer, in hpcllm and in transformers)."""
        write_bytes(path, self.path.read_bytes())
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  **self.special_tokens,
                  "pad_token": self.tok.id_to_token(self.pad_id)}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        write_text(path.parent / TOKENIZER_CONFIG, json.dumps(config, indent=2, ensure_ascii=False) + "\n")


Tokenizer = ByteTokenizer | HFTokenizer


def _is_id(value, vocab_size: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab_size

TOKENIZER_JSON, TOKENIZER_CONFIG = "tokenizer.json", "tokenizer_config.json"
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a JSON object")
    return obj


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _chat_template(beside: Path | None, config: dict) -> str | None:
    """chat_template.jinja (as transformers >= 4.43 saves it), else tokenizer_config.json's
    chat_template: a string, or a list of named templates (the 'default' one)."""
    jinja = model_file(beside, "chat_template.jinja") if beside is not None else None
    if jinja is not None and jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    t = config.get("chat_template")
    if isinstance(t, list):
        t = next((e.get("template") for e in t if isinstance(e, dict) and e.get("name") == "default"), None)
    return t if isinstance(t, str) else None


def byte_tokenizer_json(eos_id: int = 256, pad_id: int = 257) -> str:
    """hpcllm's byte tokenizer (token = byte value, then <|endoftext|>, <|pad|>) written as an HF
    tokenizer.json: a byte-level BPE with no merges whose ids are the byte values."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()  # the 256 printable stand-ins GPT-2's byte level maps bytes to
    to_unicode = _bytes_to_unicode()
    assert sorted(alphabet) == sorted(to_unicode.values())
    vocab = {to_unicode[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|pad|>"])
    assert tok.token_to_id("<|endoftext|>") == eos_id and tok.token_to_id("<|pad|>") == pad_id
    return tok.to_str()


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's table (also the one `tokenizers`' ByteLevel uses)
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def load_tokenizer_file(name: str | Path) -> Tokenizer:
    """"byte"; a model directory holding tokenizer.json (with tokenizer_config.json,
    generation_config.json beside it); or the path of a tokenizer.json (an hpcllm byte marker file
    is accepted too)."""
    if str(name) == "byte":
        return ByteTokenizer()
    p = Path(name)
    if p.is_dir():
        if not model_file(p, TOKENIZER_JSON).is_file():
            raise DataError(f"tokenizer '{p}': a directory without {TOKENIZER_JSON} (give a model directory that "
                            "has one, a tokenizer.json path, or 'byte')")
        p = p / TOKENIZER_JSON
    if not p.is_file():
        raise DataError(f"tokenizer '{p}' not found (use 'byte', a model directory, or a tokenizer.json path)")
    head = p.read_bytes()[:200]
    if b'"hpcllm-byte"' in head:
        return ByteTokenizer()
    return HFTokenizer(p)


def tokenizer_identity_of(model_dir: str | Path) -> tuple[str, Path] | None:
    """(identity, file) of the tokenizer.json in a model directory, or None when it has none."""
    p = Path(model_dir)
    p = p if p.is_dir() else p.parent
    f = model_file(p, TOKENIZER_JSON)
    if not f.is_file():
        return None
    raw = f.read_bytes()
    if b'"hpcllm-byte"' in raw[:200] or raw == byte_tokenizer_json().encode():  # hpcllm's byte tokenizer, as
        return "byte-v1", f                                                      # written by export too
    return "bpe:" + hashlib.sha256(raw).hexdigest(), f


def check_model_tokenizer(model_dir: str | Path, identity: str, data: str | Path) -> None:
    """A model directory with a tokenizer.json must be used with data made by that tokenizer: the
    same ids for the same text. Refused in one line naming both files (no tokenizer there: the
    vocabulary check is all there is)."""
    own = tokenizer_identity_of(model_dir)
    if own is not None and own[0] != identity:
        raise DataError(f"tokenizer mismatch: {data} was tokenized with '{identity}', the model's {own[1]} is "
                        f"'{own[0]}' — prepare the data with the model's tokenizer (data.tokenizer: {Path(own[1]).parent})")


def train_bpe(files: list[str], vocab_size: int, output: str | Path) -> HFTokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenisation) and write tokenizer.json atomically."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if not files:
        raise DataError("tokenizer train: no input files")
    tok = RawTokenizer(models.BPE())
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
    return HFTokenizer(out)
