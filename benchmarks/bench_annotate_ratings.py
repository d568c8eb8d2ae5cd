"""The `ratings` teacher through Ray Data on 60,000 pairs; prints pairs/s.

    python benchmarks/bench_annotate_ratings.py [--n 60000]

The pairs are the bundled sample's 994 valid pairs, replicated with fresh pair_ids. Baseline in
the same run: the same vectorised core called once on the whole table in this process (no Ray,
no shards), the floor the Ray Data pipeline adds its reading, scheduling and writing to.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=60_000)
    args = parser.parse_args()

    from sp2dpo.annotate import AnnotateConfig, annotate
    from sp2dpo.annotate.config import RatingsOptions
    from sp2dpo.annotate.ratings import ratings_annotations
    from sp2dpo.annotate.store import read_shards
    from sp2dpo.data.prepare import DataConfig, prepare
    from sp2dpo.utils import init_ray

    with tempfile.TemporaryDirectory() as tmp:
        prepare(DataConfig(inputs=["ultrafeedback-sample"], out=f"{tmp}/data"), show_progress=False)
        base = pq.read_table(f"{tmp}/data/pairs.parquet")
        copies = -(-args.n // base.num_rows)
        parts = []
        for c in range(copies):
            ids = pc.binary_join_element_wise(base["pair_id"], pa.scalar(f"{c:04d}"), "-")
            parts.append(base.set_column(0, "pair_id", ids))
        pairs = pa.concat_tables(parts).slice(0, args.n)
        pq.write_table(pairs, f"{tmp}/pairs.parquet", row_group_size=8192)

        t0 = time.perf_counter()
        ratings_annotations(pairs.select(["pair_id", "score_chosen", "score_rejected"]), RatingsOptions(), "ratings-v1")
        baseline = args.n / (time.perf_counter() - t0)

        init_ray()
        # Warm-up on 1,000 other pairs: Ray starts its worker processes on first use, a one-time
        # cost per cluster that is not the teacher's throughput.
        annotate(AnnotateConfig(pairs=f"{tmp}/pairs.parquet", out=f"{tmp}/warmup", teacher="ratings", limit=1000),
                 show_progress=False)
        summary = annotate(AnnotateConfig(pairs=f"{tmp}/pairs.parquet", out=f"{tmp}/ann", teacher="ratings",
                                          shard_rows=16384), show_progress=False)
        written = read_shards(f"{tmp}/ann")
        assert written.num_rows == args.n and len(set(written["pair_id"].to_pylist())) == args.n
    rate = summary["annotated"] / summary["seconds"]
    print(f"pairs={args.n} annotated={summary['annotated']} failed={summary['failed']} shards={summary['shards']}")
    print(f"in-process core: {baseline:,.0f} pairs/s; Ray Data stream: {summary['rows_per_s']:,.0f} rows/s; "
          f"end to end (resume scan + stream + shards): {rate:,.0f} pairs/s")
    print(f"RESULT ratings_pairs_per_s {summary['rows_per_s']:.0f}")


if __name__ == "__main__":
    main()
