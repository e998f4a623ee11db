"""The engine's own host work per decode step, without any model: what the GPU waits for between steps.

On a GPU a decode step at batch 256 is ~9 ms of kernels, and the engine's Python work (scheduling,
KV block bookkeeping, detokenization, output snapshots) runs in series with it. This replaces the
runner's forward-and-sample with a fixed token for every sequence, so what is timed is that work
alone; it needs no GPU and gives the same numbers on any machine of the same CPU speed.

    python scripts/host_step_time.py --batch-size 256 --output-len 100 [--model builtin:smollm2-135m] [--profile]

The model only runs the prompts' step; its tokenizer is what detokenization costs are made of. With
--runner the runner's own host work is timed too (packing the flat batch, the sampling batch, reading the
tokens back): only the forward and the sampler's kernels are replaced, by a fixed token for every row.
With --no-tokenizer outputs are not detokenized (as `kiln bench` with --dummy-weights, which has none).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=100)
    parser.add_argument("--output-kind", default="delta", choices=["cumulative", "delta", "final_only"],
                        help="what each step's outputs carry (kiln bench uses delta)")  # fmt: skip
    parser.add_argument("--profile", action="store_true", help="print the cProfile top functions too")
    parser.add_argument("--runner", action="store_true", help="keep the runner's host work (see above)")
    parser.add_argument("--no-tokenizer", action="store_true", help="no detokenization, as with dummy weights")
    args = parser.parse_args()

    import torch

    from kiln.runtime.engine import LLMEngine
    from kiln.runtime.engine_config import EngineConfig
    from kiln.runtime.model_dir import resolve_model_source
    from kiln.runtime.model_runner import LaunchedStep, RunnerOutput
    from kiln.runtime.outputs import RequestOutputKind
    from kiln.runtime.sampler import SamplerOutput
    from kiln.runtime.sampling_params import SamplingParams

    model_dir = resolve_model_source(args.model)
    blocks = args.batch_size * (-(-(args.prompt_len + args.output_len) // 16)) + 1
    engine = LLMEngine(model_dir, EngineConfig(device="cpu", num_kv_blocks=blocks, max_batch_size=args.batch_size))
    kind = RequestOutputKind(args.output_kind)
    params = SamplingParams(max_tokens=args.output_len, temperature=1.0, ignore_eos=True, output_kind=kind)
    rng = random.Random(0)
    for _ in range(args.batch_size):
        engine.add_request([rng.randrange(1, 5000) for _ in range(args.prompt_len)], params)
    engine.step()  # the prompts, with the real forward

    def launch_nothing(scheduled) -> LaunchedStep:
        return LaunchedStep(scheduled, [], {})

    def sample_a_fixed_token(launched: LaunchedStep) -> RunnerOutput:
        output = RunnerOutput()
        for chunk in launched.scheduled.chunks:
            if chunk.samples:
                output.sampled[chunk.request.request_id] = 1000 + len(chunk.request.output_token_ids) % 500
        return output

    def logits_of_nothing(step) -> list:
        return [torch.zeros(len(rows), 1) for rows in step.logit_rows]

    def draw_a_fixed_token(logits, batch) -> SamplerOutput:
        return SamplerOutput(torch.full((logits.shape[0],), 1000, dtype=torch.int64), None, None, None)

    if args.runner:
        engine.runner.run_step, engine.runner.sampler = logits_of_nothing, draw_a_fixed_token
    else:
        engine.runner.launch, engine.runner.finish = launch_nothing, sample_a_fixed_token
    if args.no_tokenizer:
        for group in engine.groups.values():
            group._detokenizers.clear()
    profiler = cProfile.Profile() if args.profile else None
    steps, started = 0, time.perf_counter()
    if profiler:
        profiler.enable()
    while engine.has_unfinished:
        engine.step()
        steps += 1
    if profiler:
        profiler.disable()
    seconds = time.perf_counter() - started
    print(f"batch {args.batch_size}: {steps} decode steps, {1000 * seconds / steps:.2f} ms of host work a step")
    if profiler:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(20)
        print(text.getvalue())


if __name__ == "__main__":
    main()
