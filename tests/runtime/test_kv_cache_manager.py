"""The KV-cache manager: block tables, prefix hits, eviction order, fork, all-or-nothing allocation."""

import random
from collections import Counter

import pytest

from kiln.runtime.block_pool import ROOT_BLOCK_HASH, hash_block_tokens
from kiln.runtime.kv_cache_manager import CachedPrefix, KVCacheManager

BLOCK_SIZE = 4


def _prompt(start: int, length: int) -> list[int]:
    return list(range(start, start + length))


def _ref_counts(manager: KVCacheManager) -> list[int]:
    return [block.ref_count for block in manager.pool.blocks]


def _run_prompt(manager: KVCacheManager, request_id: str, token_ids: list[int]) -> list[int]:
    """Admit a request with its prefix hit, compute its whole prompt and cache its full blocks."""
    prefix = manager.find_cached_prefix(token_ids)
    new_block_ids = manager.allocate(
        request_id, token_ids, prefix.num_tokens, len(token_ids) - prefix.num_tokens, cached_prefix=prefix
    )
    assert new_block_ids is not None
    manager.cache_computed_blocks(request_id, token_ids, len(token_ids))
    return manager.block_ids(request_id)


def test_allocate_hands_out_blocks_in_order_and_grows_tables() -> None:
    manager = KVCacheManager(num_blocks=9, block_size=BLOCK_SIZE)
    tokens_a = _prompt(0, 10)
    assert manager.allocate("a", tokens_a, 0, 10) == [1, 2, 3]
    assert manager.allocate("b", _prompt(100, 5), 0, 5) == [4, 5]
    assert manager.num_free_blocks == 3
    assert manager.usage == 5 / 8
    assert manager.allocate("a", tokens_a + [7, 8], 10, 2) == []  # 12 tokens still fit in 3 blocks
    assert manager.allocate("a", tokens_a + [7, 8, 9], 12, 1) == [6]
    assert manager.block_ids("a") == [1, 2, 3, 6]
    assert manager.block_ids("b") == [4, 5]
    assert _ref_counts(manager) == [0, 1, 1, 1, 1, 1, 1, 0, 0]
    manager.free("a")
    manager.free("b")
    manager.free("unknown")
    assert manager.num_free_blocks == 8
    assert manager.usage == 0.0
    assert manager.block_ids("a") == []


def test_free_releases_tail_blocks_first() -> None:
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    assert manager.allocate("a", _prompt(0, 12), 0, 12) == [1, 2, 3]
    manager.free("a")
    assert list(manager.pool.free_queue) == [3, 2, 1]
    assert manager.allocate("b", _prompt(0, 4), 0, 4) == [3]


def test_prefix_hit_shares_the_first_requests_blocks() -> None:
    manager = KVCacheManager(num_blocks=9, block_size=BLOCK_SIZE)
    tokens_a = _prompt(0, 10)
    assert _run_prompt(manager, "a", tokens_a) == [1, 2, 3]
    tokens_b = tokens_a[:8] + [50, 51, 52]
    prefix = manager.find_cached_prefix(tokens_b)
    assert prefix == CachedPrefix(block_ids=(1, 2), num_tokens=8)
    assert manager.allocate("b", tokens_b, 8, 3, cached_prefix=prefix) == [4]
    assert manager.block_ids("b") == [1, 2, 4]
    assert _ref_counts(manager)[:5] == [0, 2, 2, 1, 1]  # shared while both run, no copy
    manager.free("a")
    manager.free("b")
    assert manager.num_free_blocks == 8


def test_prefix_hit_revives_cached_blocks_from_the_free_queue() -> None:
    manager = KVCacheManager(num_blocks=9, block_size=BLOCK_SIZE)
    tokens = _prompt(0, 10)
    _run_prompt(manager, "a", tokens)
    manager.free("a")
    assert manager.num_free_blocks == 8
    assert _run_prompt(manager, "b", tokens) == [1, 2, 4]
    assert manager.num_free_blocks == 5  # 1 and 2 left the queue; 4 is new
    assert list(manager.pool.free_queue) == [5, 6, 7, 8, 3]


