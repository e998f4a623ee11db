"""CPU benchmark: `LLM.generate` on 32 prompts vs a loop of transformers `generate` on the same prompts.

Both run the built-in SmolLM2-135M-Instruct checkpoint in the same compute dtype, greedy, with exactly
`--max-tokens` new tokens per prompt (EOS ignored), so both do the same work. Prints one JSON line.
Usage: python scripts/bench_cpu_vs_transformers.py CHECKPOINT_DIR [--max-tokens 64] [--num-prompts 32]
"""

import argparse
import json
import platform
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from kiln import LLM, SamplingParams
from kiln.core.version import __version__

TOPICS = [
    "the water cycle",
    "how a kiln fires clay",
    "the French revolution",
    "photosynthesis",
    "black holes",
    "the printing press",
    "volcanoes",
    "the immune system",
    "sourdough bread",
    "the Roman empire",
    "plate tectonics",
    "honey bees",
    "the internet",
    "glaciers",
    "the violin",
    "electric cars",
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument(
        "--hf-dtype", default="same", choices=["same", "bf16", "fp32"], help="transformers' dtype (same = kiln's)"
    )
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    questions = [f"Explain {TOPICS[i % len(TOPICS)]} in {2 + i % 3} sentences." for i in range(args.num_prompts)]
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]
    prompt_ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]

    llm = LLM(args.checkpoint, device="cpu")
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(prompt_ids[:2], params)  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompt_ids, params)
    kiln_seconds = time.perf_counter() - start
    kiln_tokens = sum(len(o.token_ids) for o in outputs)

    # By default the same compute dtype as kiln's (fp32 on a CPU without native bf16, kiln's auto rule);
    # batch-1 decode is bandwidth-bound, so transformers' loop is faster in bf16: --hf-dtype bf16.
    dtype = {"same": llm.engine.runner_dtype, "bf16": torch.bfloat16, "fp32": torch.float32}[args.hf_dtype]
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=dtype)
    model.generate(torch.tensor([prompt_ids[0]]), max_new_tokens=2, do_sample=False)  # warm-up
    start = time.perf_counter()
    hf_tokens = 0
    for ids in prompt_ids:
        generated = model.generate(
            torch.tensor([ids]), max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens, do_sample=False
        )
        hf_tokens += generated.shape[1] - len(ids)
    hf_seconds = time.perf_counter() - start

    print(
        json.dumps(
            {
                "prompts": len(prompt_ids),
                "max_tokens": args.max_tokens,
                "kiln_seconds": round(kiln_seconds, 2),
                "kiln_output_tok_s": round(kiln_tokens / kiln_seconds, 1),
                "hf_loop_seconds": round(hf_seconds, 2),
                "hf_output_tok_s": round(hf_tokens / hf_seconds, 1),
                "ratio": round((kiln_tokens / kiln_seconds) / (hf_tokens / hf_seconds), 2),
                "kiln_dtype": str(llm.engine.runner_dtype).removeprefix("torch."),
                "hf_dtype": str(dtype).removeprefix("torch."),
                "kiln": __version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "cpu": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
