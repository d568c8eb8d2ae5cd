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

import hashlib
import json
import math
import os
import time
from collections import Counter
from typing import Any, Callable, Iterator, Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import Field

from sp2dpo.config import StageConfig
from sp2dpo.data.bundled import BUNDLED, resolve_input
from sp2dpo.data.schema import PAIRS_SCHEMA, QUARANTINE_SCHEMA
from sp2dpo.storage import (absolute, atomic_output, filesystem_and_path, info, is_file, join_uri, list_files, makedirs,
                            read_bytes, stage_dir, write_parquet)
from sp2dpo.utils import progress_bar

SCORE_FIELDS = ("score_chosen", "score_rejected")
TEXT_FIELDS = ("prompt", "chosen", "rejected")
JSONL_CHUNK_BYTES = 4 << 20


class DataConfig(StageConfig):
    """`sp2dpo data prepare` settings."""

    inputs: list[str] = Field(default_factory=lambda: ["ultrafeedback-sample"])
    out: str = "runs/data"
    # local: in-process; ray: Ray Data over the cluster; auto: ray above `ray_min_bytes` of input.
    engine: Literal["auto", "local", "ray"] = "auto"
    ray_min_bytes: int = 64 << 20
    batch_size: int = 4096
    # Keep at most this many pairs (after validation), for quick runs; None keeps all.
    limit: int | None = None
    # Set aside pairs whose prompt + longer answer exceed this many tokens of `tokenizer`
    # (reason_code `too_long`): a run setting that fits pairs to a student's max_length (leave room
    # for the chat template), not a fault.
    max_tokens: int | None = Field(None, ge=1)
    tokenizer: str = "smollm2"  # a local HF dir or a bundled model name


