"""Annotation tables for tests: the columns a test names, every other ANNOTATIONS_SCHEMA column null."""

from __future__ import annotations

import pyarrow as pa

from sp2dpo.annotate.schema import ANNOTATIONS_SCHEMA


def annotation_table(**columns: list) -> pa.Table:
    """An ANNOTATIONS_SCHEMA table from equal-length column lists (unnamed columns all null)."""
    n = len(next(iter(columns.values())))
    unknown = set(columns) - set(ANNOTATIONS_SCHEMA.names)
    if unknown:
        raise ValueError(f"not annotation columns: {sorted(unknown)}")
    table = {name: columns.get(name, [None] * n) for name in ANNOTATIONS_SCHEMA.names}
    return pa.table(table, schema=ANNOTATIONS_SCHEMA)
