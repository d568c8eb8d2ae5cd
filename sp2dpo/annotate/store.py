"""The annotations directory: atomic Parquet shards, the keys already done, and compaction.

    OUT/<teacher>/<prompt_version>/part-<run>-<seq>.parquet     (ANNOTATIONS_SCHEMA)

One directory per (teacher, prompt_version), so several teachers and prompt variants share one
OUT and the schedule's consensus reads them all (recursively). A shard is written to a hidden
`.tmp-*` file and renamed into place (on object storage, uploaded: an object appears only once
whole), so a run killed at any instant (even `kill -9`) leaves only whole shards; readers skip
names starting with "." or "_". The run id is a UTC timestamp, so
shard names sort in the order they were written.

Resume reads the keys (pair_id) already present. With `--retry-failed`, a failed row's pair is
asked again; its new row supersedes the failed one: after the new shard is safely written, the
shards holding superseded failed rows are rewritten without them (atomically). If a run dies
between the two steps, the next run finishes the compaction first, and a reader that meets both
rows in the meantime keeps the non-failed one (`latest_annotations` here; the schedule's consensus
does the same).
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from sp2dpo.annotate.schema import ANNOTATIONS_SCHEMA
from sp2dpo.storage import (
    delete_file,
    exists,
    is_file,
    join_uri,
    list_files,
    read_parquet,
    read_parquet_schema,
    remove_stale_tmp,
    write_parquet,
)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def slug(name: str) -> str:
    """A directory name for a teacher or prompt version (`vllm:org/model` → `vllm_org_model`)."""
    cleaned = _UNSAFE.sub("_", name).strip("._")
    return cleaned or "_"


def shard_files(uri: str) -> list[str]:
    """`uri` itself if it is a file, else every visible `*.parquet` under it, recursively, sorted
    (oldest run first); empty when nothing is there."""
    if is_file(uri):
        return [uri]
    return list_files(uri, suffix=".parquet")


def _read_shard(uri: str, schema: pa.Schema) -> pa.Table:
    """One shard's `schema` columns; a file that is not an annotations table is refused by name."""
    names = read_parquet_schema(uri).names
    missing = [name for name in ANNOTATIONS_SCHEMA.names if name not in names]
    if missing:
        raise ValueError(f"{uri}: not an annotations table, missing columns {missing}")
    table = read_parquet(uri, columns=schema.names)
    try:
        return table.cast(schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, NotImplementedError) as exc:
        raise ValueError(f"{uri}: columns do not match the annotations schema: {exc}") from exc


def read_shards(uri: str, columns: list[str] | None = None, required: bool = False) -> pa.Table:
    """All rows of all shards under `uri` (file order, duplicates kept), as ANNOTATIONS_SCHEMA or
    its `columns`. With `required`, a missing path or one without shards is an error instead of
    an empty table (a stage reading annotations someone else wrote)."""
    schema = ANNOTATIONS_SCHEMA if columns is None else pa.schema([ANNOTATIONS_SCHEMA.field(c) for c in columns])
    files = shard_files(uri)
    if required and not files:
        if not exists(uri):
            raise FileNotFoundError(f"annotations not found: {uri}")
        raise ValueError(f"no *.parquet annotation shards under {uri}")
    tables = [_read_shard(path, schema) for path in files]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def latest_annotations(uri: str) -> pa.Table:
    """The annotations under `uri` with one row per (pair_id, teacher, prompt_version): the
    latest non-failed row if there is one, else the latest failed row."""
    table = read_shards(uri)
    if table.num_rows == 0:
        return table
    keys = list(zip(table["pair_id"].to_pylist(), table["teacher"].to_pylist(), table["prompt_version"].to_pylist()))
    good = pc.not_equal(table["status"], "failed").to_pylist()
    best: dict[tuple, int] = {}
    for i, key in enumerate(keys):  # later rows win among equals
        j = best.get(key)
        if j is None or good[i] or not good[j]:
            best[key] = i
    return table.take(pa.array(sorted(best.values()), pa.int64()))


@dataclass
class ShardStore:
    out: str
    teacher: str
    prompt_version: str
    # Time first (names sort by run), then a random part: two runs in one second never collide.
    run_id: str = field(default_factory=lambda: time.strftime("%Y%m%dT%H%M%S", time.gmtime())
                        + f"-{uuid.uuid4().hex[:12]}")
    seq: int = 0

    @property
    def dir(self) -> str:
        return join_uri(self.out, slug(self.teacher), slug(self.prompt_version))

    def _mine_mask(self, table: pa.Table) -> pa.ChunkedArray:
        """Rows of this teacher and prompt version (a directory could be shared after slugging)."""
        return pc.and_(pc.equal(table["teacher"], self.teacher), pc.equal(table["prompt_version"], self.prompt_version))

    def _mine(self, table: pa.Table) -> pa.Table:
        return table.filter(self._mine_mask(table))

    def write(self, table: pa.Table) -> str:
        """Write one shard atomically; returns its path."""
        self.seq += 1
        name = f"part-{self.run_id}-{self.seq:06d}.parquet"
        return self._write_atomic(table.cast(ANNOTATIONS_SCHEMA), join_uri(self.dir, name))

    def _write_atomic(self, table: pa.Table, uri: str) -> str:
        write_parquet(table, uri)
        return uri

    def remove_stale_tmp(self) -> int:
        """Delete half-written `.tmp-*` files left by a killed run."""
        return remove_stale_tmp(self.dir)

    def done(self) -> tuple[set[str], set[str]]:
        """(pair_ids with a valid annotation, pair_ids whose only annotations failed)."""
        table = self._mine(read_shards(self.dir, ["pair_id", "teacher", "prompt_version", "status"]))
        ok = set(table.filter(pc.not_equal(table["status"], "failed"))["pair_id"].to_pylist())
        bad = set(table.filter(pc.equal(table["status"], "failed"))["pair_id"].to_pylist()) - ok
        return ok, bad

    def compact(self) -> int:
        """Drop failed rows whose pair has a valid row (superseded by --retry-failed), rewriting
        only the shards that hold them; returns the number of rows dropped."""
        ok, _ = self.done()
        if not ok:
            return 0
        dropped = 0
        value_set = pa.array(sorted(ok), pa.string())
        for uri in shard_files(self.dir):
            table = read_parquet(uri).cast(ANNOTATIONS_SCHEMA)
            superseded = pc.and_(
                pc.and_(pc.equal(table["status"], "failed"), pc.is_in(table["pair_id"], value_set=value_set)),
                self._mine_mask(table),
            )
            n = pc.sum(superseded.cast(pa.int64())).as_py() or 0
            if n == 0:
                continue
            keep = table.filter(pc.invert(superseded))
            if keep.num_rows:
                self._write_atomic(keep, uri)
            else:
                delete_file(uri)
            dropped += n
        return dropped
