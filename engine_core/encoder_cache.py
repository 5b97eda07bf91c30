"""The encoder cache's bookkeeping: which media items' embeddings the workers hold, who still needs them, and how
much encoder work one step may do. The workers keep the embeddings themselves, keyed by content hash; this side
decides when they are made (by where a step's chunks end) and when they are dropped (`take_freed`).

    request tokens:   [ text | item A (length a) | text | item B (length b) | text ]
    a step's chunk:          [start ............................ end)
    item A is cached (another request with the same image made it): the request just becomes one of its users.
    item B is not: it costs b tokens of the step's encoder budget and b tokens of cache space; when either is short,
    the chunk ends before B (B waits for a later step), unless nothing was encoded yet this step / nothing is held
    (an item bigger than the budget or the cache still runs, alone).

An item's users are the requests whose computed tokens have not yet passed it; the last user's progress (or its
end: finished, aborted, preempted) leaves the entry unused. Unused entries stay, so the same image in a later
request is not encoded again, until their space is needed: then the oldest go, and the workers are told.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine_core.protocol import MultiModalItem
    from engine_core.request import Request


@dataclass
class EncoderStepBudget:
    """Encoder tokens one step may still compute."""

    total: int
    left: int = field(init=False)

    def __post_init__(self) -> None:
        self.left = self.total


class EncoderCache:
    def __init__(self, capacity_tokens: int) -> None:
        self.capacity_tokens = capacity_tokens
        self.sizes: dict[str, int] = {}  # content hash -> embedding rows the workers hold (or will, this step)
        self.users: dict[str, set[str]] = {}  # content hash -> ids of requests that still need it
        self.unused: OrderedDict[str, None] = OrderedDict()  # entries without users, oldest first
        self.used_tokens = 0
        self._freed: list[str] = []
        self.num_items_needed = 0  # cumulative: item needs met by an encoder run (scheduled)
        self.num_items_reused = 0  # cumulative: item needs met by an entry already held

    def fit(self, request: Request, start: int, num_new_tokens: int,
            budget: EncoderStepBudget) -> tuple[int, list[MultiModalItem]]:
        """How many of the request's `num_new_tokens` from token `start` can run this step, and the items of that
        span the step must encode. Changes nothing but evictions of unused entries; `commit` records the decision."""
        end = start + num_new_tokens
        to_encode: list[MultiModalItem] = []
        pending_tokens = 0
        for item in _overlapping(request.mm_items, start, end):
            if item.content_hash in self.sizes or any(i.content_hash == item.content_hash for i in to_encode):
                continue
            if not self._room_for(item.length, pending_tokens, budget):
                return max(0, item.offset - start), to_encode
            to_encode.append(item)
            pending_tokens += item.length
        return num_new_tokens, to_encode

    def commit(self, request: Request, start: int, num_new_tokens: int, to_encode: list[MultiModalItem],
               budget: EncoderStepBudget) -> None:
        """The request runs `num_new_tokens` this step: it uses every item they reach; `to_encode` get entries."""
        for item in to_encode:
            self.sizes[item.content_hash] = item.length
            self.used_tokens += item.length
            budget.left -= item.length
            self.num_items_needed += 1
        encoding = {item.content_hash for item in to_encode}
        for item in _overlapping(request.mm_items, start, start + num_new_tokens):
            users = self.users.setdefault(item.content_hash, set())
            if request.request_id not in users and item.content_hash not in encoding:
                self.num_items_reused += 1
            users.add(request.request_id)
            self.unused.pop(item.content_hash, None)

    def release_consumed(self, request: Request) -> None:
        """Items the request's computed tokens have passed no longer need it."""
        for item in request.mm_items:
            if item.offset + item.length <= request.num_computed_tokens:
                self._release(item.content_hash, request.request_id)

    def release_all(self, request: Request) -> None:
        """The request finished or was preempted (a restart uses the entries again, if they are still held)."""
        for item in request.mm_items:
            self._release(item.content_hash, request.request_id)

    def take_freed(self) -> list[str]:
        """Hashes whose embeddings the workers may drop (evicted since the last call)."""
        freed, self._freed = self._freed, []
        return freed

    def _release(self, content_hash: str, request_id: str) -> None:
        users = self.users.get(content_hash)
        if users is None or request_id not in users:
            return
        users.discard(request_id)
        if not users:
            del self.users[content_hash]
            if content_hash in self.sizes:
                self.unused[content_hash] = None

    def _room_for(self, length: int, pending_tokens: int, budget: EncoderStepBudget) -> bool:
        """Whether an item of `length` rows fits this step and the cache beside `pending_tokens` rows the request
        already needs encoded, evicting unused entries as needed. The step's first item always fits the step."""
        first_of_step = pending_tokens == 0 and budget.left == budget.total
        if pending_tokens + length > budget.left and not first_of_step:
            return False
        needed = pending_tokens + length
        while self.used_tokens + needed > self.capacity_tokens and self.unused:
            content_hash, _ = self.unused.popitem(last=False)
            self.used_tokens -= self.sizes.pop(content_hash)
            self._freed.append(content_hash)
        return self.used_tokens + needed <= self.capacity_tokens or (self.used_tokens == 0 and pending_tokens == 0)


def _overlapping(items: Iterable[MultiModalItem], start: int, end: int) -> list[MultiModalItem]:
    return [item for item in items if item.offset < end and item.offset + item.length > start]
