"""Small helpers shared by every stage: output paths, Parquet I/O, JSON summaries, progress."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def filesystem_and_path(uri: str) -> tuple[pafs.FileSystem, str]:
    """Resolve a local path or `s3://` / `gs://` URI to a pyarrow filesystem and path."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join_uri(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def makedirs(uri: str) -> None:
    fs, path = filesystem_and_path(uri)
    fs.create_dir(path, recursive=True)


def exists(uri: str) -> bool:
    fs, path = filesystem_and_path(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def write_parquet(table: pa.Table, uri: str, metadata: dict[str, Any] | None = None) -> None:
    """Write one Parquet file atomically (tmp + rename on local disks); `metadata` values are
    JSON-encoded into the file's key-value metadata under `sp2dpo.<key>`."""
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({f"sp2dpo.{k}".encode(): json.dumps(v, sort_keys=True).encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(merged)
    fs, path = filesystem_and_path(uri)
    fs.create_dir(os.path.dirname(path), recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{os.getpid()}"
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    else:
        pq.write_table(table, path, filesystem=fs)


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = filesystem_and_path(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no such file or directory: {uri}")
    return pq.read_table(path, filesystem=fs, columns=columns)


def read_sp2dpo_metadata(uri_or_table: str | pa.Table) -> dict[str, Any]:
    """The `sp2dpo.*` key-value metadata written by `write_parquet`, decoded."""
    if isinstance(uri_or_table, pa.Table):
        raw = uri_or_table.schema.metadata or {}
    else:
        fs, path = filesystem_and_path(uri_or_table)
        raw = pq.read_schema(path, filesystem=fs).metadata or {}
    return {k.decode()[len("sp2dpo."):]: json.loads(v) for k, v in raw.items() if k.startswith(b"sp2dpo.")}


def print_json_summary(summary: dict[str, Any]) -> None:
    """The machine-readable summary every `--json` command prints as its last stdout line."""
    sys.stdout.flush()
    print(json.dumps(summary, sort_keys=True, default=str), flush=True)


@contextmanager
def progress_bar(total: int | None, description: str, disable: bool = False) -> Iterator[Any]:
    """A tqdm bar on stderr (so `--json` stdout stays clean)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=description, file=sys.stderr, disable=disable, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


def quiet_ray_worker() -> None:
    """Worker setup hook of a dashboard-less local Ray: silence the state-API warnings of Ray
    Train's placement-group cleaner (it still cleans up; only its polling cannot report)."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def init_ray(address: str | None = None, **kwargs: Any) -> None:
    """Connect to the cluster in RAY_ADDRESS / `address`, or start a local one. Idempotent.

    Inside `ray job submit` RAY_ADDRESS is set, so the same call joins the cluster; on a laptop it
    starts a local instance. Logs go to files, not the terminal, so progress bars stay readable.
    """
    import ray

    if ray.is_initialized():
        return
    kwargs.setdefault("log_to_driver", True)
    kwargs.setdefault("include_dashboard", False)
    kwargs.setdefault("configure_logging", True)
    kwargs.setdefault("logging_level", "WARNING")
    local = not (address or os.environ.get("RAY_ADDRESS"))
    if local and not kwargs["include_dashboard"]:
        # No dashboard means no state API, and Ray Train's placement-group cleaner then warns every
        # few seconds that it cannot query it: a wall of noise over the progress bars.
        kwargs.setdefault("runtime_env", {"worker_process_setup_hook": "sp2dpo.utils.quiet_ray_worker"})
    store_mb = os.environ.get("SP2DPO_RAY_OBJECT_STORE_MB")
    if store_mb and local:
        # Cap the object store of a local instance (tests, small laptops); Ray Data spills beyond.
        kwargs.setdefault("object_store_memory", int(store_mb) << 20)
    ray.init(address=address or os.environ.get("RAY_ADDRESS"), **kwargs)
    # Ray Data's own progress bars fight with ours: keep one bar per stage.
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
