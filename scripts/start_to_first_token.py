"""Process start to first token of `kiln run`, engine vs checkpoint (docs/benchmarks.md, issue 5).

Times fresh processes of `kiln run MODEL --prompt ... --max-tokens 1 --ignore-eos` (load, KV sizing,
CUDA-graph capture, prefill, one token, exit): an upper bound of start-to-first-token that includes
interpreter start and exit. Usage:
    python scripts/start_to_first_token.py MODEL [MODEL ...] [--repeat 3] [-- extra kiln run flags]
With --make-8b DIR (GPU), it first writes a Llama-3-8B-shaped checkpoint with random weights to DIR/checkpoint
and builds DIR/engine from it, then times both. With --make-dummy DIR it builds engines of random weights
(`kiln build --dummy-weights`, on disk like any engine) for --preset in each of --quantizations (bf16, fp8,
int4-awq), with a small tokenizer so they take text, and times those:
    python scripts/start_to_first_token.py --make-dummy /tmp/st --preset llama-3-8b --quantizations fp8 int4-awq
With --explain, each model also runs once with its Triton kernel loads logged (KILN_LOG_STALLS: their number
and time, and the warm-up's time) and once without the warm-up (KILN_WARM_UP=0).
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def time_run(model: str, extra: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    """(seconds, stderr) of one `kiln run` process."""
    command = [sys.executable, "-m", "kiln.cli.main", "run", model, "--prompt", "Hello", "--max-tokens", "1"]
    start = time.perf_counter()
    environment = {**os.environ, "COLUMNS": "400", **(env or {})}  # unwrapped log lines, to be parsed
    done = subprocess.run([*command, "--ignore-eos", *extra], capture_output=True, text=True, env=environment)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"kiln run {model} failed:\n{done.stderr[-2000:]}")
    return seconds, done.stderr


def explain(model: str, extra: list[str]) -> None:
    """Where a start's time goes: Triton kernels loaded or compiled, the warm-up, and a start without it."""
    seconds, log = time_run(model, extra, {"KILN_LOG_STALLS": "1e9"})
    kernels = [float(ms) for ms in re.findall(r"compiled kernel \S+ in (\d+) ms", log)]
    warm_up = re.search(r"warm-up: .* in ([0-9.]+) s", log)
    print(f"{model}: {seconds:.2f} s with {len(kernels)} kernel(s) loaded or compiled in {sum(kernels) / 1000:.2f} s, "
          f"warm-up {warm_up.group(1) if warm_up else '?'} s", flush=True)  # fmt: skip
    seconds, _ = time_run(model, extra, {"KILN_WARM_UP": "0"})
    print(f"{model}: {seconds:.2f} s with KILN_WARM_UP=0", flush=True)


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


def make_dummy(out: Path, preset: str, quantizations: list[str]) -> list[str]:
    """Engines of random weights for `preset` (a preset name or config.json), one per quantization."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from tiny_models import make_tiny_tokenizer

    from kiln.models.presets import dummy_model_dir

    model = out / "model"
    model.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(dummy_model_dir(preset, out / "cache") / "config.json", model / "config.json")
    make_tiny_tokenizer(320).save_pretrained(model)  # `kiln run` takes text; any small tokenizer will do
    engines = []
    for quantization in quantizations:
        engine = out / f"engine-{quantization}"
        quant = [] if quantization == "bf16" else ["--dummy-quantization", quantization]
        begin = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "kiln.cli.main", "build", str(model), "--dummy-weights", *quant, "-o", str(engine),
             "--max-seq-len", "4096", "--force"],
            check=True,
        )  # fmt: skip
        print(f"{engine.name} built in {time.perf_counter() - begin:.1f} s", flush=True)
        engines.append(str(engine))
    return engines


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="*")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--make-8b", type=Path)
    parser.add_argument("--make-dummy", type=Path)
    parser.add_argument("--preset", default="llama-3-8b", help="for --make-dummy: a preset name or a config.json")
    parser.add_argument("--quantizations", nargs="+", default=["bf16", "fp8", "int4-awq"])
    parser.add_argument("--explain", action="store_true", help="also: kernel loads, warm-up, a start without it")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    models = args.models + (make_8b(args.make_8b) if args.make_8b else [])
    if args.make_dummy:
        models += make_dummy(args.make_dummy, args.preset, args.quantizations)
    for model in models:
        times = [time_run(model, extra)[0] for _ in range(args.repeat)]
        print(f"{model}: median {statistics.median(times):.2f} s of {[round(t, 2) for t in times]}", flush=True)
        if args.explain:
            explain(model, extra)


if __name__ == "__main__":
    main()
