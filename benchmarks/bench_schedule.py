"""Build the β artifact for 60,000 pairs annotated by 3 teachers (180,000 annotations).

    python benchmarks/bench_schedule.py [--n 60000] [--teachers 3] [--repeats 3]

Pairs: the bundled 1,000-row sample replicated, each copy made unique; annotations: the
score-derived stand-ins of `sp2dpo.schedule.synthetic`, in 4 shards. Reported (median of repeats):
- the schedule itself, in memory: consensus of the 180,000 annotations + β schedule + control
  (the RESULT line), and its two parts;
- the whole `build_artifact` (read pairs and annotations, schedule, write the artifact);
- baseline, same run: the I/O floor any artifact pays — read both tables and write pair_id with a
  constant β (what a global-β artifact would cost with no schedule at all).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from sp2dpo.annotate.store import read_shards
from sp2dpo.data.bundled import bundled_path
from sp2dpo.data.schema import PAIRS_SCHEMA
from sp2dpo.data.validate import normalize_record
from sp2dpo.schedule.artifact import build_artifact
from sp2dpo.schedule.beta import ScheduleConfig
from sp2dpo.schedule.synthetic import synthetic_annotations
from sp2dpo.storage import read_parquet, write_parquet


def make_pairs(n: int) -> pa.Table:
    records = [json.loads(line) for line in bundled_path("ultrafeedback-sample").read_text().splitlines()]
    valid = []
    for record in records:
        try:
            valid.append(normalize_record(record, "ultrafeedback-sample"))
        except ValueError:
            continue
    rows = []
    for i in range(n):
        src = valid[i % len(valid)]
        record = {"prompt": f"{src['prompt']} [copy {i // len(valid)}]", "chosen": src["chosen"],
                  "rejected": src["rejected"], "score_chosen": src["score_chosen"],
                  "score_rejected": src["score_rejected"]}
        rows.append(normalize_record(record, "bench"))
    return pa.Table.from_pylist(rows, schema=PAIRS_SCHEMA)


def io_floor(pairs_path: str, ann_path: str, out: str, beta0: float) -> float:
    t0 = time.perf_counter()
    ids = read_parquet(pairs_path, columns=["pair_id"])["pair_id"]
    read_shards(ann_path, required=True)
    pq.write_table(pa.table({"pair_id": ids, "beta": pa.array([beta0] * len(ids), pa.float64())}), out)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=60_000)
    parser.add_argument("--teachers", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = ScheduleConfig(reversed_policy="flip")
    with tempfile.TemporaryDirectory() as tmp:
        pairs = make_pairs(args.n)
        pairs_path = str(Path(tmp) / "pairs.parquet")
        pq.write_table(pairs, pairs_path)
        ann = synthetic_annotations(pairs, teachers=args.teachers, seed=0, failed_rate=0.02)
        shard = -(-ann.num_rows // 4)
        for i in range(4):
            write_parquet(ann.slice(i * shard, shard), str(Path(tmp) / "ann" / f"part-{i}.parquet"))
        ann_path = str(Path(tmp) / "ann")

        floor, build, sched, cons, beta, glob = [], [], [], [], [], []
        for _ in range(args.repeats):
            floor.append(io_floor(pairs_path, ann_path, str(Path(tmp) / "floor.parquet"), cfg.beta0))
            summary = build_artifact(pairs_path, ann_path, str(Path(tmp) / "beta.parquet"), cfg)
            build.append(summary["seconds"])
            sched.append(summary["consensus_seconds"] + summary["schedule_seconds"])
            cons.append(summary["consensus_seconds"])
            beta.append(summary["schedule_seconds"])
            glob.append(build_artifact(pairs_path, ann_path, str(Path(tmp) / "global.parquet"), cfg,
                                       control="global")["seconds"])
    floor_s, build_s, sched_s, cons_s, beta_s, glob_s = (statistics.median(x)
                                                         for x in (floor, build, sched, cons, beta, glob))
    print(f"pairs={summary['pairs']} annotations={ann.num_rows} teachers={args.teachers} "
          f"flipped={summary['flipped']} mean_beta={summary['mean_beta']} per_category={summary['per_category']}")
    print(f"median of {args.repeats}: schedule {sched_s:.3f} s "
          f"(consensus {cons_s:.3f} s + beta and control {beta_s:.3f} s); "
          f"build_artifact {build_s:.3f} s (global control {glob_s:.3f} s); "
          f"I/O floor (read both tables, write a constant beta) {floor_s:.3f} s "
          f"-> build is {build_s / floor_s:.2f}x the floor")
    print(f"RESULT schedule_60k_seconds {sched_s:.4f}")


if __name__ == "__main__":
    main()
