"""On a GPU, an engine compiles every Triton kernel it serves with before its first request (runtime/warm_up.py).

A fresh process (kernels in memory would hide a compile; one loaded from Triton's disk cache is still logged)
starts an engine with the compile log on, then serves what a server meets: greedy and random sampling, a
decode mixed with a prompt (a prompt-step graph), and two prompts that arrive together, a step too large
for those graphs that runs eagerly. Round 10 found that step compiling the eager prefill kernel while
serving, a ~1 s stall (docs/benchmarks.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tiny_models import save_tiny_model

SERVE_AFTER_START = textwrap.dedent(
    """
    import logging, random, sys
    from pathlib import Path
    from kiln.runtime.engine import LLMEngine
    from kiln.runtime.engine_config import EngineConfig
    from kiln.runtime.sampling_params import SamplingParams

    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout)
    config = EngineConfig(dtype="fp16", device="cuda", num_kv_blocks=512, max_seq_len=1500, max_num_tokens=2048,
                          max_batch_size=8, attention_backend="triton")
    engine = LLMEngine(Path(sys.argv[1]), config)
    assert engine.runner.mixed_graphs is not None
    print("=== started", flush=True)
    rng = random.Random(0)
    prompt = lambda n: [rng.randrange(1, 320) for _ in range(n)]
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    sampled = SamplingParams(temperature=0.8, max_tokens=6, ignore_eos=True, seed=1)
    engine.add_request(prompt(5), greedy)
    engine.step()
    engine.add_request(prompt(300), sampled)  # with the first one's decode: a prompt-step graph
    engine.step()
    engine.add_request(prompt(700), greedy)  # together: 1,400 tokens and decodes, past the graphs
    engine.add_request(prompt(701), sampled)
    while engine.has_unfinished:
        engine.step()
    print("=== served", engine.runner.mixed_graphs.num_replays, flush=True)
    """
)


@pytest.mark.gpu
def test_serving_after_the_warm_up_compiles_no_kernel(tmp_path: Path) -> None:
    model = save_tiny_model(tmp_path / "llama", with_tokenizer=False, max_position_embeddings=2048)
    result = subprocess.run(
        [sys.executable, "-c", SERVE_AFTER_START, str(model)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "KILN_LOG_STALLS": "100000"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    before, _, after = result.stdout.partition("=== started")
    assert "compiled kernel" in before  # the log is on: start-up compiled (or loaded) its kernels
    served = after.split("=== served")
    assert len(served) == 2 and int(served[1].split()[0]) > 0  # prompt steps replayed graphs
    assert "compiled kernel" not in after, after
