"""The model's tokenizer, loaded with the `tokenizers` library alone (no transformers, no torch).

Reads `tokenizer.json` for the vocabulary and pipeline and `tokenizer_config.json` for the special-token
strings the chat template needs (bos/eos/unk/pad).
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import Encoding, Tokenizer

from frontend.errors import BadRequestError

logger = logging.getLogger("conveyor.frontend")

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
_BYTE_FALLBACK_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte <-> printable character map used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars)}


_BYTE_LEVEL_DECODE = {char: byte for byte, char in _bytes_to_unicode().items()}


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as handle:
        data = json.load(handle)
    return data if isinstance(data, dict) else {}


@dataclass(frozen=True)
class EncodedPrompt:
    """A prompt for a pooling request: token ids, BERT segment ids (0 = first text, 1 = second), and how many
    tokens came from the text itself rather than the special tokens the tokenizer added."""

    token_ids: list[int]
    token_type_ids: list[int]
    num_content_tokens: int


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json stores a special token as a string or as an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


class TokenizerInfo:
    """Encode/decode plus the per-token views logprobs need (display text and raw UTF-8 bytes)."""

    def __init__(self, tokenizer_dir: str) -> None:
        folder = Path(tokenizer_dir)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {tokenizer_dir}")
        self.tokenizer = Tokenizer.from_file(str(path))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.config = read_json(folder / "tokenizer_config.json")
        self.special_tokens: dict[str, str | None] = {
            key: _token_content(self.config.get(key)) for key in _SPECIAL_TOKEN_KEYS}
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self._byte_level = "ByteLevel" in repr(self.tokenizer.decoder)
        # lru_cache on a bound method would keep `self` alive forever; a per-instance cache does not.
        self.token_text = lru_cache(maxsize=65536)(self._token_text)

    @property
    def eos_token_id(self) -> int | None:
        eos = self.special_tokens.get("eos_token")
        return self.tokenizer.token_to_id(eos) if eos else None

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_prompt(self, text: str, pair: str | None = None, *, add_special_tokens: bool = True,
                      max_num_tokens: int | None = None, truncation_side: str = "right") -> EncodedPrompt:
        """Encode `text` (and a second text `pair`, as the tokenizer's post-processor joins pairs: BERT's
        `[CLS] a [SEP] b [SEP]` with segment ids 0/1), as Hugging Face tokenizers do with `truncation=True`.

        Truncation to `max_num_tokens` cuts text tokens only, never the special tokens around them, taking from
        the longer text of a pair first. `truncation_side` "right" keeps the beginning of a text, "left" its end.
        """
        first = self.tokenizer.encode(text, add_special_tokens=False)
        second = self.tokenizer.encode(pair, add_special_tokens=False) if pair is not None else None
        if max_num_tokens is not None:
            num_special = self.tokenizer.num_special_tokens_to_add(second is not None) if add_special_tokens else 0
            _truncate_longest_first(first, second, max(0, max_num_tokens - num_special), truncation_side)
        num_content = len(first.ids) + (len(second.ids) if second is not None else 0)
        joined = self.tokenizer.post_process(first, second, add_special_tokens=add_special_tokens)
        return EncodedPrompt(list(joined.ids), list(joined.type_ids), num_content)

    def truncate_text(self, text: str, max_tokens: int, side: str = "right") -> str:
        """The longest part of `text` (its beginning, or its end for side "left") of at most `max_tokens` tokens,
        cut at a token boundary of the original text."""
        offsets = self.tokenizer.encode(text, add_special_tokens=False).offsets
        if len(offsets) <= max_tokens:
            return text
        if max_tokens <= 0:
            return ""
        return text[:offsets[max_tokens - 1][1]] if side == "right" else text[offsets[-max_tokens][0]:]

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens))

    def is_valid_id(self, token_id: int) -> bool:
        return 0 <= token_id < self.vocab_size

    def _token_text(self, token_id: int) -> str:
        """How one token reads on its own (as vLLM shows it in logprobs); partial characters become U+FFFD."""
        return str(self.tokenizer.decode([token_id], skip_special_tokens=False))

    def token_bytes(self, token_id: int) -> list[int]:
        """The token's exact UTF-8 bytes, even when they are only part of a character."""
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None:
            return []
        if self._byte_level and all(char in _BYTE_LEVEL_DECODE for char in piece):
            return [_BYTE_LEVEL_DECODE[char] for char in piece]
        match = _BYTE_FALLBACK_TOKEN.match(piece)
        if match:
            return [int(match.group(1), 16)]
        return list(self.token_text(token_id).encode("utf-8"))


def _truncate_longest_first(first: Encoding, second: Encoding | None, budget: int, side: str) -> None:
    """Shorten the two encodings to `budget` tokens together the way the `tokenizers` library's "longest_first"
    strategy does: the shorter keeps all it has if the longer still gets as much, else both get half (the longer
    one the odd token)."""
    if second is None:
        if len(first.ids) > budget:
            first.truncate(budget, direction=side)
        return
    len_first, len_second = len(first.ids), len(second.ids)
    if len_first + len_second <= budget:
        return
    swap = len_first > len_second
    short, long = (len_second, len_first) if swap else (len_first, len_second)
    long = max(short, budget - short)
    if short + long > budget:
        short, long = budget // 2, budget // 2 + budget % 2
    keep_first, keep_second = (long, short) if swap else (short, long)
    first.truncate(keep_first, direction=side)
    second.truncate(keep_second, direction=side)


def check_token_ids(token_ids: list[int], tokenizer: TokenizerInfo, param: str) -> None:
    for token_id in token_ids:
        if not tokenizer.is_valid_id(token_id):
            raise BadRequestError(f"invalid value for '{param}': token id {token_id} is out of vocabulary "
                                  f"(size {tokenizer.vocab_size})", param=param)
