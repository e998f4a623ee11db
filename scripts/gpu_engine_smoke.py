"""GPU smoke benchmark of the engine: a Llama-architecture model with random weights (made on the GPU),
offline throughput with and without CUDA graphs. Prints a table; not a substitute for `kiln bench`.
Usage: python scripts/gpu_engine_smoke.py [--preset 1b|8b] [--num-prompts 64] [--input-len 128] [--output-len 128]
"""

import argparse
import gc
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kiln import LLM, SamplingParams

PRESETS = {
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
}


def make_checkpoint(preset: str, out: Path) -> Path:
    config = LlamaConfig(
        **PRESETS[preset],
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    )
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return out


def run(checkpoint: Path, graphs: bool, prompts: list[list[int]], output_len: int) -> tuple[float, float]:
    llm = LLM(str(checkpoint), enable_cuda_graphs=graphs, max_seq_len=1024, max_batch_size=256)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:4], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outputs)
    (single,) = llm.generate([prompts[0]], params)
    decode_tok_s = (output_len - 1) / (single.metrics.finish_time - single.metrics.first_token_time)
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return tokens / seconds, decode_tok_s


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="1b", choices=sorted(PRESETS))
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 128000, (args.num_prompts, args.input_len), generator=generator).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_checkpoint(args.preset, Path(tmp) / "model")
        rows = [(graphs, *run(checkpoint, graphs, prompts, args.output_len)) for graphs in (False, True)]
    print(
        f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, preset {args.preset}, bf16, "
        f"{args.num_prompts} prompts x {args.input_len} in / {args.output_len} out"
    )
    print(f"{'cuda graphs':>12} {'batch out tok/s':>16} {'batch-1 decode tok/s':>22}")
    for graphs, throughput, decode in rows:
        print(f"{str(graphs):>12} {throughput:16.1f} {decode:22.1f}")


if __name__ == "__main__":
    main()
