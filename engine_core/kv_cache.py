"""Paged KV cache bookkeeping: a block pool with reference counts, an LRU free list and prefix hashes.

Every block is in exactly one of three states:

```
 used         ref_cnt > 0, held by one or more live requests (shared prefix blocks have ref_cnt > 1)
 cached-free  ref_cnt == 0, still hashed: in the free list AND in the hash map; a prefix hit revives it
 free         ref_cnt == 0, no hash: in the free list only
```
The free list is in LRU order: freed blocks join the tail and allocation pops the head, evicting the head's
hash if it has one. A request frees its blocks in reverse, so its tail blocks (least likely to be shared)
are evicted before its prefix. The pool stores only ids and counts; the worker holds the actual tensors.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from engine_core.block_hash import BlockHash, extend_block_hashes
from engine_core.request import Request


class KVCacheBlock:
    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None

    def __repr__(self) -> str:
        cached = "" if self.block_hash is None else ", cached"
        return f"KVCacheBlock({self.block_id}, ref={self.ref_cnt}{cached})"


class BlockPool:
    """All KV blocks, the LRU free list and the hash -> block map of the prefix cache."""

    def __init__(self, num_blocks: int) -> None:
        assert num_blocks > 0, "the KV cache needs at least one block"
        self.blocks = [KVCacheBlock(block_id) for block_id in range(num_blocks)]
        # Insertion-ordered: head = least recently freed (evicted first). O(1) pop, append and removal.
        self.free_blocks: OrderedDict[int, KVCacheBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached_blocks: dict[BlockHash, KVCacheBlock] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def get_cached_block(self, block_hash: BlockHash) -> KVCacheBlock | None:
        return self.cached_blocks.get(block_hash)

    def take_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Pop `num_blocks` from the free-list head with ref_cnt 1, evicting any prefix hash they carried."""
        assert num_blocks <= self.num_free_blocks, "caller must check num_free_blocks first"
        taken = []
        for _ in range(num_blocks):
            _, block = self.free_blocks.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            taken.append(block)
        return taken

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Add a reference to each block (prefix hit), reviving cached-free blocks out of the free list."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self.free_blocks[block.block_id]
            block.ref_cnt += 1

    def release(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference from each block, in the given order; blocks reaching zero join the LRU tail."""
        for block in blocks:
            assert block.ref_cnt > 0, f"double free of {block}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_blocks[block.block_id] = block

    def cache_block(self, block: KVCacheBlock, block_hash: BlockHash) -> None:
        """Offer a computed full block to the prefix cache. The first block with a given hash wins."""
        if block.block_hash is None and block_hash not in self.cached_blocks:
            block.block_hash = block_hash
            self.cached_blocks[block_hash] = block

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is not None:
            del self.cached_blocks[block.block_hash]
            block.block_hash = None


class KVCacheManager:
    """Allocates and frees the KV blocks of requests; finds and records prefix-cache hits.

    Protocol per request: `get_computed_blocks` (pure lookup) -> `allocate_slots` (commits the hit and adds
    blocks) each time the request is scheduled -> `cache_full_blocks` after its KV was computed -> `free`.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        assert block_size > 0
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self._holders: dict[str, Request] = {}  # requests holding blocks, for the integrity check
        self.prefix_cache_queries = 0  # cumulative tokens looked up at a request's first allocation
        self.prefix_cache_hits = 0  # cumulative tokens found cached

    # ------------------------------------------------------------------ gauges

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live requests (ref_cnt > 0)."""
        return (self.pool.num_blocks - self.pool.num_free_blocks) / self.pool.num_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    # ------------------------------------------------------------------ lookup / allocate / free

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest cached prefix of a request that holds no blocks: (blocks, num_cached_tokens).

        Leaves at least the last token uncomputed so the step that computes it yields logits to sample.
        Mutates only the request's lazily filled `block_hashes`.
        """
        assert not request.block_ids, "prefix lookup is for requests that hold no blocks"
        if not self.enable_prefix_caching:
            return [], 0
        extend_block_hashes(request.block_hashes, request.all_token_ids, self.block_size, request.cache_salt,
                            request.mm_items)
        max_cached_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVCacheBlock] = []
        for block_hash in request.block_hashes[:max_cached_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: Sequence[KVCacheBlock] = ()) -> list[int] | None:
        """Give `request` room for `num_new_tokens` more tokens after its computed ones (and `computed_blocks`).

        Returns the ids of newly taken blocks (excluding `computed_blocks`, which are appended to the request
        first), or None without changing anything when the free list is too short.
        """
        num_computed_tokens = request.num_computed_tokens + len(computed_blocks) * self.block_size
        num_needed_blocks = -(-(num_computed_tokens + num_new_tokens) // self.block_size)
        num_new_blocks = max(0, num_needed_blocks - len(request.block_ids) - len(computed_blocks))
        # Hit blocks sitting in the free list must come out of it too, so they count against it.
        num_revived = sum(1 for block in computed_blocks if block.ref_cnt == 0)
        if num_new_blocks + num_revived > self.pool.num_free_blocks:
            return None
        if not request.block_ids:
            self._record_prefix_lookup(request, len(computed_blocks))
        self.pool.touch(computed_blocks)
        request.block_ids.extend(block.block_id for block in computed_blocks)
        request.num_committed_blocks += len(computed_blocks)
        new_blocks = self.pool.take_new_blocks(num_new_blocks)
        request.block_ids.extend(block.block_id for block in new_blocks)
        self._holders[request.request_id] = request
        return [block.block_id for block in new_blocks]

    def cache_full_blocks(self, request: Request) -> None:
        """Offer the request's newly computed full blocks to the prefix cache (call after its KV is written)."""
        if not self.enable_prefix_caching:
            return
        num_full_blocks = min(request.num_computed_tokens // self.block_size, len(request.block_ids))
        if num_full_blocks <= request.num_committed_blocks:
            return
        extend_block_hashes(request.block_hashes, request.all_token_ids, self.block_size, request.cache_salt,
                            request.mm_items)
        for index in range(request.num_committed_blocks, num_full_blocks):
            block = self.pool.blocks[request.block_ids[index]]
            self.pool.cache_block(block, request.block_hashes[index])
        request.num_committed_blocks = num_full_blocks

    def free(self, request: Request) -> None:
        """Release all blocks of `request`, tail first, so its prefix outlives its tail in the LRU order."""
        self.pool.release(self.pool.blocks[block_id] for block_id in reversed(request.block_ids))
        request.block_ids = []
        request.num_committed_blocks = 0
        self._holders.pop(request.request_id, None)

    def _record_prefix_lookup(self, request: Request, num_hit_blocks: int) -> None:
        if self.enable_prefix_caching:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += num_hit_blocks * self.block_size

    # ------------------------------------------------------------------ checks

    def check_integrity(self) -> None:
        """Assert free + cached-free + used == total, ref counts == holders, and hash map consistency."""
        pool = self.pool
        expected_refs = [0] * pool.num_blocks
        for request_id, request in self._holders.items():
            assert request.block_ids, f"{request_id} is listed as a holder but holds no blocks"
            assert len(set(request.block_ids)) == len(request.block_ids), f"{request_id} holds a block twice"
            for block_id in request.block_ids:
                expected_refs[block_id] += 1
        num_used = num_cached_free = num_free = 0
        for block in pool.blocks:
            assert block.ref_cnt == expected_refs[block.block_id], (block, expected_refs[block.block_id])
            in_free_list = block.block_id in pool.free_blocks
            assert in_free_list == (block.ref_cnt == 0), f"{block} free-list membership wrong"
            if block.block_hash is not None:
                assert pool.cached_blocks.get(block.block_hash) is block, f"{block} hash not mapped to it"
            num_used += block.ref_cnt > 0
            num_cached_free += block.ref_cnt == 0 and block.block_hash is not None
            num_free += block.ref_cnt == 0 and block.block_hash is None
        assert num_free + num_cached_free + num_used == pool.num_blocks
        assert num_free + num_cached_free == pool.num_free_blocks
        assert all(block.block_hash == key for key, block in pool.cached_blocks.items())
        assert all(block is pool.blocks[block_id] for block_id, block in pool.free_blocks.items())
