"""Every read and write of every stage: local paths and object-store URIs (`s3://`, `gs://`) alike.

    fs, path = filesystem_and_path("s3://bucket/run/pairs.parquet")   # pyarrow filesystem + key
    write_bytes("s3://bucket/run/x.json", body)                        # whole, or not at all
    with local_mirror("s3://bucket/run/eval") as local: ...            # a library that wants a dir
    model_dir = stage_model("s3://bucket/run/train/model")             # cached local copy

Object stores are reached through `pyarrow.fs`, configured the standard way: `AWS_ENDPOINT_URL`
for an S3-compatible server, credentials from the environment or the instance; nothing here names
a provider. Atomicity: a local file is written to a hidden temp file and renamed into place; an
object becomes visible only when its upload completes, so it is written directly (object stores
have no rename), and a directory counts as done only when its marker (`_SUCCESS.json`) is there.
Libraries that only speak local files (transformers, vLLM, matplotlib, datasets) get a staged
local copy: models are cached under $SP2DPO_CACHE keyed by URI, size and modification time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def is_uri(path: str) -> bool:
    """A `scheme://...` location (object storage), as opposed to a path on this machine's disk."""
    return "://" in str(path) and not str(path).startswith("file://")


def filesystem_and_path(uri: str) -> tuple[pafs.FileSystem, str]:
    """Resolve a local path or `s3://` / `gs://` URI to a pyarrow filesystem and path."""
    uri = str(uri)
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if is_uri(uri):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def absolute(uri: str) -> str:
    """A URI as is; a local path made absolute (Ray workers run in other working dirs)."""
    return str(uri) if is_uri(uri) else os.path.abspath(os.path.expanduser(str(uri)))


def join_uri(base: str, *parts: str) -> str:
    return "/".join([str(base).rstrip("/"), *parts])


def basename(uri: str) -> str:
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


def parent(uri: str) -> str:
    return str(uri).rstrip("/").rsplit("/", 1)[0]


def _as_uri(uri: str, fs: pafs.FileSystem, path: str) -> str:
    """The URI of `path` (a key listed by `fs`) in the scheme of `uri`."""
    return f"{str(uri).split('://', 1)[0]}://{path}" if is_uri(uri) else path


def info(uri: str) -> pafs.FileInfo:
    fs, path = filesystem_and_path(uri)
    return fs.get_file_info(path)


def exists(uri: str) -> bool:
    return info(uri).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    return info(uri).type == pafs.FileType.Directory


def is_file(uri: str) -> bool:
    return info(uri).type == pafs.FileType.File


def makedirs(uri: str) -> None:
    fs, path = filesystem_and_path(uri)
    fs.create_dir(path, recursive=True)


def list_files(uri: str, recursive: bool = True, suffix: str | None = None, hidden: bool = False) -> list[str]:
    """Files under `uri` (sorted URIs in its scheme), skipping names starting with "." or "_"
    unless `hidden`: temp files and markers are not data."""
    fs, root = filesystem_and_path(uri)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    found = []
    for f in fs.get_file_info(pafs.FileSelector(root, recursive=recursive)):
        if f.type != pafs.FileType.File or (suffix and not f.path.endswith(suffix)):
            continue
        if not hidden and f.base_name.startswith((".", "_")):
            continue
        found.append(_as_uri(uri, fs, f.path))
    return sorted(found)


def delete_file(uri: str) -> None:
    fs, path = filesystem_and_path(uri)
    fs.delete_file(path)


