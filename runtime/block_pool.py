"""The KV-cache block pool: reference counts, an LRU free queue and the prefix-hash map."""

import hashlib
import logging
import struct
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kiln.core.errors import UserInputError

logger = logging.getLogger(__name__)

NULL_BLOCK_ID = 0
# The parent hash of a request's first block.
ROOT_BLOCK_HASH = b"\x00" * 32


def hash_block_tokens(parent_hash: bytes, token_ids: Sequence[int]) -> bytes:
    """sha256 of a full block's token ids chained to its parent block's hash.

    sha256 rather than Python's 64-bit `hash()`: tuple-of-int hashes collide easily (`hash(-1) == hash(-2)`) and
    can be forced on purpose, and a collision hands one request another's KV cache (a wrong answer or a leak across
    users). sha256 costs about a microsecond per block and is the same in every process, so a hash means the same
    thing in every tensor-parallel worker and every run.
    """
    # Fixed-width little-endian int64 so that token sequences map to distinct byte strings unambiguously.
    return hashlib.sha256(parent_hash + struct.pack(f"<{len(token_ids)}q", *token_ids)).digest()


@dataclass(slots=True)
class KVBlock:
    """One block of the pool: its id, how many block tables hold it, and its content hash once full and computed."""

    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None


class BlockPool:
    """Hands out blocks from an LRU free queue; blocks with a hash stay reusable until allocation evicts them."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise UserInputError(
                f"the KV cache has {num_blocks} block(s) but needs at least 2 (block 0 is reserved): "
                "give the KV cache more memory or use a smaller block size"
            )
        self.num_blocks = num_blocks
        self.blocks = [KVBlock(block_id) for block_id in range(num_blocks)]
        # Insertion order is free order: the head is the least recently freed block. OrderedDict gives O(1)
        # removal from the middle when a prefix hit revives a free cached block.
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))
        self.cached_block_ids: dict[bytes, int] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be allocated now, cached-but-free ones included."""
        return len(self.free_queue)

    def allocate(self, num_blocks: int) -> list[int] | None:
        """Take `num_blocks` blocks from the head of the free queue (ref count 1), or None if too few are free."""
        if num_blocks > len(self.free_queue):
            return None
        block_ids = []
        for _ in range(num_blocks):
            block_id, _ = self.free_queue.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                # LRU eviction: the block is about to be overwritten, so its cached content is gone.
                del self.cached_block_ids[block.block_hash]
                block.block_hash = None
            block.ref_count = 1
            block_ids.append(block_id)
        return block_ids

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take one more reference on blocks that are shared or revived from the free queue."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_queue[block_id]
            block.ref_count += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference per block, in the given order; a block nobody holds goes to the tail of the queue."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"block {block_id} freed more often than taken"
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None

    def get_cached_block(self, block_hash: bytes) -> int | None:
        """The block holding content with this hash, if any."""
        return self.cached_block_ids.get(block_hash)

    def cache_block(self, block_id: int, block_hash: bytes) -> None:
        """Register a full, computed block under its content hash.

        When another block already holds the same content (two requests computed it concurrently, both having
        missed), the first mapping is kept and this block stays unhashed: it returns to the pool as a plain free
        block, so nothing leaks and the map never holds two blocks for one hash.
        """
        block = self.blocks[block_id]
        if block.block_hash is not None:
            assert block.block_hash == block_hash, f"block {block_id} already cached with different content"
            return
        if block_hash in self.cached_block_ids:
            return
        block.block_hash = block_hash
        self.cached_block_ids[block_hash] = block_id

    def reset_prefix_cache(self) -> bool:
        """Forget every hash, only when no block is in use; returns whether it did."""
        if len(self.free_queue) != self.num_blocks - 1:
            logger.warning(
                "prefix cache not reset: %d blocks are still in use", self.num_blocks - 1 - self.num_free_blocks
            )
            return False
        for block in self.blocks:
            block.block_hash = None
        self.cached_block_ids.clear()
        logger.info("prefix cache reset")
        return True
