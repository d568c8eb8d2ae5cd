"""The training pairs tokenized once, beside the artifact; each worker reads back only its shard.

    tokens = tokenize_once(table, tokenizer, max_length, artifact, tasks=8)  # the driver, before any worker starts
    shard = read_shard(tokens, plan.shard(rank), tokenizer)                  # a worker: its index range, as numpy

The cache `<artifact stem>.tokens-<tag digest>.parquet` holds, in training-table order, each
pair's token ids (`prompt_ids`, `chosen_ids`, `rejected_ids`, list<int32>, made by
`data.tokenize_table`, so exactly what training tokenized before) and the per-pair columns the
loop reads (`beta`, the reference log-probs, `category`). Its tag says what the ids depend on:
the tokenizer (`tokenizer_hash`, which covers the chat template too via `chat_template_hash`),
`max_length`, and the training rows themselves (`rows_hash`: text, flips, β, reference
log-probs, in order). A cache whose tag matches is reused; otherwise it is rebuilt. A worker
refuses a cache whose stored tag is not the one the driver checked, or whose tokenizer is not
the worker's own, so no run trains on ids made for another tokenizer or max_length.

Rows are written in row groups of ROW_GROUP pairs, so a worker reads only the groups that hold
its index range: a worker holds 1/num_workers of the token ids, as flat int32 arrays with
offsets, instead of every pair as Python lists.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sp2dpo.schedule.artifact import REF_LOGP_COLUMNS, ArtifactError
from sp2dpo.storage import atomic_output, exists, filesystem_and_path, read_sp2dpo_metadata
from sp2dpo.train.data import tokenize_table, tokenizer_hash
from sp2dpo.utils import progress_bar

TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
PER_PAIR_COLUMNS = ("beta", *REF_LOGP_COLUMNS)
ROW_GROUP = 1024  # pairs per Parquet row group, and per tokenization chunk
FORMAT = 1  # bump when the cache's columns or their meaning change


def check_beta(beta: np.ndarray, where: str) -> None:
    """β_i > 0 for every pair, checked once here rather than on the device at every step."""
    bad = int(np.count_nonzero(~(beta > 0)))  # NaN fails `> 0` too
    if bad:
        raise ArtifactError(f"{where}: {bad} trained pairs have a beta that is not > 0")


def rows_hash(table: pa.Table) -> str:
    """Digest of the training rows the cache is made from: their text, β, reference log-probs
    and category, in table order (Arrow IPC bytes, so no per-row Python work)."""
    names = [c for c in ("pair_id", "prompt", "prompt_messages", "chosen", "rejected", "category",
                         *PER_PAIR_COLUMNS) if c in table.column_names]
    sink = pa.BufferOutputStream()
    selected = table.select(names).replace_schema_metadata(None)
    with pa.ipc.new_stream(sink, selected.schema) as writer:
        writer.write_table(selected)
    return hashlib.sha256(sink.getvalue()).hexdigest()[:16]


def cache_tag(table: pa.Table, tokenizer: Any, max_length: int | None) -> dict[str, Any]:
    template = tokenizer.chat_template or ""
    return {"format": FORMAT, "tokenizer_hash": tokenizer_hash(tokenizer),
            "chat_template_hash": hashlib.sha256(template.encode()).hexdigest()[:16],
            "max_length": max_length, "rows_hash": rows_hash(table), "rows": table.num_rows}


def cache_path(artifact: str, tag: dict[str, Any]) -> str:
    """Beside the artifact, named by the tag: runs with another tokenizer or max_length on the
    same artifact get their own file instead of overwriting each other's."""
    digest = hashlib.sha256(json.dumps(tag, sort_keys=True).encode()).hexdigest()[:12]
    stem = artifact[: -len(".parquet")] if artifact.endswith(".parquet") else artifact
    return f"{stem}.tokens-{digest}.parquet"


def _chunk_table(table: pa.Table, tokenizer: Any, max_length: int | None) -> pa.Table:
    examples = tokenize_table(table, tokenizer, max_length)
    columns = {name: pa.array([ex[name] for ex in examples], pa.list_(pa.int32())) for name in TOKEN_COLUMNS}
    for name in PER_PAIR_COLUMNS:
        if name in table.column_names:
            columns[name] = table[name].cast(pa.float64())
    columns["category"] = table["category"].cast(pa.string())
    return pa.table(columns)


