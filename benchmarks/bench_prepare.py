"""Prepare 60,000 pairs (the bundled 1,000 rows replicated, each copy made unique) and print pairs/s.

    python benchmarks/bench_prepare.py [--engine local|ray] [--n 60000]

Baseline in the same run: plain `json.loads` of every line (the floor any loader pays), so the
ratio shows what validation, hashing and Parquet writing cost on top.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from sp2dpo.data.bundled import bundled_path
from sp2dpo.data.prepare import DataConfig, prepare


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=60_000)
    parser.add_argument("--engine", default="local", choices=["local", "ray"])
    args = parser.parse_args()
    rows = [json.loads(line) for line in bundled_path("ultrafeedback-sample").read_text().splitlines()]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pairs_60k.jsonl"
        with path.open("w") as f:
            for i in range(args.n):
                row = dict(rows[i % len(rows)])
                row["prompt"] = f"{row['prompt']} [copy {i // len(rows)}]"  # unique content → unique pair_id
                f.write(json.dumps(row) + "\n")
        t0 = time.perf_counter()
        with path.open("rb") as f:
            for line in f:
                json.loads(line)
        baseline = time.perf_counter() - t0
        summary = prepare(DataConfig(inputs=[str(path)], out=str(Path(tmp) / "out"), engine=args.engine),
                          show_progress=False)
    print(f"rows={summary['total']} valid={summary['valid']} quarantined={summary['quarantined']} "
          f"engine={summary['engine']}")
    print(f"json.loads only: {args.n / baseline:,.0f} rows/s; prepare: {summary['pairs_per_s']:,.0f} pairs/s "
          f"({summary['seconds'] / baseline:.1f}x the parse-only time)")
    print(f"RESULT prepare_pairs_per_s_{args.engine} {summary['pairs_per_s']:.0f}")


if __name__ == "__main__":
    main()
