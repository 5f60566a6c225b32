"""Tokenizers: gpt2 and o200k_base through tiktoken, or one id per character of the text (char); each one saves
itself as a small dict (tokenizer.json in a checkpoint) and is rebuilt from it."""

from __future__ import annotations

from typing import Any

from config import UserError


class CharTokenizer:
    """One id per distinct character of the text (sorted), as in nanoGPT's shakespeare_char."""

    name = "char"

    def __init__(self, chars: str):
        self.chars = chars
        self.vocab_size = len(chars)
        self._ids = {c: i for i, c in enumerate(chars)}
        self.start_id = self._ids.get("\n", 0)  # what an empty prompt starts from

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError:
            unknown = sorted({c for c in text if c not in self._ids})
            raise ValueError(
                f"the char tokenizer never saw {''.join(unknown)!r} in its training text; remove those characters"
            ) from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "chars": self.chars}


class TiktokenTokenizer:
    """gpt2 or o200k_base BPE through tiktoken (downloaded once into its cache; TIKTOKEN_CACHE_DIR for offline use)."""

    def __init__(self, name: str):
        import tiktoken

        try:
            self._enc = tiktoken.get_encoding(name)
        except Exception as error:
            raise UserError(
                f"could not load the {name} tokenizer ({type(error).__name__}); offline? put its files in a folder "
                "named as tiktoken caches them and set TIKTOKEN_CACHE_DIR to it (see docs/data.md), or use --tokenizer char"
            ) from None
        self.name = name
        self.vocab_size = self._enc.n_vocab
        self.start_id = self._enc.eot_token  # <|endoftext|>: what an empty prompt starts from

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode(ids)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name}


Tokenizer = CharTokenizer | TiktokenTokenizer


def build_tokenizer(name: str, text: str | None = None) -> Tokenizer:
    if name == "char":
        if text is None:
            raise ValueError("the char tokenizer is built from the training text")
        return CharTokenizer.from_text(text)
    return TiktokenTokenizer(name)


# The ids of each tiktoken encoding (n_vocab, special tokens included): what a checkpoint's vocab_size must be,
# known without loading the encoding.
TIKTOKEN_VOCAB_SIZES = {"gpt2": 50257, "o200k_base": 200019}


def check_tokenizer_dict(values: Any, vocab_size: int | None = None) -> None:
    """Raise UserError (the reason, one line) unless `values` is what a tokenizer's to_dict() writes: a known name,
    and for char a non-empty string of distinct characters; with vocab_size, also that it has that many ids. Keys
    this version does not know are ignored."""
    if not isinstance(values, dict):
        got = {list: "a list", str: "a string", type(None): "null"}.get(type(values), type(values).__name__)
        raise UserError(f"expected an object with the tokenizer's name, got {got}")
    name, names = values.get("name"), ("char", *TIKTOKEN_VOCAB_SIZES)
    if not isinstance(name, str) or name not in names:
        raise UserError(f"name {name!r} is not one of: {', '.join(names)}")
    size = TIKTOKEN_VOCAB_SIZES.get(name)
    if name == "char":
        chars = values.get("chars")
        if not isinstance(chars, str) or not chars:
            raise UserError(f"the char tokenizer's chars must be a non-empty string, got {chars!r:.40}")
        if len(set(chars)) != len(chars):
            raise UserError("the char tokenizer's chars repeat a character (two ids for one character)")
        size = len(chars)
    if vocab_size is not None and vocab_size != size:
        raise UserError(f"the {name} tokenizer has {size} ids, but the model was saved with vocab_size {vocab_size}")


def tokenizer_from_dict(values: dict[str, Any]) -> Tokenizer:
    """The tokenizer a to_dict() wrote (tokenizer.json); UserError with the reason for anything else."""
    check_tokenizer_dict(values)
    return CharTokenizer(values["chars"]) if values["name"] == "char" else TiktokenTokenizer(values["name"])
