"""Reading tasks: inputs → tasks (byte ranges, row groups, index ranges) → output rows.

`plan_tasks` expands the inputs into tasks whose paths any Ray worker can open; `process_task`
turns one task into its rows, pairs and quarantined rows alike, in input order. A bad line
(invalid JSON or UTF-8) becomes a quarantined row, never a failed read, and every row keeps its
exact source location.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from sp2dpo.data.bundled import BUNDLED, resolve_input
from sp2dpo.data.schema import PAIRS_SCHEMA
from sp2dpo.data.validate import RowError, normalize_record
from sp2dpo.storage import absolute, filesystem_and_path, info, is_file, join_uri, list_files, read_bytes, stage_dir

JSONL_CHUNK_BYTES = 4 << 20
EMPTY_PAIR = {name: None for name in PAIRS_SCHEMA.names}


def _result(source: str, location: str, raw: str, record: Any = None, error: RowError | None = None) -> dict:
    """One output row, uniform for Ray Data: pair columns + quarantine columns, one side null."""
    if error is None:
        try:
            return {**normalize_record(record, os.path.basename(source)), "location": location, "raw": None,
                    "reason": None, "reason_code": None}
        except RowError as exc:
            error = exc
    return {**EMPTY_PAIR, "source": source, "location": location, "raw": raw, "reason": str(error),
            "reason_code": error.code}


def _read_range(path: str, start: int, length: int) -> bytes:
    fs, local = filesystem_and_path(path)
    with fs.open_input_file(local) as f:
        return f.read_at(length, start)


def _jsonl_lines(path: str, start: int, end: int, first_line: int) -> Iterator[tuple[int, bytes]]:
    """Lines whose first byte lies in [start, end), with their 1-based line numbers (the task's
    range always ends at a line end: `_jsonl_tasks` cuts it there)."""
    lines = _read_range(path, start, end - start).split(b"\n")
    if lines and not lines[-1]:
        lines.pop()  # the range ends with a newline
    yield from enumerate(lines, first_line)


def _rows_of_jsonl(task: dict) -> Iterator[dict]:
    path = task["path"]
    for line_no, line in _jsonl_lines(path, task["start"], task["end"], task["first_line"]):
        location = f"line {line_no}"
        if not line.strip():
            continue  # blank lines are not rows
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raw = line.decode("utf-8", errors="backslashreplace").rstrip("\n")
            yield _result(path, location, raw, error=RowError("bad_utf8", f"invalid UTF-8 at byte {exc.start}"))
            continue
        text = text.rstrip("\r\n")
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            error = RowError("bad_json", f"invalid JSON: {exc.msg} at column {exc.colno}")
            yield _result(path, location, text, error=error)
            continue
        yield _result(path, location, text, record)


def _rows_of_records(path: str, records: list[dict], offset: int, label: str) -> Iterator[dict]:
    for i, record in enumerate(records):
        yield _result(path, f"{label} {offset + i}", json.dumps(record, ensure_ascii=False, default=str), record)


def _rows_of_parquet(task: dict) -> Iterator[dict]:
    fs, path = filesystem_and_path(task["path"])
    with fs.open_input_file(path) as f:
        table = pq.ParquetFile(f).read_row_group(task["row_group"])
    yield from _rows_of_records(task["path"], table.to_pylist(), task["first_row"], "row")


def _rows_of_hf(task: dict) -> Iterator[dict]:
    import datasets

    # Memory-mapped, so cheap to open per task; on object storage, a copy staged once per node.
    ds = datasets.load_from_disk(str(stage_dir(task["path"], "datasets")))
    if task["split"] is not None:
        ds = ds[task["split"]]
    rows = ds.select(range(task["start"], task["end"])).to_list()
    source = task["path"] if task["split"] is None else f"{task['path']}[{task['split']}]"
    yield from _rows_of_records(source, rows, task["start"], "row")


def _rows_of_json_array(task: dict) -> Iterator[dict]:
    records = json.loads(read_bytes(task["path"]).decode("utf-8"))
    yield from _rows_of_records(task["path"], records, 0, "item")


def process_task(task: dict) -> Iterator[dict]:
    """Pure: one reading task → its output rows (pairs and quarantined rows, in input order)."""
    kind = task["kind"]
    readers = {"jsonl": _rows_of_jsonl, "parquet": _rows_of_parquet, "hf": _rows_of_hf, "json": _rows_of_json_array}
    reader = readers[kind]
    yield from reader(task)


def _is_json_array(path: str, size: int) -> bool:
    if not _read_range(path, 0, min(size, 4096)).lstrip().startswith(b"["):
        return False
    try:
        return isinstance(json.loads(read_bytes(path).decode("utf-8")), list)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False  # not one valid array: read it line by line so bad lines are quarantined


def _jsonl_tasks(path: str, size: int) -> list[dict]:
    """Byte ranges of about JSONL_CHUNK_BYTES, each ending at a line end."""
    tasks, start, line = [], 0, 1
    fs, local = filesystem_and_path(path)
    with fs.open_input_file(local) as f:
        while start < size:
            chunk = f.read_at(min(JSONL_CHUNK_BYTES, size - start), start)
            while start + len(chunk) < size and b"\n" not in chunk:  # one line longer than a chunk
                chunk += f.read_at(min(JSONL_CHUNK_BYTES, size - start - len(chunk)), start + len(chunk))
            cut = len(chunk) if start + len(chunk) >= size else chunk.rfind(b"\n") + 1
            tasks.append({"kind": "jsonl", "path": path, "start": start, "end": start + cut, "first_line": line,
                          "bytes": cut})
            line += chunk[:cut].count(b"\n")
            start += cut
    return tasks


def _is_hf_dataset_dir(uri: str) -> bool:
    return any(is_file(join_uri(uri, name)) for name in ("dataset_info.json", "dataset_dict.json", "state.json"))


def plan_tasks(inputs: list[str], rows_per_task: int = 5000) -> list[dict]:
    """Expand inputs (bundled names, files, directories; local paths or object-store URIs) into
    reading tasks. Paths in the tasks are absolute or URIs, so any Ray worker can open them."""
    tasks: list[dict] = []
    for item in inputs:
        path = absolute(resolve_input(item))
        found = info(path)
        if found.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"input not found: {item} (bundled names: {sorted(BUNDLED)})")
        if found.type == pafs.FileType.Directory:
            if _is_hf_dataset_dir(path):
                import datasets

                ds = datasets.load_from_disk(str(stage_dir(path, "datasets")))
                splits = list(ds.keys()) if isinstance(ds, datasets.DatasetDict) else [None]
                for split in splits:
                    n = len(ds[split] if split is not None else ds)
                    for s in range(0, n, rows_per_task):
                        tasks.append({"kind": "hf", "path": path, "split": split, "start": s,
                                      "end": min(n, s + rows_per_task)})
            else:
                files = [f for f in list_files(path) if f.endswith((".jsonl", ".json", ".parquet"))]
                if not files:
                    raise ValueError(f"{path}: no .jsonl/.json/.parquet files and not a saved HF dataset")
                tasks.extend(plan_tasks(files, rows_per_task))
        elif path.endswith(".parquet"):
            fs, local = filesystem_and_path(path)
            with fs.open_input_file(local) as f:
                meta = pq.ParquetFile(f).metadata
            first = 0
            for rg in range(meta.num_row_groups):
                tasks.append({"kind": "parquet", "path": path, "row_group": rg, "first_row": first,
                              "bytes": meta.row_group(rg).total_byte_size})
                first += meta.row_group(rg).num_rows
        elif path.endswith(".json") and _is_json_array(path, found.size):
            tasks.append({"kind": "json", "path": path, "bytes": found.size})
        else:
            tasks.extend(_jsonl_tasks(path, found.size))
    return tasks


def input_bytes(tasks: list[dict]) -> int:
    return sum(t.get("bytes", 0) for t in tasks)
