"""The block pool: allocation order, reference counts, LRU free queue, hash eviction."""

import hashlib
import struct

import pytest

from kiln.core.errors import UserInputError
from kiln.runtime.block_pool import ROOT_BLOCK_HASH, BlockPool, hash_block_tokens

H1 = hash_block_tokens(ROOT_BLOCK_HASH, [1, 2])
H2 = hash_block_tokens(H1, [3, 4])


def test_allocate_takes_blocks_from_the_head_skipping_the_null_block() -> None:
    pool = BlockPool(5)
    assert list(pool.free_queue) == [1, 2, 3, 4]
    assert pool.allocate(2) == [1, 2]
    assert pool.allocate(1) == [3]
    assert [block.ref_count for block in pool.blocks] == [0, 1, 1, 1, 0]
    assert pool.num_free_blocks == 1


def test_allocate_refuses_without_changing_anything() -> None:
    pool = BlockPool(4)
    assert pool.allocate(1) == [1]
    assert pool.allocate(3) is None
    assert list(pool.free_queue) == [2, 3]
    assert pool.allocate(0) == []


def test_freed_blocks_go_to_the_tail_in_the_given_order() -> None:
    pool = BlockPool(6)
    assert pool.allocate(3) == [1, 2, 3]
    pool.free([3, 1])
    assert list(pool.free_queue) == [4, 5, 3, 1]
    assert pool.allocate(4) == [4, 5, 3, 1]


def test_shared_block_is_free_only_after_its_last_reference() -> None:
    pool = BlockPool(3)
    [block_id] = pool.allocate(1)
    pool.touch([block_id])
    assert pool.blocks[block_id].ref_count == 2
    pool.free([block_id])
    assert list(pool.free_queue) == [2]
    pool.free([block_id])
    assert list(pool.free_queue) == [2, 1]


def test_touch_revives_a_block_from_the_middle_of_the_queue() -> None:
    pool = BlockPool(5)
    pool.allocate(4)
    pool.free([1, 2, 3])
    pool.touch([2])
    assert list(pool.free_queue) == [1, 3]
    assert pool.blocks[2].ref_count == 1


def test_allocating_a_cached_free_block_evicts_its_hash() -> None:
    pool = BlockPool(4)
    assert pool.allocate(2) == [1, 2]
    pool.cache_block(1, H1)
    pool.cache_block(2, H2)
    pool.free([2, 1])
    assert pool.get_cached_block(H1) == 1
    assert pool.allocate(2) == [3, 2]  # the never-used block first, then the older free one
    assert pool.get_cached_block(H2) is None
    assert pool.blocks[2].block_hash is None
    assert pool.get_cached_block(H1) == 1


def test_second_block_with_the_same_content_keeps_the_first_mapping() -> None:
    pool = BlockPool(3)
    pool.allocate(2)
    pool.cache_block(1, H1)
    pool.cache_block(2, H1)
    pool.cache_block(1, H1)  # idempotent
    assert pool.cached_block_ids == {H1: 1}
    assert pool.blocks[2].block_hash is None
    pool.free([1, 2])
    assert pool.num_free_blocks == 2


def test_reset_prefix_cache_only_when_nothing_is_in_use() -> None:
    pool = BlockPool(3)
    pool.allocate(1)
    pool.cache_block(1, H1)
    assert pool.reset_prefix_cache() is False
    assert pool.get_cached_block(H1) == 1
    pool.free([1])
    assert pool.reset_prefix_cache() is True
    assert pool.get_cached_block(H1) is None
    assert pool.blocks[1].block_hash is None


def test_block_hash_is_sha256_chained_over_int64_token_ids() -> None:
    expected = hashlib.sha256(H1 + struct.pack("<2q", 3, 4)).digest()
    assert H2 == expected
    assert hash_block_tokens(ROOT_BLOCK_HASH, [3, 4]) != H2  # the parent is part of the hash
    assert hash_block_tokens(ROOT_BLOCK_HASH, (1, 2)) == H1  # any sequence type
    assert hash_block_tokens(ROOT_BLOCK_HASH, [1, 2, 0]) != H1


def test_pool_needs_a_usable_block_besides_the_null_block() -> None:
    with pytest.raises(UserInputError, match="at least 2"):
        BlockPool(1)
