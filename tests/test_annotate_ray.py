"""The annotate driver on a real local Ray instance: resume, retry-failed, kill -9 and resume, and
several teachers sharing one annotations directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from sp2dpo.annotate import AnnotateConfig, annotate
from sp2dpo.annotate.schema import ANNOTATIONS_SCHEMA, CATEGORIES
from sp2dpo.annotate.store import latest_annotations, read_shards, shard_files

ROOT = Path(__file__).resolve().parents[1]


def _ids(path) -> list[str]:
    return pq.read_table(Path(path) / "pairs.parquet", columns=["pair_id"])["pair_id"].to_pylist()


def _cli(*args: str, env_extra: dict | None = None, **kw) -> subprocess.Popen | subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "sp2dpo.cli", "annotate", *args, "--json"], capture_output=True,
                          text=True, env=env, cwd=ROOT, **kw)


def test_ratings_resume_skips_done_pairs(ray_local, sample_pairs_dir, tmp_path):
    ids = _ids(sample_pairs_dir)
    cfg = AnnotateConfig(pairs=str(sample_pairs_dir), out=str(tmp_path), teacher="ratings", limit=300, shard_rows=64)
    first = annotate(cfg, show_progress=False)
    assert (first["annotated"], first["failed"], first["skipped"], first["shards"]) == (300, 0, 0, 5)
    assert first["rows_per_s"] > 0 and first["out"].endswith("ratings/ratings-v1")
    # The whole input now: the first 300 are skipped, the other 694 annotated, nothing twice.
    second = annotate(cfg.model_copy(update={"limit": None}), show_progress=False)
    assert (second["annotated"], second["skipped"]) == (len(ids) - 300, 300)
    table = read_shards(str(tmp_path))
    assert table.schema == ANNOTATIONS_SCHEMA
    assert sorted(table["pair_id"].to_pylist()) == sorted(ids)
    assert set(table["category"].to_pylist()) <= set(CATEGORIES)
    assert annotate(cfg.model_copy(update={"limit": None}), show_progress=False)["skipped"] == len(ids)


def test_retry_failed_reasks_only_failed_rows(ray_local, tmp_path):
    # Pairs without scores fail under the ratings teacher; once the scores are filled in (same
    # pair_id: it hashes the texts only), --retry-failed re-asks exactly those.
    rows = [{"pair_id": f"p{i}", "prompt": "q", "chosen": "a", "rejected": "b", "prompt_messages": None, "source": "t",
             "score_chosen": 8.0, "score_rejected": None if i % 4 == 0 else 3.0, "meta": None} for i in range(40)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    cfg = AnnotateConfig(pairs=str(tmp_path / "pairs.parquet"), out=str(tmp_path / "ann"), teacher="ratings")
    first = annotate(cfg, show_progress=False)
    assert (first["annotated"], first["failed"]) == (30, 10)
    written = read_shards(str(tmp_path / "ann"))
    failed = written.filter(pc.equal(written["status"], "failed"))
    assert sorted(failed["pair_id"].to_pylist()) == sorted(f"p{i}" for i in range(0, 40, 4))
    assert all(json.loads(r) == ["no scores"] for r in failed["repairs"].to_pylist())

    # Without --retry-failed a failed row counts as done.
    assert annotate(cfg, show_progress=False)["skipped"] == 40
    for r in rows:
        r["score_rejected"] = 3.0
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    retry = annotate(cfg.model_copy(update={"retry_failed": True}), show_progress=False)
    assert (retry["annotated"], retry["failed"], retry["skipped"], retry["retried"]) == (10, 0, 30, 10)
    assert retry["superseded_failed_rows_removed"] == 10
    table = read_shards(str(tmp_path / "ann"))
    assert table.num_rows == 40 and set(table["status"].to_pylist()) == {"ok"}
    assert sorted(table["pair_id"].to_pylist()) == sorted(r["pair_id"] for r in rows)


def test_kill_9_then_resume_loses_and_duplicates_nothing(ray_local, sample_pairs_dir, tmp_path):
    """SIGKILL the CLI driver mid-run on a running Ray cluster, then rerun the same command."""
    out = tmp_path / "ann"
    # The CLI joins this session's local cluster (as `ray job submit` drivers join theirs), so the
    # cluster outlives the killed driver. Paced at 100 rows/s in 50-row blocks and 20-row shards:
    # ~10 s of writing, so the kill lands mid-run once a few shards exist.
    env = {"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    args = ["--pairs", str(sample_pairs_dir), "--teacher", "ratings", "--out", str(out),
            "--set", "shard_rows=20", "--set", "ratings_batch_size=50", "--set", "max_rows_per_s=100"]
    proc = subprocess.Popen([sys.executable, "-m", "sp2dpo.cli", "annotate", *args, "--json"], cwd=ROOT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    try:
        while len(shard_files(str(out))) < 3:
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "no shard written in time"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    before = read_shards(str(out))
    ids = _ids(sample_pairs_dir)
    assert 0 < before.num_rows < len(ids), "the kill did not land mid-run"

    done = _cli(*args[:-2], "--set", "max_rows_per_s=100000", env_extra=env)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["skipped"] == before.num_rows
    assert summary["annotated"] + summary["failed"] == len(ids) - before.num_rows
    after = read_shards(str(out))
    keys = after["pair_id"].to_pylist()
    assert len(keys) == len(set(keys)), "duplicated pair_id"
    assert sorted(keys) == sorted(ids), "lost or foreign pair_id"
    assert not [f for f in os.listdir(out / "ratings" / "ratings-v1") if f.startswith(".tmp-")]


def test_llm_teacher_actor_pool_keeps_failed_rows_and_coexists(ray_local, sample_pairs_dir, tmp_path, tiny_model_dir):
    """The transformers teacher through the Ray Data actor pool. The tiny random model writes no
    JSON, so every row is a failed row with its raw text kept; next to a ratings run in one DIR."""
    out = str(tmp_path / "ann")
    pairs = str(sample_pairs_dir)
    ratings = annotate(AnnotateConfig(pairs=pairs, out=out, teacher="ratings", limit=6), show_progress=False)
    llm = annotate(AnnotateConfig(pairs=pairs, out=out, teacher="transformers", model=str(tiny_model_dir),
                                  prompt_version="v1-swapped", limit=6, generation={"max_tokens": 24},
                                  pool={"batch_size": 3, "min_actors": 1, "max_actors": 2}), show_progress=False)
    assert ratings["annotated"] == 6
    assert llm["teacher"] == f"transformers:{Path(tiny_model_dir).name}" and llm["prompt_version"] == "v1-swapped"
    assert llm["annotated"] + llm["failed"] == 6 and llm["prompt_tokens"] > 6 * 200 and llm["completion_tokens"] > 0
    assert llm["tokens_per_s"] > 0
    rows = read_shards(out).to_pylist()
    assert len(rows) == 12 and {(r["teacher"], r["prompt_version"]) for r in rows} == {
        ("ratings", "ratings-v1"), (llm["teacher"], "v1-swapped")}
    for r in rows:
        if r["status"] == "failed":
            assert r["raw_text"] is not None and r["repairs"] and r["category"] is None
    # The schedule stage's reader takes the directory as it is.
    assert read_shards(out, required=True).num_rows == 12 == latest_annotations(out).num_rows


def test_teacher_that_cannot_start_is_a_clear_error(ray_local, sample_pairs_dir, tmp_path):
    (tmp_path / "broken-model").mkdir()  # exists, but holds no model
    cfg = AnnotateConfig(pairs=str(sample_pairs_dir), out=str(tmp_path / "ann"), teacher="transformers",
                         model=str(tmp_path / "broken-model"), limit=2)
    failed = "(?s)the transformers:broken-model teacher failed: ValueError: .*rerun the same command"
    with pytest.raises(ValueError, match=failed):
        annotate(cfg, show_progress=False)
    with pytest.raises(FileNotFoundError, match="model not found"):
        annotate(cfg.model_copy(update={"model": str(tmp_path / "nope")}), show_progress=False)


def test_cli_bad_input_is_a_clear_error(tmp_path):
    missing = _cli("--pairs", str(tmp_path / "nope"), "--out", str(tmp_path / "ann"))
    assert missing.returncode == 2 and "pairs not found" in missing.stderr and "Traceback" not in missing.stderr
    bad = _cli("--pairs", str(tmp_path), "--teacher", "ratings", "--prompt-version", "v1", "--out", str(tmp_path))
    assert bad.returncode == 2 and "reads no prompt" in bad.stderr and "Traceback" not in bad.stderr
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    junk = _cli("--pairs", str(tmp_path / "x.parquet"), "--out", str(tmp_path / "ann"))
    assert junk.returncode == 2 and "not a Parquet file" in junk.stderr and "Traceback" not in junk.stderr
