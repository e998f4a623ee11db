"""Write the tiny quantized checkpoints the GPU tests use into DIR (for GPU machines without ModelOpt).

    python scripts/make_quantized_fixtures.py .gpu_fixtures
    # then, on the GPU: KILN_QUANTIZED_FIXTURES=.gpu_fixtures bash scripts/gpu_check.sh
It makes the same checkpoints as the `quantized` fixture of tests/runtime/test_quantized_engine.py.
"""

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny_models import save_tiny_model  # noqa: E402

from kiln.quantize.modelopt_quantize import quantize_checkpoint  # noqa: E402

FORMATS = [("fp8", None), ("fp8", "fp8"), ("int4-awq", None), ("int4-wo", None)]


def main(out_dir: Path) -> None:
    source = save_tiny_model(out_dir / "tiny")
    for fmt, kv_cache_dtype in FORMATS:
        rng = random.Random(1)
        windows = [[rng.randrange(320) for _ in range(16)] for _ in range(4)]
        name = fmt + ("-kv-fp8" if kv_cache_dtype else "")
        quantize_checkpoint(source, out_dir / name, fmt, windows, kv_cache_dtype=kv_cache_dtype)
        print(f"wrote {out_dir / name}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
