"""Block pool and KV cache manager: allocation, ref counts, prefix hashes, LRU eviction, integrity."""
from __future__ import annotations

import pytest

from engine_core.block_hash import extend_block_hashes, hash_block_tokens
from engine_core.kv_cache import KVCacheManager
from engine_core.request import Request
from tests.engine_core.harness import make_request

BLOCK = 4


def new_request(prompt: list[int], request_id: str = "r", cache_salt: str | None = None) -> Request:
    return Request.from_engine_core_request(
        make_request(request_id, prompt_token_ids=prompt, cache_salt=cache_salt))


def start(manager: KVCacheManager, request: Request) -> list[int]:
    """Look up the prefix, allocate the rest of the prompt, pretend it ran, cache its full blocks."""
    blocks, num_cached = manager.get_computed_blocks(request)
    new_block_ids = manager.allocate_slots(request, request.num_tokens - num_cached, blocks)
    assert new_block_ids is not None
    request.num_computed_tokens = request.num_tokens
    manager.cache_full_blocks(request)
    manager.check_integrity()
    return new_block_ids


def test_allocate_and_free_track_usage() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK)
    request = new_request(list(range(10, 20)))  # 10 tokens -> 3 blocks
    assert manager.allocate_slots(request, 10) == [0, 1, 2]
    manager.check_integrity()
    assert manager.usage == pytest.approx(3 / 8)
    request.num_computed_tokens = 10
    assert manager.allocate_slots(request, 2) == []  # still fits in block 2
    assert manager.allocate_slots(request, 3) == [3]
    manager.free(request)
    manager.check_integrity()
    assert manager.usage == 0.0 and request.block_ids == []


def test_allocate_returns_none_and_changes_nothing_when_short() -> None:
    manager = KVCacheManager(num_blocks=2, block_size=BLOCK)
    request = new_request(list(range(10, 19)))
    assert manager.allocate_slots(request, 9) is None
    assert request.block_ids == [] and manager.num_free_blocks == 2
    manager.check_integrity()


def test_block_hash_chains_parent_and_salt() -> None:
    tokens = list(range(10, 18))
    plain: list[bytes] = []
    extend_block_hashes(plain, tokens, BLOCK, None)
    salted: list[bytes] = []
    extend_block_hashes(salted, tokens, BLOCK, "s1")
    other_salt: list[bytes] = []
    extend_block_hashes(other_salt, tokens, BLOCK, "s2")
    assert len(plain) == 2
    assert plain[1] == hash_block_tokens(plain[0], tokens[4:8])
    assert len({plain[0], salted[0], other_salt[0]}) == 3
    assert len({plain[1], salted[1], other_salt[1]}) == 3  # the salt flows down the chain
    again: list[bytes] = []
    extend_block_hashes(again, tokens + [1, 2], BLOCK, None)  # partial third block: not hashed
    assert again == plain


def test_image_content_keys_the_blocks_its_placeholders_overlap() -> None:
    from engine_core.protocol import MultiModalItem

    tokens = [7, 8, 9] + [5] * 6 + [10, 11, 12]  # an image's 6 placeholder tokens at 3..8 (blocks 0, 1, 2)

    def hashes(*content_hashes: str) -> list[bytes]:
        items = [MultiModalItem("image", b"", [0], "float32", 3, 6, content) for content in content_hashes]
        out: list[bytes] = []
        extend_block_hashes(out, tokens, BLOCK, None, items)
        return out

    cat, dog, text_only = hashes("cat"), hashes("dog"), hashes()
    assert cat == hashes("cat") and len(cat) == 3
    assert all(a != b for a, b in zip(cat, dog)) and all(a != b for a, b in zip(cat, text_only))
    late: list[bytes] = []  # an image starting in block 2 leaves blocks 0 and 1 as for text
    extend_block_hashes(late, tokens, BLOCK, None, [MultiModalItem("image", b"", [0], "float32", 9, 3, "cat")])
    assert late[:2] == text_only[:2] and late[2] != text_only[2]


