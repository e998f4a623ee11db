"""Process start to first token of `kiln run`, engine vs checkpoint (docs/benchmarks.md, issue 5).

Times fresh processes of `kiln run MODEL --prompt ... --max-tokens 1 --ignore-eos` (load, KV sizing,
CUDA-graph capture, prefill, one token, exit): an upper bound of start-to-first-token that includes
interpreter start and exit. Usage:
    python scripts/start_to_first_token.py MODEL [MODEL ...] [--repeat 3] [-- extra kiln run flags]
With --make-8b DIR (GPU), it first writes a Llama-3-8B-shaped checkpoint with random weights to DIR/checkpoint
and builds DIR/engine from it, then times both.
"""

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path


def time_run(model: str, extra: list[str]) -> float:
    command = [sys.executable, "-m", "kiln.cli.main", "run", model, "--prompt", "Hello", "--max-tokens", "1"]
    start = time.perf_counter()
    done = subprocess.run([*command, "--ignore-eos", *extra], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"kiln run {model} failed:\n{done.stderr[-2000:]}")
    return seconds


def make_8b(out: Path) -> list[str]:
    sys.path.insert(0, str(Path(__file__).parent))
    from gpu_engine_smoke import make_checkpoint

    checkpoint, engine = out / "checkpoint", out / "engine"
    begin = time.perf_counter()
    make_checkpoint("8b", checkpoint)
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from tiny_models import make_tiny_tokenizer

    make_tiny_tokenizer(320).save_pretrained(checkpoint)  # `kiln run` takes text; any small tokenizer will do
    print(f"random 8B checkpoint written in {time.perf_counter() - begin:.1f} s", flush=True)
    begin = time.perf_counter()
    kiln = [sys.executable, "-m", "kiln.cli.main"]
    subprocess.run([*kiln, "build", str(checkpoint), "-o", str(engine), "--max-seq-len", "4096", "--force"], check=True)
    print(f"engine built in {time.perf_counter() - begin:.1f} s", flush=True)
    return [str(engine), str(checkpoint)]


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="*")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--make-8b", type=Path)
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    models = args.models + (make_8b(args.make_8b) if args.make_8b else [])
    for model in models:
        times = [time_run(model, extra) for _ in range(args.repeat)]
        print(f"{model}: median {statistics.median(times):.2f} s of {[round(t, 2) for t in times]}", flush=True)


if __name__ == "__main__":
    main()