def test_cached_prefix_never_covers_the_whole_prompt() -> None:
    manager = KVCacheManager(num_blocks=9, block_size=BLOCK_SIZE)
    tokens = _prompt(0, 8)
    _run_prompt(manager, "a", tokens)
    assert manager.find_cached_prefix(tokens) == CachedPrefix(block_ids=(1,), num_tokens=4)
    assert manager.find_cached_prefix(tokens + [99]) == CachedPrefix(block_ids=(1, 2), num_tokens=8)
    assert manager.find_cached_prefix(tokens[:4]).num_tokens == 0
    assert manager.find_cached_prefix([]).num_tokens == 0


def test_lru_eviction_takes_sequence_ends_before_their_beginnings() -> None:
    manager = KVCacheManager(num_blocks=7, block_size=BLOCK_SIZE)
    tokens_a, tokens_b = _prompt(0, 9), _prompt(100, 9)
    assert _run_prompt(manager, "a", tokens_a) == [1, 2, 3]  # 1, 2 cached; 3 partial
    assert _run_prompt(manager, "b", tokens_b) == [4, 5, 6]
    manager.free("a")
    manager.free("b")
    assert list(manager.pool.free_queue) == [3, 2, 1, 6, 5, 4]

    def hits() -> tuple[int, int]:
        return manager.find_cached_prefix(tokens_a).num_tokens, manager.find_cached_prefix(tokens_b).num_tokens

    assert hits() == (8, 8)
    new_block_ids: list[int] = []
    expected_hits = [(8, 8), (4, 8), (0, 8), (0, 8), (0, 4), (0, 0)]
    for num_tokens, expected in zip(range(4, 28, 4), expected_hits):
        new_block_ids += manager.allocate("c", _prompt(500, num_tokens), num_tokens - 4, 4)
        assert hits() == expected
    assert new_block_ids == [3, 2, 1, 6, 5, 4]
    assert manager.allocate("c", _prompt(500, 25), 24, 1) is None


def test_allocation_failure_changes_nothing() -> None:
    manager = KVCacheManager(num_blocks=5, block_size=BLOCK_SIZE)
    tokens_a = _prompt(0, 9)
    _run_prompt(manager, "a", tokens_a)
    assert manager.allocate("b", _prompt(100, 8), 0, 8) is None  # needs 2 blocks, 1 free
    assert manager.block_ids("b") == []
    assert manager.num_free_blocks == 1
    manager.free("a")
    assert list(manager.pool.free_queue) == [4, 3, 2, 1]

    # 17 tokens: the 2 cached blocks plus 3 new ones, but reviving the cached pair leaves only 2 free.
    tokens_b = tokens_a[:8] + _prompt(200, 9)
    prefix = manager.find_cached_prefix(tokens_b)
    assert prefix.block_ids == (1, 2)
    assert manager.allocate("b", tokens_b, 8, 9, cached_prefix=prefix) is None
    assert list(manager.pool.free_queue) == [4, 3, 2, 1]
    assert _ref_counts(manager) == [0, 0, 0, 0, 0]
    assert manager.find_cached_prefix(tokens_b) == prefix  # nothing evicted
    # 13 tokens fit: the new blocks never evict the prefix they were counted against.
    assert manager.allocate("b", tokens_b[:13], 8, 5, cached_prefix=prefix) == [4, 3]
    assert manager.block_ids("b") == [1, 2, 4, 3]


