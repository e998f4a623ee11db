"""Scheduler decisions with exact values: chunks, block ids, prefix hits, preemption order."""

from kiln.runtime.kv_cache_manager import KVCacheManager
from kiln.runtime.request import Request, RequestStatus
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.scheduler import Scheduler, SchedulerOutput

BLOCK_SIZE = 4


def make_request(request_id: str, prompt: list[int], max_tokens: int = 8) -> Request:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return Request(request_id, prompt, params, eos_token_ids=(0,), seed=0)


def chunks(output: SchedulerOutput) -> list[tuple[str, int, int]]:
    return [(c.request.request_id, c.start, c.num_new_tokens) for c in output.chunks]


def step(scheduler: Scheduler, token: int = 7) -> SchedulerOutput:
    """schedule + update, sampling `token` for every chunk that reaches the end of its tokens."""
    output = scheduler.schedule()
    sampled = {c.request.request_id: token for c in output.chunks if c.samples}
    scheduler.update(output, sampled)
    return output


def test_chunked_prefill_under_the_token_budget() -> None:
    kv = KVCacheManager(num_blocks=32, block_size=BLOCK_SIZE)
    scheduler = Scheduler(kv, max_batch_size=8, max_num_tokens=10)
    a, b = make_request("a", list(range(1, 15))), make_request("b", list(range(20, 26)))
    scheduler.add(a)
    scheduler.add(b)
    assert chunks(step(scheduler)) == [("a", 0, 10)]  # a's prompt is chunked; b waits for budget
    assert kv.block_ids("a") == [1, 2, 3]
    assert a.arrival_time <= a.first_scheduled_time and b.first_scheduled_time is None  # b is still queued
    first_scheduled = a.first_scheduled_time
    assert chunks(step(scheduler)) == [("a", 10, 4), ("b", 0, 6)]  # a finishes its prompt, b starts
    assert kv.block_ids("a") == [1, 2, 3, 4] and kv.block_ids("b") == [5, 6]
    assert a.output_token_ids == [7] and b.output_token_ids == [7]
    assert a.first_scheduled_time == first_scheduled < b.first_scheduled_time <= b.first_token_time
    assert chunks(step(scheduler)) == [("a", 14, 1), ("b", 6, 1)]  # both decode
    assert a.num_computed_tokens == 15 and a.num_tokens == 16


def test_prefix_hit_starts_with_computed_tokens() -> None:
    kv = KVCacheManager(num_blocks=32, block_size=BLOCK_SIZE)
    scheduler = Scheduler(kv, max_batch_size=8, max_num_tokens=64)
    shared = list(range(1, 9))  # two full blocks
    scheduler.add(make_request("a", shared + [50, 51]))
    step(scheduler)
    scheduler.add(make_request("b", shared + [60]))
    output = step(scheduler)
    assert chunks(output) == [("a", 10, 1), ("b", 8, 1)]  # b computes only its own last token
    assert kv.block_ids("b")[:2] == kv.block_ids("a")[:2] == [1, 2]
    assert output.chunks[1].request.num_cached_prompt_tokens == 8


def test_preemption_takes_the_newest_and_requeues_it_first() -> None:
    kv = KVCacheManager(num_blocks=7, block_size=BLOCK_SIZE)  # 6 usable blocks
    scheduler = Scheduler(kv, max_batch_size=8, max_num_tokens=64)
    a, b, c = (make_request(name, list(range(10 * i + 1, 10 * i + 5)), max_tokens=12) for i, name in enumerate("abc"))
    for request in (a, b, c):
        scheduler.add(request)
    assert chunks(step(scheduler)) == [("a", 0, 4), ("b", 0, 4), ("c", 0, 4)]
    assert [kv.block_ids(r) for r in "abc"] == [[1], [2], [3]]
    step(scheduler)  # each decode needs a second block: 4, 5, 6
    assert [kv.block_ids(r) for r in "abc"] == [[1, 4], [2, 5], [3, 6]]
    for _ in range(3):
        step(scheduler)
    # Position 8 needs a third block each and none is free: c (the newest) is preempted, and its
    # two blocks let a and b go on.
    output = step(scheduler)
    assert [r.request_id for r in output.preempted] == ["c"]
    assert chunks(output) == [("a", 8, 1), ("b", 8, 1)]
    assert [kv.block_ids(r) for r in "ab"] == [[1, 4, 6], [2, 5, 3]]  # tail block 6 was freed first
    assert c.status is RequestStatus.PREEMPTED and c.num_computed_tokens == 0 and c.num_preemptions == 1
    assert kv.block_ids("c") == [] and len(c.output_token_ids) == 5  # tokens kept, KV recomputed later
    first_scheduled = c.first_scheduled_time
    for _ in range(3):
        assert not step(scheduler).preempted
    output = step(scheduler)  # position 12: a fourth block each; b goes next, ahead of c in the queue
    assert [r.request_id for r in output.preempted] == ["b"]
    assert chunks(output) == [("a", 12, 1)]
    assert [r.request_id for r in scheduler.waiting] == ["b", "c"]
    while c.status is not RequestStatus.RUNNING:
        step(scheduler)
    assert c.first_scheduled_time == first_scheduled  # its queueing ended the first time, not at re-admission


def test_everything_finishes_and_frees_every_block() -> None:
    kv = KVCacheManager(num_blocks=9, block_size=BLOCK_SIZE)
    scheduler = Scheduler(kv, max_batch_size=3, max_num_tokens=6)
    requests = [make_request(f"r{i}", list(range(1, 3 + 3 * i)), max_tokens=10) for i in range(5)]
    for request in requests:
        scheduler.add(request)
    steps = 0
    while scheduler.has_unfinished:
        output = step(scheduler)
        assert len(scheduler.running) <= 3 and output.num_tokens <= 6
        steps += 1
        assert steps < 500
    assert all(r.finish_reason == "length" and len(r.output_token_ids) == 10 for r in requests)
    assert kv.num_free_blocks == 8 and kv.usage == 0
    assert scheduler.stats.num_preemptions > 0


def test_stop_token_respects_min_tokens_and_ignore_eos() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE)
    scheduler = Scheduler(kv, max_batch_size=4, max_num_tokens=32)
    params = SamplingParams(max_tokens=10, min_tokens=2, stop_token_ids=[5])
    request = Request("a", [1, 2, 3], params, eos_token_ids=(0,), seed=0)
    scheduler.add(request)
    step(scheduler, token=0)  # EOS, but min_tokens=2 not reached
    assert not request.is_finished
    step(scheduler, token=5)  # a stop token at the second output token
    assert request.finish_reason == "stop" and request.stop_reason == 5
    assert kv.num_free_blocks == 15


def test_cuda_graph_buckets_cover_every_batch_size() -> None:
    from kiln.runtime.cuda_graphs import default_bucket_sizes

    assert default_bucket_sizes(6) == [1, 2, 4, 6]
    assert default_bucket_sizes(256)[:12] == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80]
    assert default_bucket_sizes(256)[-1] == 256 and default_bucket_sizes(300)[-3:] == [256, 288, 300]
    assert default_bucket_sizes(1024)[-6:] == [480, 512, 640, 768, 896, 1024]