def tokenize_once(table: pa.Table, tokenizer: Any, max_length: int | None, artifact: str, tasks: int = 1,
                  show_progress: bool = False) -> dict[str, Any]:
    """The cache for these training rows (built unless a matching one exists): {path, tag, reused}.

    `tasks` > 1 tokenizes that many row groups at once as 1-CPU Ray tasks (Ray must be up; on a
    cluster they spread over its nodes); the file is the same either way."""
    tag = cache_tag(table, tokenizer, max_length)
    path = cache_path(artifact, tag)
    if exists(path) and read_sp2dpo_metadata(path).get("tokens") == tag:
        return {"path": path, "tag": tag, "reused": True}
    if "beta" in table.column_names:
        check_beta(table["beta"].to_numpy(zero_copy_only=False), artifact)
    with atomic_output(path) as (fs, local), progress_bar(table.num_rows, "tokenize", disable=not show_progress) as bar:
        writer = None
        for chunk in _row_groups(table, tokenizer, max_length, tasks):
            if writer is None:
                metadata = {b"sp2dpo.tokens": json.dumps(tag, sort_keys=True).encode()}
                writer = pq.ParquetWriter(local, chunk.schema.with_metadata(metadata), filesystem=fs)
            writer.write_table(chunk, row_group_size=ROW_GROUP)
            bar.update(chunk.num_rows)
        writer.close()
    return {"path": path, "tag": tag, "reused": False}


def _row_groups(table: pa.Table, tokenizer: Any, max_length: int | None, tasks: int) -> Iterator[pa.Table]:
    """The cache's row groups in table order: made here, or by up to `tasks` Ray tasks at once,
    which read the table and the tokenizer from the object store (one copy, not one per task)
    while the caller writes the groups already done."""
    starts = range(0, table.num_rows, ROW_GROUP)
    if tasks <= 1 or len(starts) <= 1:
        for start in starts:
            yield _tokenize_row_group(table, tokenizer, start, ROW_GROUP, max_length)
        return
    import ray

    table_ref, tokenizer_ref = ray.put(table), ray.put(tokenizer)
    remote = ray.remote(num_cpus=1)(_tokenize_row_group)
    pending: deque[Any] = deque()
    for start in starts:
        if len(pending) >= tasks:
            yield ray.get(pending.popleft())
        pending.append(remote.remote(table_ref, tokenizer_ref, start, ROW_GROUP, max_length))
    while pending:
        yield ray.get(pending.popleft())


def _tokenize_row_group(table: pa.Table, tokenizer: Any, start: int, size: int, max_length: int | None) -> pa.Table:
    return _chunk_table(table.slice(start, size), tokenizer, max_length)


def _flat(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A list<int32> column as (values, offsets) numpy arrays, offsets starting at 0."""
    array = column.combine_chunks()
    offsets = array.offsets.to_numpy()
    return array.flatten().to_numpy(), (offsets - offsets[0]).astype(np.int64)


@dataclass
class TokenizedShard:
    """One worker's pairs, global indices start .. start + len - 1, in compact arrays."""

    start: int
    ids: dict[str, tuple[np.ndarray, np.ndarray]]
    per_pair: dict[str, np.ndarray]
    category: list[str]

    def __len__(self) -> int:
        return len(self.category)

    def example(self, index: int) -> dict[str, Any]:
        """Pair `index` (global) as `data.tokenize_table` made it, for the collators."""
        i = index - self.start
        if not 0 <= i < len(self):
            raise IndexError(f"pair {index} is not in this worker's shard [{self.start}, {self.start + len(self)})")
        example: dict[str, Any] = {}
        for name, (values, offsets) in self.ids.items():
            example[name] = values[offsets[i]: offsets[i + 1]].tolist()
        for name, values in self.per_pair.items():
            example[name] = float(values[i])
        example["index"] = index
        return example


def read_shard(tokens: dict[str, Any], rows: range, tokenizer: Any) -> TokenizedShard:
    """Rows `rows` of the cache (only the row groups holding them are read), after checking the
    cache is the one the driver checked and was made with this worker's tokenizer."""
    path, tag = tokens["path"], tokens["tag"]
    fs, local = filesystem_and_path(path)
    with fs.open_input_file(local) as f:
        parquet = pq.ParquetFile(f)
        raw = (parquet.schema_arrow.metadata or {}).get(b"sp2dpo.tokens")
        found = json.loads(raw) if raw else None
        if found != tag:
            raise ArtifactError(f"{path}: the tokenized pairs were made for {found}, not {tag} (another tokenizer, "
                                "max_length or artifact); rerun `sp2dpo train`, which rebuilds them")
        if tokenizer_hash(tokenizer) != tag["tokenizer_hash"]:
            raise ArtifactError(f"{path}: tokenized with another tokenizer than this worker's; rerun `sp2dpo train`")
        sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        groups = [g for g in range(len(sizes)) if bounds[g] < rows.stop and bounds[g + 1] > rows.start]
        table = parquet.read_row_groups(groups) if groups else parquet.schema_arrow.empty_table()
    first = int(bounds[groups[0]]) if groups else rows.start
    table = table.slice(rows.start - first, len(rows))
    per_pair = {name: table[name].to_numpy() for name in PER_PAIR_COLUMNS if name in table.column_names}
    if "beta" in per_pair:
        check_beta(per_pair["beta"], path)
    return TokenizedShard(start=rows.start, ids={name: _flat(table[name]) for name in TOKEN_COLUMNS},
                          per_pair=per_pair, category=table["category"].to_pylist())