def test_fork_shares_exactly_the_full_blocks() -> None:
    manager = KVCacheManager(num_blocks=9, block_size=BLOCK_SIZE)
    tokens = _prompt(0, 10)
    _run_prompt(manager, "p", tokens)
    assert manager.fork("p", "c1", 10) == 8
    assert manager.block_ids("c1") == [1, 2]
    assert manager.fork("p", "c2", 8) == 4  # both blocks are full, but the child must compute a token
    assert manager.block_ids("c2") == [1]
    assert _ref_counts(manager)[:4] == [0, 3, 2, 1]
    assert manager.allocate("c1", tokens, 8, 2) == [4]  # the child's partial block is its own
    assert manager.allocate("c2", tokens[:8], 4, 4) == [5]
    assert manager.allocate("p", tokens + [42], 10, 1) == []
    manager.cache_computed_blocks("c1", tokens, 10)
    assert manager.fork("c1", "c3", 1) == 0
    assert manager.block_ids("c3") == []
    for request_id in ("p", "c1", "c2", "c3"):
        manager.free(request_id)
    assert manager.num_free_blocks == 8
    with pytest.raises(ValueError, match="unknown"):
        manager.fork("p", "c4", 4)


def test_cache_computed_blocks_hashes_only_full_computed_blocks() -> None:
    manager = KVCacheManager(num_blocks=9, block_size=BLOCK_SIZE)
    tokens = _prompt(0, 10)
    manager.allocate("a", tokens, 0, 10)
    manager.cache_computed_blocks("a", tokens, 6)
    manager.cache_computed_blocks("a", tokens, 6)
    assert len(manager.pool.cached_block_ids) == 1
    assert manager.find_cached_prefix(tokens).block_ids == (1,)
    manager.cache_computed_blocks("a", tokens, 10)
    assert manager.find_cached_prefix(tokens).block_ids == (1, 2)
    assert len(manager.pool.cached_block_ids) == 2
    manager.cache_computed_blocks("unknown", tokens, 10)


def test_concurrent_identical_blocks_keep_the_first_mapping() -> None:
    manager = KVCacheManager(num_blocks=9, block_size=BLOCK_SIZE)
    tokens_a = _prompt(0, 9)
    tokens_b = tokens_a[:8] + [60, 61, 62, 63, 64]
    # Both miss before either computes, so each gets its own copy of the first two blocks.
    assert manager.allocate("a", tokens_a, 0, 9) == [1, 2, 3]
    assert manager.allocate("b", tokens_b, 0, 13) == [4, 5, 6, 7]
    manager.cache_computed_blocks("a", tokens_a, 9)
    manager.cache_computed_blocks("b", tokens_b, 13)
    assert sorted(manager.pool.cached_block_ids.values()) == [1, 2, 6]
    manager.free("a")
    manager.free("b")
    assert manager.num_free_blocks == 8
    # b's third block chains from the shared content hash, so it is found behind a's first two blocks.
    assert manager.find_cached_prefix(tokens_b + [1]).block_ids == (1, 2, 6)