def test_prefix_hit_shares_blocks_and_counts_refs() -> None:
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK)
    first = new_request(list(range(10, 22)), "a")  # 3 full blocks
    start(manager, first)
    second = new_request(list(range(10, 22)) + [5, 6], "b")
    blocks, num_cached = manager.get_computed_blocks(second)
    assert num_cached == 12 and [b.block_id for b in blocks] == first.block_ids
    assert manager.allocate_slots(second, 2, blocks) == [3]
    manager.check_integrity()
    assert [manager.pool.blocks[i].ref_cnt for i in first.block_ids] == [2, 2, 2]
    assert manager.prefix_cache_queries == 12 + 14 and manager.prefix_cache_hits == 12


def test_never_reports_the_whole_prompt_cached() -> None:
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK)
    start(manager, new_request(list(range(10, 18)), "a"))
    _, num_cached = manager.get_computed_blocks(new_request(list(range(10, 18)), "b"))
    assert num_cached == 4  # 8 tokens all cached, but the last one must run to give logits


def test_salted_requests_do_not_share() -> None:
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK)
    prompt = list(range(10, 22))
    start(manager, new_request(prompt, "plain"))
    assert manager.get_computed_blocks(new_request(prompt + [1], "s", cache_salt="x"))[1] == 0
    start(manager, new_request(prompt + [1], "s", cache_salt="x"))
    assert manager.get_computed_blocks(new_request(prompt + [1], "s2", cache_salt="x"))[1] == 12
    assert manager.get_computed_blocks(new_request(prompt + [1], "s3", cache_salt="y"))[1] == 0
    assert manager.get_computed_blocks(new_request(prompt + [1], "p2"))[1] == 12


def test_freed_blocks_stay_cached_until_evicted_lru_tail_first() -> None:
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK)
    owner = new_request(list(range(10, 22)), "a")  # blocks 0, 1, 2 all full and cached
    start(manager, owner)
    manager.free(owner)
    manager.check_integrity()
    # Free list (head first): 3 (never used), then 2, 1, 0 (freed in reverse).
    assert list(manager.pool.free_blocks) == [3, 2, 1, 0]
    assert manager.usage == 0.0 and len(manager.pool.cached_blocks) == 3
    # A 2-block newcomer takes block 3 and evicts block 2 (the tail of the old prompt) only.
    filler = new_request(list(range(500, 508)), "filler")
    assert manager.allocate_slots(filler, 8) == [3, 2]
    manager.check_integrity()
    revived = new_request(list(range(10, 22)) + [7], "b")
    blocks, num_cached = manager.get_computed_blocks(revived)
    assert [b.block_id for b in blocks] == [0, 1] and num_cached == 8
    assert manager.allocate_slots(revived, 5, blocks) is None  # needs 2 more blocks, only 0 free besides hits
    manager.free(filler)
    assert manager.allocate_slots(revived, 5, blocks) is not None
    manager.check_integrity()
    assert revived.block_ids[:2] == [0, 1]


def test_revived_blocks_count_against_the_free_list() -> None:
    manager = KVCacheManager(num_blocks=3, block_size=BLOCK)
    owner = new_request(list(range(10, 18)), "a")
    start(manager, owner)
    manager.free(owner)  # blocks 0 and 1 cached-free, block 2 free
    reader = new_request(list(range(10, 18)) + list(range(30, 39)), "b")  # 17 tokens -> 5 blocks
    blocks, _ = manager.get_computed_blocks(reader)
    assert len(blocks) == 2
    assert manager.allocate_slots(reader, 9, blocks) is None  # 2 hits + 3 new > 3 blocks
    manager.check_integrity()
    assert manager.allocate_slots(reader, 1, blocks) == [2]
    manager.check_integrity()


def test_prefix_caching_disabled() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK, enable_prefix_caching=False)
    start(manager, new_request(list(range(10, 22)), "a"))
    assert manager.get_computed_blocks(new_request(list(range(10, 22)), "b")) == ([], 0)
    assert not manager.pool.cached_blocks and manager.prefix_cache_queries == 0


def test_check_integrity_catches_a_bad_ref_count() -> None:
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK)
    request = new_request(list(range(10, 14)))
    manager.allocate_slots(request, 4)
    manager.pool.blocks[0].ref_cnt += 1
    with pytest.raises(AssertionError):
        manager.check_integrity()
