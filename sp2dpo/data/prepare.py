"""Canonical pairs table: read preference data in the forms people have, validate every row.

    sp2dpo data prepare ultrafeedback-sample --out runs/data --json

Every input row ends up in exactly one of two tables: `pairs.parquet` (valid, with a stable
content-hash `pair_id`) or `quarantine.parquet` (the raw row, where it came from, and why it was
refused). Nothing is dropped and nothing is invented.

The reading is split into tasks (byte ranges of JSONL files, row groups of Parquet files, index
ranges of saved HF datasets). Each task is processed by the pure `process_task`, either in this
process (`engine="local"`, small inputs) or as a Ray Data `flat_map` over the tasks
(`engine="ray"`), which streams large inputs through the cluster without ever holding them in one
Python list. We build the tasks ourselves instead of calling `ray.data.read_json`: a single bad
line (invalid JSON or UTF-8) must quarantine that line, not fail the whole read, and every row
must keep its exact source location.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sp2dpo.data.config import DataConfig
from sp2dpo.data.readers import input_bytes, plan_tasks, process_task
from sp2dpo.data.schema import PAIRS_SCHEMA, QUARANTINE_SCHEMA
from sp2dpo.storage import absolute, atomic_output, join_uri, makedirs, write_parquet
from sp2dpo.utils import progress_bar

__all__ = ["DataConfig", "prepare"]


def _row_batches(tasks: list[dict], engine: str, batch_size: int) -> Iterator[list[dict]]:
    if engine == "local":
        batch: list[dict] = []
        for task in tasks:
            for row in process_task(task):
                batch.append(row)
                if len(batch) >= batch_size:
                    yield batch
                    batch = []
        if batch:
            yield batch
        return
    import ray.data

    from sp2dpo.utils import init_ray

    init_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # deterministic output files
    ds = ray.data.from_items(tasks, override_num_blocks=len(tasks)).flat_map(process_task)
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="pyarrow"):
        yield batch.to_pylist()


def _set_aside(row: dict, code: str, reason: str) -> dict:
    """A valid pair that still goes to quarantine (a repeat, or over a size limit)."""
    raw = json.dumps({k: row[k] for k in ("prompt", "chosen", "rejected")}, ensure_ascii=False)
    return {**row, "reason": reason, "reason_code": code, "raw": raw}


def _token_counter(config: DataConfig) -> Callable[[dict], int] | None:
    if config.max_tokens is None:
        return None
    from transformers import AutoTokenizer

    from sp2dpo.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(config.tokenizer))

    def count(row: dict) -> int:
        prompt = len(tokenizer(row["prompt"], add_special_tokens=False)["input_ids"])
        answers = (len(tokenizer(row[k], add_special_tokens=False)["input_ids"]) for k in ("chosen", "rejected"))
        return prompt + max(answers)

    return count


def prepare(config: DataConfig, show_progress: bool = True) -> dict[str, Any]:
    """Write `<out>/pairs.parquet` and `<out>/quarantine.parquet`; return the summary."""
    t0 = time.perf_counter()
    tasks = plan_tasks(config.inputs)
    engine = config.engine
    if engine == "auto":
        engine = "ray" if input_bytes(tasks) >= config.ray_min_bytes else "local"
    out = absolute(config.out)
    makedirs(out)
    pairs_path, quarantine_path = join_uri(out, "pairs.parquet"), join_uri(out, "quarantine.parquet")
    count_tokens = _token_counter(config)
    seen: dict[str, str] = {}
    counts: Counter[str] = Counter()
    total = valid = over_limit = 0
    quarantined: list[dict] = []
    with atomic_output(pairs_path) as (fs, target), pq.ParquetWriter(target, PAIRS_SCHEMA, filesystem=fs) as writer, \
            progress_bar(None, "prepare pairs", disable=not show_progress) as bar:
        for batch in _row_batches(tasks, engine, config.batch_size):
            keep = []
            for row in batch:
                total += 1
                if row["reason"] is None:
                    first = seen.get(row["pair_id"])
                    if first is not None:
                        row = _set_aside(row, "duplicate", f"duplicate of pair {row['pair_id']} ({first})")
                    elif config.limit is not None and valid >= config.limit:
                        over_limit += 1
                        continue
                    elif count_tokens is not None and (n := count_tokens(row)) > config.max_tokens:
                        row = _set_aside(row, "too_long", f"prompt + longer answer is {n} tokens, "
                                                          f"over max_tokens={config.max_tokens}")
                    else:
                        seen[row["pair_id"]] = f"{os.path.basename(row['source'])} {row['location']}"
                        keep.append({k: row[k] for k in PAIRS_SCHEMA.names})
                        valid += 1
                        continue
                counts[row["reason_code"]] += 1
                quarantined.append({"source": row["source"], "location": row["location"], "raw": row["raw"],
                                    "reason": row["reason"], "reason_code": row["reason_code"]})
            if keep:
                writer.write_table(pa.Table.from_pylist(keep, schema=PAIRS_SCHEMA))
            bar.update(len(batch))
    q_schema = QUARANTINE_SCHEMA.append(pa.field("reason_code", pa.string(), nullable=False))
    write_parquet(pa.Table.from_pylist(quarantined, schema=q_schema), quarantine_path)
    seconds = time.perf_counter() - t0
    return {
        "total": total,
        "valid": valid,
        "quarantined": len(quarantined),
        "duplicates": counts.get("duplicate", 0),
        "skipped_over_limit": over_limit,
        "reasons": dict(sorted(counts.items())),
        "engine": engine,
        "pairs": pairs_path,
        "quarantine": quarantine_path,
        "seconds": round(seconds, 3),
        "pairs_per_s": round(total / seconds, 1) if seconds > 0 else None,
    }
