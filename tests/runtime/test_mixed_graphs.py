"""CUDA graphs for steps with prompt tokens (runtime/mixed_graphs.py): the tokens of eager steps, on a GPU.

The padding itself (a padding sequence, sentinel tiles, slot -1 tokens) was checked against the eager forward
bit for bit with the Triton kernels in the interpreter; here the captured graphs replay in a running engine:
staggered requests make steps that mix prompt chunks with decodes, and prefix caching makes chunks that
start after cached tokens.
"""

from pathlib import Path

import pytest
from engine_workloads import MAX_TOKENS, run_staggered
from tiny_models import save_tiny_model

from kiln.runtime.engine import LLMEngine
from kiln.runtime.engine_config import EngineConfig
from kiln.runtime.mixed_graphs import default_mixed_buckets
from kiln.runtime.sampling_params import SamplingParams


def test_buckets_cover_the_step_budget_with_little_padding() -> None:
    buckets = default_mixed_buckets(8192)
    assert buckets[0] == 32 and buckets[-1] == 1024 and buckets == sorted(set(buckets))
    assert all(later <= 1.5 * earlier for earlier, later in zip(buckets[3:], buckets[4:]))  # <= 50% padding
    assert default_mixed_buckets(100) == [32, 64, 96] and default_mixed_buckets(16) == []


@pytest.mark.gpu
@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-cache", "no-prefix-cache"])
def test_mixed_step_graphs_give_the_eager_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefix_caching: bool
) -> None:
    source = save_tiny_model(tmp_path / "sharp", with_tokenizer=False, initializer_range=0.3)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    config = EngineConfig(
        dtype="fp16", device="cuda", num_kv_blocks=64, max_num_tokens=48, max_batch_size=6, max_seq_len=84,
        enable_prefix_caching=prefix_caching, attention_backend="triton",
    )  # fmt: skip
    engine = LLMEngine(source, config)
    graphs = engine.runner.mixed_graphs
    assert graphs is not None and graphs.bucket_sizes == [32]
    results = run_staggered(engine, params)
    assert graphs.num_replays > 0 and engine.runner.decode_graphs.num_replays > 0
    assert engine.kv_cache.num_free_blocks == config.num_kv_blocks - 1
    del engine
    monkeypatch.setenv("KILN_MIXED_STEP_GRAPHS", "0")
    eager_engine = LLMEngine(source, config)
    assert eager_engine.runner.mixed_graphs is None
    eager = run_staggered(eager_engine, params)
    # Steps of short chunks run 16-query tiles eagerly and 64-query ones in the graph: masked keys add exact
    # zeros, but the products may round differently, so one request may part ways at a near-tie.
    assert sum(results[key] == eager[key] for key in eager) >= len(eager) - 1
