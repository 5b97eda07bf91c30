"""Prefix-cache block hashes.

A full block's hash chains its parent's: hash(parent_hash, token_ids, extra_keys). Two blocks share a hash only
if every token before and in them matches, so a hit on block i implies hits on blocks 0..i-1. The first block's
extra keys carry the request's `cache_salt`, which makes salted requests a separate tree: they never share KV
with unsalted requests or with requests that carry another salt.

SHA-256 of a msgpack encoding: stable across processes and runs (unlike Python's salted `hash` of strings), so
hashes may later be compared between engines (KV transfer).
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

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
                        cache_salt: str | None) -> None:
    """Append hashes for the full blocks of `token_ids` that `block_hashes` does not cover yet (in place)."""
    num_full_blocks = len(token_ids) // block_size
    for index in range(len(block_hashes), num_full_blocks):
        parent = block_hashes[index - 1] if index > 0 else None
        extra = first_block_extra_keys(cache_salt) if index == 0 else ()
        tokens = token_ids[index * block_size:(index + 1) * block_size]
        block_hashes.append(hash_block_tokens(parent, tokens, extra))
