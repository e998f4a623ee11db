"""The KV-cache manager: per-request block tables over a shared block pool, with prefix caching.

The scheduler sees only this narrow API (block ids and token counts); the pool's internals stay here.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from kiln.core.errors import UserInputError
from kiln.runtime.block_pool import ROOT_BLOCK_HASH, BlockPool, hash_block_tokens

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedPrefix:
    """Cached full blocks that cover the start of a prompt, found by `KVCacheManager.find_cached_prefix`."""

    block_ids: tuple[int, ...]
    num_tokens: int  # len(block_ids) * block_size


class KVCacheManager:
    """Allocates append-only block tables for requests and shares computed full blocks between them by content."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if block_size < 1:
            raise UserInputError(f"the KV block size must be at least 1 token, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self._block_tables: dict[str, list[int]] = {}
        # Chain hashes of each request's leading full, computed blocks (whether or not the pool kept its block
        # under that hash): the next block's hash continues from the last one without rehashing the prefix.
        self._block_hashes: dict[str, list[bytes]] = {}
        self.num_prefix_queries = 0  # tokens looked up
        self.num_prefix_hits = 0  # tokens found cached

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocatable now (the free queue, cached-but-free blocks included)."""
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of the usable blocks (all but the null block) held by some request."""
        num_usable = self.pool.num_blocks - 1
        return (num_usable - self.pool.num_free_blocks) / num_usable

    @property
    def prefix_hit_rate(self) -> float:
        """Fraction of looked-up prompt tokens found in the prefix cache (0.0 before any lookup)."""
        return self.num_prefix_hits / self.num_prefix_queries if self.num_prefix_queries else 0.0

    def find_cached_prefix(self, token_ids: Sequence[int]) -> CachedPrefix:
        """The longest chain of cached full blocks at the start of `token_ids`; changes nothing but the statistics.

        The hit never covers the whole prompt: at least one token must be computed to produce logits. Pass the
        result to `allocate` before anything else allocates, or an evicted block may be handed out twice.
        """
        if not self.enable_prefix_caching:
            return CachedPrefix(block_ids=(), num_tokens=0)
        max_cached_blocks = max(len(token_ids) - 1, 0) // self.block_size
        block_ids: list[int] = []
        parent_hash = ROOT_BLOCK_HASH
        for index in range(max_cached_blocks):
            start = index * self.block_size
            parent_hash = hash_block_tokens(parent_hash, token_ids[start : start + self.block_size])
            block_id = self.pool.get_cached_block(parent_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        num_tokens = len(block_ids) * self.block_size
        self.num_prefix_queries += len(token_ids)
        self.num_prefix_hits += num_tokens
        return CachedPrefix(block_ids=tuple(block_ids), num_tokens=num_tokens)

    def allocate(
        self,
        request_id: str,
        token_ids: Sequence[int],
        num_computed_tokens: int,
        num_new_tokens: int,
        cached_prefix: CachedPrefix | None = None,
    ) -> list[int] | None:
        """Grow the request's table to cover `num_computed_tokens + num_new_tokens` tokens; returns the new block ids.

        All or nothing: None (and no change at all) when too few blocks are free, so the caller can preempt and
        retry. `cached_prefix`, only on a request's first allocation, becomes the start of its table; its blocks
        are already counted in `num_computed_tokens`. `token_ids` is unused here (hashing happens in
        `cache_computed_blocks`, once tokens are computed) and kept so every call names the request's tokens.
        """
        block_table = self._block_tables.get(request_id, [])
        num_tokens = num_computed_tokens + num_new_tokens
        if cached_prefix is None and block_table and len(block_table) * self.block_size >= num_tokens:
            return []  # the common decode step: its token fits in the last block (a fast path, same result)
        prefix_block_ids = cached_prefix.block_ids if cached_prefix is not None else ()
        if prefix_block_ids:
            self._check_prefix(request_id, block_table, cached_prefix, num_computed_tokens)
        num_required_blocks = -(-num_tokens // self.block_size)
        num_new_blocks = max(num_required_blocks - len(block_table) - len(prefix_block_ids), 0)
        # Reviving a cached block that sits in the free queue takes it out of the queue: count it, or the new
        # allocation could be promised a block the prefix is about to claim.
        num_prefix_free = sum(1 for block_id in prefix_block_ids if self.pool.blocks[block_id].ref_count == 0)
        if num_new_blocks > self.pool.num_free_blocks - num_prefix_free:
            return None

        if request_id not in self._block_tables:
            self._block_tables[request_id] = block_table
            self._block_hashes[request_id] = []
        if prefix_block_ids:
            # Take the prefix first, so the allocation below cannot evict it.
            self.pool.touch(prefix_block_ids)
            block_table.extend(prefix_block_ids)
            self._block_hashes[request_id].extend(self.pool.blocks[b].block_hash for b in prefix_block_ids)
        new_block_ids = self.pool.allocate(num_new_blocks)
        assert new_block_ids is not None  # checked above
        block_table.extend(new_block_ids)
        return new_block_ids

    def _check_prefix(
        self, request_id: str, block_table: list[int], cached_prefix: CachedPrefix, num_computed_tokens: int
    ) -> None:
        """Refuse a cached prefix the manager cannot honour (a caller bug, not a user error)."""
        if block_table:
            raise ValueError(f"request {request_id!r} already has blocks; a cached prefix is only for its first call")
        if cached_prefix.num_tokens != len(cached_prefix.block_ids) * self.block_size:
            raise ValueError(
                f"cached prefix of {len(cached_prefix.block_ids)} blocks claims {cached_prefix.num_tokens} tokens"
            )
        if num_computed_tokens < cached_prefix.num_tokens:
            raise ValueError(f"num_computed_tokens={num_computed_tokens} does not include the cached prefix")
        if any(self.pool.blocks[block_id].block_hash is None for block_id in cached_prefix.block_ids):
            raise ValueError("cached prefix is stale (a block was evicted): call find_cached_prefix again")

    def fork(self, parent_id: str, child_id: str, num_tokens: int) -> int:
        """Start the child's table with the parent's blocks that are full within `num_tokens` (shared, no copy).

        Returns the number of tokens shared: a block multiple at most `num_tokens - 1`, so the child computes at
        least one token and gets its own logits.
        """
        if parent_id not in self._block_tables:
            raise ValueError(f"cannot fork unknown request {parent_id!r}")
        if self._block_tables.get(child_id):
            raise ValueError(f"request {child_id!r} already has blocks; fork must create it")
        parent_table = self._block_tables[parent_id]
        num_shared_blocks = min(max(num_tokens - 1, 0) // self.block_size, len(parent_table))
        shared_block_ids = parent_table[:num_shared_blocks]
        self.pool.touch(shared_block_ids)
        self._block_tables[child_id] = list(shared_block_ids)
        self._block_hashes[child_id] = self._block_hashes[parent_id][:num_shared_blocks]
        return num_shared_blocks * self.block_size

    def cache_computed_blocks(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Register hashes for the request's blocks that are full and computed; idempotent, no-op if caching is off."""
        if not self.enable_prefix_caching or request_id not in self._block_tables:
            return
        block_table = self._block_tables[request_id]
        block_hashes = self._block_hashes[request_id]
        num_full_blocks = min(num_computed_tokens, len(token_ids)) // self.block_size
        if num_full_blocks <= len(block_hashes):
            return  # most steps: no block became full
        for index in range(len(block_hashes), min(num_full_blocks, len(block_table))):
            parent_hash = block_hashes[-1] if block_hashes else ROOT_BLOCK_HASH
            start = index * self.block_size
            block_hash = hash_block_tokens(parent_hash, token_ids[start : start + self.block_size])
            self.pool.cache_block(block_table[index], block_hash)
            block_hashes.append(block_hash)

    def free(self, request_id: str) -> None:
        """Release all of the request's blocks, tail first, so a sequence's end is evicted before its shared start."""
        block_table = self._block_tables.pop(request_id, None)
        self._block_hashes.pop(request_id, None)
        if block_table:
            self.pool.free(reversed(block_table))

    def block_ids(self, request_id: str) -> list[int]:
        """A copy of the request's block table ([] for an unknown request)."""
        return list(self._block_tables.get(request_id, ()))

    def reset_prefix_cache(self) -> bool:
        """Drop every prefix hash and the hit counters, only when no block is in use; returns whether it did."""
        if not self.pool.reset_prefix_cache():
            return False
        self.num_prefix_queries = self.num_prefix_hits = 0  # the hit rate describes the cache since the reset
        return True
