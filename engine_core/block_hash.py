"""Prefix-cache block hashes.

A full block's hash chains its parent's: hash(parent_hash, token_ids, extra_keys). Two blocks share a hash only
if every token before and in them matches, so a hit on block i implies hits on blocks 0..i-1. The first block's
extra keys carry the request's `cache_salt`, which makes salted requests a separate tree: they never share KV
with unsalted requests or with requests that carry another salt. A block that overlaps an image's (or video's)
placeholder tokens carries that item's content hash too: the placeholders are the same token ids for every image,
so without it the same text with another image would hit the cache; after such a block every hash differs too.

SHA-256 of a msgpack encoding: stable across processes and runs (unlike Python's salted `hash` of strings), so
hashes may later be compared between engines (KV transfer).
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol

import msgspec

BlockHash = bytes

_encoder = msgspec.msgpack.Encoder()


def hash_block_tokens(parent_hash: BlockHash | None, token_ids: Sequence[int],
                      extra_keys: tuple[object, ...] = ()) -> BlockHash:
    payload = _encoder.encode((parent_hash, list(token_ids), list(extra_keys)))
    return hashlib.sha256(payload).digest()


def first_block_extra_keys(cache_salt: str | None) -> tuple[object, ...]:
    return () if cache_salt is None else (("salt", cache_salt),)


def extend_block_hashes(block_hashes: list[BlockHash], token_ids: Sequence[int], block_size: int,
                        cache_salt: str | None, media_spans: Sequence[MediaSpan] = ()) -> None:
    """Append hashes for the full blocks of `token_ids` that `block_hashes` does not cover yet (in place)."""
    num_full_blocks = len(token_ids) // block_size
    for index in range(len(block_hashes), num_full_blocks):
        parent = block_hashes[index - 1] if index > 0 else None
        start, end = index * block_size, (index + 1) * block_size
        extra = first_block_extra_keys(cache_salt) if index == 0 else ()
        extra += tuple(("media", span.content_hash) for span in media_spans
                       if span.offset < end and span.offset + span.length > start)
        block_hashes.append(hash_block_tokens(parent, token_ids[start:end], extra))


class MediaSpan(Protocol):
    """Where an image's (or video's) placeholder tokens sit in a prompt (engine_core.protocol.MultiModalItem)."""

    offset: int
    length: int
    content_hash: str