def test_caching_off_never_hits() -> None:
    manager = KVCacheManager(num_blocks=9, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    tokens = _prompt(0, 10)
    assert _run_prompt(manager, "a", tokens) == [1, 2, 3]
    assert manager.pool.cached_block_ids == {}
    assert manager.find_cached_prefix(tokens) == CachedPrefix(block_ids=(), num_tokens=0)
    assert _run_prompt(manager, "b", tokens) == [4, 5, 6]
    assert (manager.num_prefix_queries, manager.num_prefix_hits) == (0, 0)


def test_hit_statistics_count_tokens() -> None:
    manager = KVCacheManager(num_blocks=9, block_size=BLOCK_SIZE)
    assert manager.prefix_hit_rate == 0.0
    tokens = _prompt(0, 10)
    _run_prompt(manager, "a", tokens)  # 10 looked up, 0 found
    _run_prompt(manager, "b", tokens)  # 10 looked up, 8 found
    assert (manager.num_prefix_queries, manager.num_prefix_hits) == (20, 8)
    assert manager.prefix_hit_rate == 0.4


def test_reset_prefix_cache_waits_until_no_block_is_in_use() -> None:
    manager = KVCacheManager(num_blocks=9, block_size=BLOCK_SIZE)
    tokens = _prompt(0, 10)
    _run_prompt(manager, "a", tokens)
    assert manager.reset_prefix_cache() is False
    assert manager.find_cached_prefix(tokens).num_tokens == 8
    manager.free("a")
    assert manager.reset_prefix_cache() is True
    assert manager.find_cached_prefix(tokens).num_tokens == 0


def test_misused_cached_prefix_is_refused() -> None:
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    tokens = _prompt(0, 9)
    _run_prompt(manager, "a", tokens)
    prefix = manager.find_cached_prefix(tokens)
    with pytest.raises(ValueError, match="first call"):
        manager.allocate("a", tokens, 9, 1, cached_prefix=prefix)
    with pytest.raises(ValueError, match="does not include"):
        manager.allocate("b", tokens, 0, 9, cached_prefix=prefix)
    manager.free("a")
    manager.allocate("c", _prompt(100, 12), 0, 12)  # evicts the cached blocks
    manager.free("c")
    with pytest.raises(ValueError, match="stale"):
        manager.allocate("b", tokens, 8, 1, cached_prefix=prefix)
    assert manager.num_free_blocks == 3


class _Simulation:
    """Drives a manager the way a scheduler and model runner would, with a shadow copy of every block's content."""

    def __init__(self, manager: KVCacheManager, seed: int) -> None:
        self.manager = manager
        self.rng = random.Random(seed)
        self.token_ids: dict[str, list[int]] = {}
        self.num_computed: dict[str, int] = {}
        # block id -> the request tokens from position 0 up to the last one written into this block
        self.content: dict[int, tuple[int, ...]] = {}
        self.system_prompts = [[self.rng.randrange(4) for _ in range(self.rng.randint(3, 12))] for _ in range(3)]
        self.num_requests = 0

    def new_prompt(self) -> list[int]:
        # A tiny vocabulary makes identical blocks appear by chance too, not only through shared system prompts.
        tail = [self.rng.randrange(4) for _ in range(self.rng.randint(1, 10))]
        return list(self.rng.choice(self.system_prompts)) + tail

    def admit(self) -> None:
        request_id = f"r{self.num_requests}"
        self.num_requests += 1
        token_ids = self.new_prompt()
        prefix = self.manager.find_cached_prefix(token_ids)
        assert prefix.num_tokens < len(token_ids)
        for index, block_id in enumerate(prefix.block_ids):  # a hit holds exactly this prompt's tokens
            assert self.content[block_id] == tuple(token_ids[: (index + 1) * self.manager.block_size])
        self.token_ids[request_id] = token_ids
        self.num_computed[request_id] = prefix.num_tokens
        if not self.step(request_id, prefix):
            del self.token_ids[request_id], self.num_computed[request_id]

    def fork(self) -> None:
        parent_id = self.rng.choice(sorted(self.token_ids))
        num_tokens = self.num_computed[parent_id]
        if num_tokens == 0:
            return
        child_id = f"r{self.num_requests}"
        self.num_requests += 1
        num_shared = self.manager.fork(parent_id, child_id, num_tokens)
        assert num_shared == (num_tokens - 1) // self.manager.block_size * self.manager.block_size
        self.token_ids[child_id] = self.token_ids[parent_id][:num_tokens]
        self.num_computed[child_id] = num_shared

    def step(self, request_id: str, prefix: CachedPrefix | None = None) -> bool:
        """Schedule a chunk of the request; on a refusal check that nothing changed. Returns whether it ran."""
        token_ids, num_computed = self.token_ids[request_id], self.num_computed[request_id]
        num_new = min(self.rng.randint(1, 8), len(token_ids) - num_computed)
        before = _state(self.manager)
        new_block_ids = self.manager.allocate(request_id, token_ids, num_computed, num_new, cached_prefix=prefix)
        if new_block_ids is None:
            assert _state(self.manager) == before
            return False
        block_table = self.manager.block_ids(request_id)
        assert block_table[len(block_table) - len(new_block_ids) :] == new_block_ids
        block_size = self.manager.block_size
        for position in range(num_computed, num_computed + num_new):  # the model writes these positions' KV
            block_id = block_table[position // block_size]
            assert self.manager.pool.blocks[block_id].ref_count == 1, "wrote into a shared block"
            self.content[block_id] = tuple(token_ids[: position + 1])
        num_computed += num_new
        self.num_computed[request_id] = num_computed
        self.manager.cache_computed_blocks(request_id, token_ids, num_computed)
        if num_computed == len(token_ids):  # sample the next token
            token_ids.append(self.rng.randrange(4))
        return True

    def finish(self, request_id: str) -> None:
        self.manager.free(request_id)
        del self.token_ids[request_id], self.num_computed[request_id]

    def check_invariants(self) -> None:
        manager, pool = self.manager, self.manager.pool
        block_size = manager.block_size
        holders = Counter(block_id for request_id in self.token_ids for block_id in manager.block_ids(request_id))
        assert holders[0] == 0 and pool.blocks[0].ref_count == 0 and 0 not in pool.free_queue
        for block in pool.blocks[1:]:
            assert block.ref_count == holders[block.block_id]
        assert set(pool.free_queue) == {block.block_id for block in pool.blocks[1:] if block.ref_count == 0}
        assert manager.num_free_blocks == len(pool.free_queue)
        hashed = {block.block_hash: block.block_id for block in pool.blocks if block.block_hash is not None}
        assert hashed == pool.cached_block_ids
        for block_hash, block_id in pool.cached_block_ids.items():
            content = self.content[block_id]
            assert len(content) % block_size == 0
            assert block_hash == _chain_hash(content, block_size)
        for request_id, token_ids in self.token_ids.items():  # every computed position holds the request's token
            block_table = manager.block_ids(request_id)
            num_computed = self.num_computed[request_id]
            assert len(block_table) * block_size >= num_computed
            for index in range(-(-num_computed // block_size)):
                end = min((index + 1) * block_size, num_computed)
                assert self.content[block_table[index]][:end] == tuple(token_ids[:end])


def _state(manager: KVCacheManager) -> tuple:
    pool = manager.pool
    return (
        list(pool.free_queue),
        [(block.ref_count, block.block_hash) for block in pool.blocks],
        dict(pool.cached_block_ids),
        {request_id: list(table) for request_id, table in manager._block_tables.items()},
    )


def _chain_hash(token_ids: tuple[int, ...], block_size: int) -> bytes:
    block_hash = ROOT_BLOCK_HASH
    for start in range(0, len(token_ids), block_size):
        block_hash = hash_block_tokens(block_hash, token_ids[start : start + block_size])
    return block_hash


@pytest.mark.parametrize("block_size", [1, 2, 4])
@pytest.mark.parametrize("seed", range(4))
def test_random_workload_keeps_the_invariants(block_size: int, seed: int) -> None:
    manager = KVCacheManager(num_blocks=4 + 32 // block_size, block_size=block_size)
    simulation = _Simulation(manager, seed)
    rng = random.Random(seed + 1000)
    for _ in range(400):
        action = rng.random()
        running = sorted(simulation.token_ids)
        if action < 0.25 or not running:
            simulation.admit()
        elif action < 0.3:
            simulation.fork()
        elif action < 0.4:
            simulation.finish(rng.choice(running))
        else:
            request_id = rng.choice(running)
            if not simulation.step(request_id):
                simulation.finish(rng.choice(running))  # preempt someone (perhaps itself)
            elif len(simulation.token_ids[request_id]) > 40:
                simulation.finish(request_id)
        simulation.check_invariants()
    assert manager.num_prefix_hits > 0
    for request_id in sorted(simulation.token_ids):
        simulation.finish(request_id)
    simulation.check_invariants()
    assert manager.num_free_blocks == manager.pool.num_blocks - 1
    assert manager.usage == 0.0