# ----------------------------------------------------------------------------- whole files


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem_and_path(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(f"no such file: {uri}")
    with fs.open_input_stream(path, compression=None) as f:  # the bytes as stored (no .gz guessing)
        return f.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


@contextmanager
def atomic_output(uri: str) -> Iterator[tuple[pafs.FileSystem, str]]:
    """(filesystem, path) to write one file at; readers see the whole file or none of it.

    Local: a hidden temp file beside the target, renamed over it on success. Object store: the
    object itself (it is published when the upload completes); deleted again if the writer fails.
    """
    fs, path = filesystem_and_path(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        tmp = os.path.join(os.path.dirname(path), f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{os.path.basename(path)}")
        try:
            yield fs, tmp
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    try:
        yield fs, path
    except BaseException:
        try:
            fs.delete_file(path)
        except OSError:
            pass
        raise


def write_bytes(uri: str, data: bytes) -> None:
    with atomic_output(uri) as (fs, path), fs.open_output_stream(path, compression=None) as f:
        f.write(data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def write_json(uri: str, data: Any) -> None:
    write_bytes(uri, json.dumps(data, indent=2, sort_keys=True, default=str).encode())


def remove_stale_tmp(uri: str) -> int:
    """Delete the hidden `.tmp-*` files a killed writer left in a local directory (object stores
    never hold any: their uploads publish nothing until complete)."""
    fs, root = filesystem_and_path(uri)
    if not isinstance(fs, pafs.LocalFileSystem) or not os.path.isdir(root):
        return 0
    stale = [name for name in os.listdir(root) if name.startswith(".tmp-")]
    for name in stale:
        os.remove(os.path.join(root, name))
    return len(stale)


# ----------------------------------------------------------------------------- Parquet


def write_parquet(table: pa.Table, uri: str, metadata: dict[str, Any] | None = None) -> None:
    """Write one Parquet file atomically; `metadata` values are JSON-encoded into the file's
    key-value metadata under `sp2dpo.<key>`."""
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({f"sp2dpo.{k}".encode(): json.dumps(v, sort_keys=True).encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(merged)
    with atomic_output(uri) as (fs, path):
        pq.write_table(table, path, filesystem=fs)


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = filesystem_and_path(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no such file or directory: {uri}")
    return pq.read_table(path, filesystem=fs, columns=columns)


def read_parquet_schema(uri: str) -> pa.Schema:
    """A Parquet file's schema (with its metadata), from the footer only."""
    fs, path = filesystem_and_path(uri)
    return pq.read_schema(path, filesystem=fs)


def read_sp2dpo_metadata(uri_or_table: str | pa.Table) -> dict[str, Any]:
    """The `sp2dpo.*` key-value metadata written by `write_parquet`, decoded."""
    if isinstance(uri_or_table, pa.Table):
        raw = uri_or_table.schema.metadata or {}
    else:
        raw = read_parquet_schema(uri_or_table).metadata or {}
    return {k.decode()[len("sp2dpo."):]: json.loads(v) for k, v in raw.items() if k.startswith(b"sp2dpo.")}


# ----------------------------------------------------------------------------- directories


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy a local directory's files to `uri` (a local path or an object-store prefix)."""
    fs, path = filesystem_and_path(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(os.path.abspath(local_dir), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


def download_dir(uri: str, local_dir: str) -> None:
    fs, path = filesystem_and_path(uri)
    os.makedirs(local_dir, exist_ok=True)
    pafs.copy_files(path, os.path.abspath(local_dir), source_filesystem=fs,
                    destination_filesystem=pafs.LocalFileSystem())


@contextmanager
def local_mirror(uri: str) -> Iterator[str]:
    """A local directory standing for `uri`, for code that writes with plain file APIs.

    Local `uri`: the directory itself. Object store: a temp dir holding what `uri` already has
    (so resumable work picks up), whose files are uploaded back on exit, on failure too, so
    nothing finished is lost."""
    if not is_uri(uri):
        os.makedirs(absolute(uri), exist_ok=True)
        yield absolute(uri)
        return
    local = tempfile.mkdtemp(prefix="sp2dpo-mirror-")
    try:
        if is_dir(uri):
            download_dir(uri, local)
        yield local
    finally:
        upload_dir(local, uri)
        shutil.rmtree(local, ignore_errors=True)


def cache_root() -> Path:
    root = Path(os.environ.get("SP2DPO_CACHE", Path.home() / ".cache" / "sp2dpo"))
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Serialise one-time work on a node across processes (tests, Ray workers)."""
    import fcntl

    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fingerprint(uri: str) -> str:
    """What a staged copy is keyed by: the URI and every file's relative path, size and mtime
    (a re-uploaded model gets a new key; an unchanged one is reused)."""
    fs, root = filesystem_and_path(uri)
    entries = sorted(
        (f.path[len(root):], f.size, f.mtime_ns or 0)
        for f in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if f.type == pafs.FileType.File
    )
    if not entries:
        raise FileNotFoundError(f"no files under {uri}")
    payload = json.dumps({"uri": uri.rstrip("/"), "files": entries})
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def stage_dir(uri: str, kind: str = "staged") -> Path:
    """A local, cached copy of the directory at `uri` (a model, a saved dataset): downloaded once
    per node and content version, safely across processes. A local `uri` is returned as is."""
    if not is_uri(uri):
        return Path(absolute(uri))
    key = fingerprint(uri)
    target = cache_root() / kind / f"{basename(uri)}-{key}"
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent / f".{target.name}.lock"):
        if (target / ".complete").exists():
            return target
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        download_dir(uri, str(tmp))
        (tmp / ".complete").write_text(uri + "\n")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return target


def stage_model(uri: str) -> Path:
    """A model directory on object storage as a local directory transformers and vLLM can load."""
    if is_uri(uri) and not is_file(join_uri(uri, "config.json")):
        raise FileNotFoundError(f"no Hugging Face model directory at {uri} (config.json missing)")
    return stage_dir(uri, "models")
