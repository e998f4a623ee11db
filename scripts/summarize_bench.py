"""One table from the `kiln bench ... --json` results that scripts/gpu_bench.sh left in a directory.

python scripts/summarize_bench.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(directory: Path) -> list[str]:
    lines = [
        "| run | backend | requests | output tok/s | TTFT p50 ms | TPOT p50 ms | duration s | server TTFT mean ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(directory.glob("*.json")):
        try:
            result = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):
            lines.append(f"| {path.stem} | failed: see {path.stem}.log | | | | | | |")
            continue
        for backend, run in result.get("runs", {}).items():
            ttft = (run.get("ttft_ms") or {}).get("p50")
            tpot = (run.get("tpot_ms") or {}).get("p50")
            server = (run.get("server") or {}).get("ttft_ms")  # bench serve: the server's own mean
            lines.append(
                f"| {path.stem} | {backend} | {run['completed']} | {run['output_token_throughput']:,.0f} | "
                f"{'' if ttft is None else f'{ttft:.1f}'} | {'' if tpot is None else f'{tpot:.2f}'} | "
                f"{run['duration_s']:.1f} | {'' if server is None else f'{server:.1f}'} |"
            )
    return lines


if __name__ == "__main__":
    print("\n".join(rows(Path(sys.argv[1]))))