class RowError(ValueError):
    """A row that cannot become a pair; `code` groups reasons for the summary."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code


# ----------------------------------------------------------------------------- row validation


def _messages(field: str, value: list) -> list[dict[str, str]]:
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise RowError("wrong_type", f"field {field!r}: message {i} is {type(message).__name__}, not an object")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role.strip():
            raise RowError("bad_message", f"field {field!r}: message {i} has no role")
        if content is None:
            raise RowError("bad_message", f"field {field!r}: message {i} ({role}) has no content")
        if not isinstance(content, str):
            raise RowError("wrong_type", f"field {field!r}: message {i} content is {type(content).__name__}, not a string")
        if not content.strip():
            raise RowError("empty", f"field {field!r}: message {i} ({role}) has empty content")
        messages.append({"role": role, "content": content})
    if not messages:
        raise RowError("empty", f"field {field!r} is an empty message list")
    return messages


def _text_or_messages(record: dict, field: str) -> str | list[dict[str, str]]:
    if field not in record:
        raise RowError("missing", f"missing field {field!r}")
    value = record[field]
    if value is None:
        raise RowError("null", f"field {field!r} is null")
    if isinstance(value, str):
        if not value.strip():
            raise RowError("empty", f"field {field!r} is empty or whitespace-only")
        return value
    if isinstance(value, list):
        return _messages(field, value)
    raise RowError("wrong_type", f"field {field!r} is {type(value).__name__}, expected a string or a list of messages")


def _completion(field: str, value: str | list[dict[str, str]], prompt: list[dict[str, str]]) -> str:
    """The assistant text of a completion given as a string or as messages (which may repeat the
    prompt, as in HF ultrafeedback_binarized where `chosen` is the whole conversation)."""
    if isinstance(value, str):
        return value
    if value[: len(prompt)] == prompt:
        value = value[len(prompt):]
    if len(value) != 1 or value[0]["role"] != "assistant":
        roles = [m["role"] for m in value]
        raise RowError("bad_message", f"field {field!r}: expected one assistant message after the prompt, got {roles}")
    return value[0]["content"]


def _score(record: dict, field: str) -> float | None:
    value = record.get(field)
    if value is None and isinstance(record.get("metadata"), dict):
        value = record["metadata"].get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowError("wrong_type", f"field {field!r} is {type(value).__name__}, expected a number")
    if not math.isfinite(value):
        raise RowError("wrong_type", f"field {field!r} is {value}, expected a finite number")
    return float(value)


def pair_id_of(prompt: str | list[dict[str, str]], chosen: str, rejected: str) -> str:
    """Stable content hash: the same triple gets the same id on any machine, any run."""
    canonical = json.dumps(
        {"prompt": prompt, "chosen": chosen, "rejected": rejected},
        sort_keys=True, ensure_ascii=False, separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:32]


def normalize_record(record: Any, source: str) -> dict[str, Any]:
    """One input row → one pairs-table row, or RowError with a human-readable reason."""
    if not isinstance(record, dict):
        raise RowError("not_object", f"row is a JSON {type(record).__name__}, not an object")
    chosen_raw = _text_or_messages(record, "chosen")
    rejected_raw = _text_or_messages(record, "rejected")
    if "prompt" not in record and isinstance(chosen_raw, list) and isinstance(rejected_raw, list):
        # TRL's implicit-prompt layout: the shared prefix of both conversations is the prompt.
        shared = 0
        while shared < min(len(chosen_raw), len(rejected_raw)) - 1 and chosen_raw[shared] == rejected_raw[shared]:
            shared += 1
        if shared == 0:
            raise RowError("missing", "missing field 'prompt' and chosen/rejected share no prompt messages")
        prompt_raw: str | list = chosen_raw[:shared]
    else:
        prompt_raw = _text_or_messages(record, "prompt")

    prompt_messages = [{"role": "user", "content": prompt_raw}] if isinstance(prompt_raw, str) else prompt_raw
    user_turns = [m["content"] for m in prompt_messages if m["role"] == "user"]
    if not user_turns:
        raise RowError("bad_message", "field 'prompt' has no user message")
    chosen = _completion("chosen", chosen_raw, prompt_messages)
    rejected = _completion("rejected", rejected_raw, prompt_messages)
    if chosen.strip() == rejected.strip():
        raise RowError("identical", "chosen and rejected are identical")

    # A single user turn is stored as plain text, so string and conversational inputs of the same
    # pair get the same id; longer prompts keep their full message list.
    single_turn = len(prompt_messages) == 1
    prompt_key: str | list = user_turns[-1] if single_turn else prompt_messages
    meta = {k: v for k, v in record.items() if k not in TEXT_FIELDS + SCORE_FIELDS}
    return {
        "pair_id": pair_id_of(prompt_key, chosen, rejected),
        "prompt": user_turns[-1],
        "chosen": chosen,
        "rejected": rejected,
        "prompt_messages": None if single_turn else json.dumps(prompt_messages, ensure_ascii=False),
        "source": source,
        "score_chosen": _score(record, "score_chosen"),
        "score_rejected": _score(record, "score_rejected"),
        "meta": json.dumps(meta, ensure_ascii=False, sort_keys=True, default=str) if meta else None,
    }


# ----------------------------------------------------------------------------- reading tasks

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
            yield _result(path, location, text, error=RowError("bad_json", f"invalid JSON: {exc.msg} at column {exc.colno}"))
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
    reader = {"jsonl": _rows_of_jsonl, "parquet": _rows_of_parquet, "hf": _rows_of_hf, "json": _rows_of_json_array}[kind]
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
                        tasks.append({"kind": "hf", "path": path, "split": split, "start": s, "end": min(n, s + rows_per_task)})
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


def _input_bytes(tasks: list[dict]) -> int:
    return sum(t.get("bytes", 0) for t in tasks)


# ----------------------------------------------------------------------------- driver


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
        return prompt + max(len(tokenizer(row[k], add_special_tokens=False)["input_ids"]) for k in ("chosen", "rejected"))

    return count


def prepare(config: DataConfig, show_progress: bool = True) -> dict[str, Any]:
    """Write `<out>/pairs.parquet` and `<out>/quarantine.parquet`; return the summary."""
    t0 = time.perf_counter()
    tasks = plan_tasks(config.inputs)
    engine = config.engine
    if engine == "auto":
        engine = "ray" if _input_bytes(tasks) >= config.ray_min_bytes else "local"
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
