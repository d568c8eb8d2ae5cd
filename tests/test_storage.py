"""Every stage on object storage: a real S3 API server on 127.0.0.1 (moto's standalone server,
tests/s3_server.py), reached the standard way (AWS_ENDPOINT_URL + credentials from the
environment), never a mocked client. What a test checks is read back from the server itself."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sp2dpo import storage
from sp2dpo.data.bundled import resolve_input
from sp2dpo.data.prepare import DataConfig, prepare

SAMPLE = resolve_input("ultrafeedback-sample")


def _upload(local: str | Path, uri: str) -> str:
    storage.write_bytes(uri, Path(local).read_bytes())
    return uri


# ----------------------------------------------------------------------------- the storage layer


def test_round_trip_atomic_writes_and_listing(s3):
    root = s3.new_prefix("io")
    storage.write_text(storage.join_uri(root, "a/x.txt"), "hello")
    storage.write_parquet(pa.table({"v": [1, 2]}), storage.join_uri(root, "a/t.parquet"), {"k": {"n": 1}})
    storage.write_json(storage.join_uri(root, "_SUCCESS.json"), {"ok": True})
    assert s3.keys(root) == ["_SUCCESS.json", "a/t.parquet", "a/x.txt"]
    assert storage.read_text(storage.join_uri(root, "a/x.txt")) == "hello"
    assert storage.read_parquet(storage.join_uri(root, "a/t.parquet"))["v"].to_pylist() == [1, 2]
    assert storage.read_sp2dpo_metadata(storage.join_uri(root, "a/t.parquet")) == {"k": {"n": 1}}
    assert storage.is_dir(root) and storage.is_file(storage.join_uri(root, "a/x.txt"))
    # Markers and temp files are not data.
    assert storage.list_files(root) == [storage.join_uri(root, "a/t.parquet"), storage.join_uri(root, "a/x.txt")]

    # A writer that fails leaves nothing behind, on S3 and on a local disk alike.
    for target in (storage.join_uri(root, "b/half.parquet"), "/tmp/sp2dpo-test-half/half.parquet"):
        with pytest.raises(RuntimeError, match="died"):
            with storage.atomic_output(target) as (fs, path):
                with fs.open_output_stream(path) as f:
                    f.write(b"PAR1 half a file")
                raise RuntimeError("writer died")
        assert not storage.exists(target)
    assert os.listdir("/tmp/sp2dpo-test-half") == []


def test_local_mirror_uploads_what_finished_even_on_failure(s3):
    root = s3.new_prefix("mirror")
    storage.write_text(storage.join_uri(root, "old.txt"), "from before")
    with pytest.raises(KeyboardInterrupt):
        with storage.local_mirror(root) as local:
            assert Path(local, "old.txt").read_text() == "from before"  # resumable work sees it
            Path(local, "new.txt").write_text("done before the kill")
            raise KeyboardInterrupt
    assert s3.keys(root) == ["new.txt", "old.txt"]


def test_staged_model_is_cached_by_uri_size_and_mtime(s3, tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from sp2dpo.models import resolve_model

    monkeypatch.setenv("SP2DPO_CACHE", str(tmp_path / "cache"))
    uri = s3.new_prefix("model")
    storage.upload_dir(str(tiny_model_dir), uri)
    staged = resolve_model(uri)
    assert Path(staged).parent == tmp_path / "cache" / "models"
    assert sorted(p.name for p in Path(staged).iterdir() if not p.name.startswith(".")) == \
        sorted(p.name for p in Path(tiny_model_dir).iterdir())
    model = AutoModelForCausalLM.from_pretrained(staged)
    assert model.config.num_hidden_layers == 2
    assert resolve_model(uri) == staged, "an unchanged model is not downloaded again"
    storage.write_text(storage.join_uri(uri, "README.md"), "re-uploaded")
    assert resolve_model(uri) != staged, "a changed model gets a new staged copy"
    with pytest.raises(FileNotFoundError, match="config.json missing"):
        resolve_model(s3.new_prefix("not-a-model") + "/x")


# ----------------------------------------------------------------------------- data prepare


def test_prepare_reads_and_writes_s3_like_local(s3, tmp_path):
    """JSONL in, pairs out, both on S3 (the bug: `input not found`, then a local rename of a URI)."""
    src = _upload(SAMPLE, s3.new_prefix("in") + "/eval.jsonl")
    out = s3.new_prefix("pairs")
    remote = prepare(DataConfig(inputs=[src], out=out), show_progress=False)
    local = prepare(DataConfig(inputs=[SAMPLE], out=str(tmp_path / "local")), show_progress=False)
    assert (remote["valid"], remote["quarantined"]) == (local["valid"], local["quarantined"]) == (994, 6)
    assert s3.keys(out) == ["pairs.parquet", "quarantine.parquet"]
    remote_pairs = storage.read_parquet(remote["pairs"])
    local_pairs = pq.read_table(local["pairs"])
    assert remote_pairs["pair_id"].equals(local_pairs["pair_id"])
    # Quarantine keeps the exact source location, with the URI as the source.
    quarantine = storage.read_parquet(remote["quarantine"]).to_pylist()
    assert {q["location"] for q in quarantine} == {f"line {n}" for n in (307, 479, 656, 834, 911, 998)}
    assert all(q["source"] == src for q in quarantine)


def test_prepare_parquet_json_and_saved_hf_dataset_from_s3(s3, tmp_path):
    import datasets

    rows = [json.loads(line) for line in Path(SAMPLE).read_text().splitlines()[:20]]
    prefix = s3.new_prefix("formats")
    # A directory of Parquet + JSON-array files, and a saved HF dataset dir, all on S3.
    table_path = tmp_path / "part.parquet"
    pq.write_table(pa.Table.from_pylist(rows[:10]), table_path, row_group_size=4)
    _upload(table_path, f"{prefix}/dir/part.parquet")
    storage.write_text(f"{prefix}/dir/more.json", json.dumps(rows[10:15]))
    datasets.Dataset.from_list(rows[15:20]).save_to_disk(str(tmp_path / "hf"))
    storage.upload_dir(str(tmp_path / "hf"), f"{prefix}/hf")

    summary = prepare(DataConfig(inputs=[f"{prefix}/dir", f"{prefix}/hf"], out=str(tmp_path / "out")),
                      show_progress=False)
    # The same 20 rows as one local JSONL file give the same pairs.
    (tmp_path / "same.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    expected = prepare(DataConfig(inputs=[str(tmp_path / "same.jsonl")], out=str(tmp_path / "ref")),
                       show_progress=False)
    assert (summary["total"], summary["valid"]) == (20, expected["valid"]) and expected["valid"] >= 18
    assert sorted(pq.read_table(summary["pairs"])["pair_id"].to_pylist()) == \
        sorted(pq.read_table(expected["pairs"])["pair_id"].to_pylist())
    sources = set(pq.read_table(summary["pairs"])["source"].to_pylist())
    assert sources == {"part.parquet", "more.json", "hf"}


def test_prepare_cli_missing_s3_input_is_a_clear_error(s3):
    from typer.testing import CliRunner

    from sp2dpo.cli import app

    result = CliRunner().invoke(app, ["data", "prepare", s3.new_prefix("nothing") + "/x.jsonl", "--out",
                                      s3.new_prefix("o")])
    assert result.exit_code != 0 and "input not found" in result.output and "Traceback" not in result.output


# ----------------------------------------------------------------------------- annotate, schedule


def test_annotate_resumes_from_shards_on_s3_then_schedule_and_audit(s3, ray_local):
    from sp2dpo.annotate import annotate
    from sp2dpo.annotate.config import AnnotateConfig
    from sp2dpo.schedule import build_artifact
    from sp2dpo.schedule.audit import write_audit

    pairs = prepare(DataConfig(inputs=[SAMPLE], out=s3.new_prefix("data"), limit=40), show_progress=False)["pairs"]
    ann = s3.new_prefix("ann")
    first = annotate(AnnotateConfig(pairs=pairs, out=ann, teacher="ratings", limit=25, shard_rows=10),
                     show_progress=False)
    assert (first["annotated"] + first["failed"], first["skipped"]) == (25, 0)
    shards = [k for k in s3.keys(ann) if k.endswith(".parquet")]
    assert len(shards) == 3 and all(k.startswith("ratings/") for k in shards)
    second = annotate(AnnotateConfig(pairs=pairs, out=ann, teacher="ratings", shard_rows=10), show_progress=False)
    assert (second["skipped"], second["annotated"] + second["failed"]) == (25, 15), "resumed: only the rest"
    from sp2dpo.annotate.store import latest_annotations

    table = latest_annotations(ann)
    assert table.num_rows == 40 and len(set(table["pair_id"].to_pylist())) == 40

    out = s3.new_prefix("schedule")
    summary = build_artifact(pairs, ann, f"{out}/beta.parquet")
    assert (summary["artifact"], summary["pairs"], summary["unannotated"]) == (f"{out}/beta.parquet", 40, 0)
    artifact = storage.read_parquet(f"{out}/beta.parquet")
    assert artifact.num_rows == 40 and artifact["beta"].null_count < 40
    report = write_audit(f"{out}/beta.parquet", f"{out}/audit")
    keys = s3.keys(f"{out}/audit")
    assert "report.md" in keys and sum(k.endswith(".png") for k in keys) == 3, report
    assert "β artifact audit" in storage.read_text(f"{out}/audit/report.md")


def test_pipeline_run_dir_on_s3_resumes_and_writes_nothing_locally(s3, ray_local, tmp_path, monkeypatch):
    from sp2dpo.pipeline.config import PipelineConfig
    from sp2dpo.pipeline.runner import MANIFEST, run_pipeline
    from sp2dpo.pipeline.stages import default_stages

    monkeypatch.chdir(tmp_path)  # a relative path anywhere would land here
    local_tmp = tmp_path.parent / f"{tmp_path.name}-tmp"
    local_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(local_tmp))  # where each stage's log is written first
    run_dir = s3.new_prefix("run")
    config = PipelineConfig(run_dir=run_dir, until="schedule", data={"inputs": ["ultrafeedback-sample"], "limit": 12},
                            annotate={"teacher": "ratings"})
    first = run_pipeline(config, default_stages(config), run_dir, until="schedule")
    assert [r.status for r in first] == ["ran", "ran", "ran"]
    keys = s3.keys(run_dir)
    for r in first:
        assert f"{Path(r.path).name}/_SUCCESS.json" in keys
        assert f"logs/{r.name}.log" in keys
    assert MANIFEST in keys and os.listdir(tmp_path) == []
    # Each stage log went up to the run dir; its local copy is gone.
    assert [p.name for p in local_tmp.iterdir() if p.name.startswith("sp2dpo-log-")] == []
    again = run_pipeline(config, default_stages(config), run_dir, until="schedule")
    assert [r.status for r in again] == ["complete"] * 3
    manifest = storage.read_json(storage.join_uri(run_dir, MANIFEST))
    assert [s["status"] for s in manifest["stages"]] == ["complete"] * 3


def test_local_run_dir_is_checked_only_on_a_cluster(tmp_path, ray_local):
    """On one node every stage sees the local disk: the check passes without a probe left over.
    (Refusal on nodes that share no disk: tests/test_cluster_jobs.py, shared-nothing cluster.)"""
    from sp2dpo.pipeline.runner import check_run_dir_reachable

    check_run_dir_reachable(str(tmp_path / "run"))
    assert not any(p.name.startswith(".reachable") for p in tmp_path.rglob("*"))


# ----------------------------------------------------------------------------- evaluate


def test_generate_and_judge_resume_with_outputs_on_s3(s3):
    from test_evaluate_e2e import ScriptedServer

    from sp2dpo.evaluate.compare import compare
    from sp2dpo.evaluate.config import EvaluateConfig
    from sp2dpo.evaluate.protocol import load_eval_set
    from sp2dpo.evaluate.run import generate, judge

    rows = load_eval_set()[:6]
    out = s3.new_prefix("eval") + "/student"
    cfg = EvaluateConfig(model="student", out=out, limit=6, max_retries=0)
    with ScriptedServer(always_fail=(rows[2]["instruction"],)) as srv:
        cfg.endpoint = srv.url
        with pytest.raises(ValueError, match="rerun the same command to resume"):
            generate(cfg, show_progress=False)
    assert s3.keys(out) == ["model_outputs.partial.jsonl"], "finished requests reached S3 despite the failure"
    with ScriptedServer() as srv:
        cfg.endpoint = srv.url
        summary = generate(cfg, show_progress=False)
        assert list(srv.calls) == [rows[2]["instruction"]], "only the missing request is asked again"
        cfg.judge_endpoint, cfg.judge_model = srv.url, "judge"
        judged = judge(cfg, summary["model_outputs"], show_progress=False)
    assert judged["annotations"] == f"{out}/annotations.json" and judged["n"] == 6
    assert {"model_outputs.json", "annotations.json", "annotations.partial.jsonl"} <= set(s3.keys(out))
    report = s3.new_prefix("report")
    result = compare([f"student={out}"], EvaluateConfig(out=report))
    assert result["runs"] == 1 and s3.keys(report) == ["comparison.json", "comparison.md", "comparison.png"]


def test_serve_a_student_saved_on_s3(s3, ray_local, tiny_model_dir):
    import openai
    from s3_server import free_port

    from sp2dpo.serve import ModelConfig, ServeConfig, start_server, stop_server

    uri = s3.new_prefix("student")
    storage.upload_dir(str(tiny_model_dir), uri)
    missing = ServeConfig(port=free_port(), models=[ModelConfig(id="x", path=s3.new_prefix("none"))])
    from sp2dpo.serve.server import check_model_paths

    with pytest.raises(FileNotFoundError, match="config.json missing"):
        check_model_paths(missing)
    url = start_server(ServeConfig(port=free_port(), access_log=False,
                                   models=[ModelConfig(id="student", path=uri, num_cpus=0.5, max_model_len=256)]))
    try:
        reply = openai.OpenAI(base_url=url, api_key="EMPTY", max_retries=0, timeout=120).chat.completions.create(
            model="student", messages=[{"role": "user", "content": "Say hi"}], max_tokens=4)
        assert reply.choices[0].message.content is not None and reply.usage.completion_tokens >= 1
    finally:
        stop_server()


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_demo_pipeline_with_run_dir_on_s3(s3, tmp_path, monkeypatch, tiny_model_dir):
    """`sp2dpo pipeline --config demo --set run_dir=s3://...` (scaled down): every stage's outputs
    are on the S3 server, nothing lands on the local disk, and a rerun finds every stage done.
    An API key is set for the served students and judge: the evaluate stage must send it. The
    students start from the tiny model: moto serves a 0.5 GB SmolLM2 checkpoint at a few MB/s, and
    the bytes are not what this test is about (the judge is still the bundled SmolLM2)."""
    import subprocess
    import sys

    monkeypatch.chdir(tmp_path)
    run_dir = s3.new_prefix("demo")
    command = [str(Path(sys.executable).parent / "sp2dpo"), "pipeline", "--config", "demo", "--json",
               "--set", f"run_dir={run_dir}", "--set", "data.limit=6", "--set", "data.max_tokens=200",
               "--set", "train.max_length=256", "--set", f"train.model={tiny_model_dir}",
               "--set", "evaluate.limit=2", "--set", "evaluate.max_tokens=16"]
    env = {**os.environ, "SP2DPO_API_KEY": "demo-key-for-the-served-models"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1800, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["complete"] == [] and len(summary["ran"]) == 9, summary
    keys = s3.keys(run_dir)
    name = {stage: Path(s["path"]).name for stage, s in summary["stages"].items()}
    for stage in summary["stages"]:
        assert f"{name[stage]}/_SUCCESS.json" in keys, stage
    for control in ("semantic", "global", "shuffled"):
        assert f"{name['reference']}/beta-{control}.parquet" in keys
        assert {f"{name[f'train-{control}']}/model/config.json", f"{name[f'train-{control}']}/model/model.safetensors",
                f"{name[f'train-{control}']}/training_summary.json"} <= set(keys)
        assert f"{name['evaluate']}/{control}/annotations.json" in keys
    assert f"{name['schedule']}/audit/report.md" in keys
    assert {f"{name['compare']}/comparison.md", f"{name['compare']}/comparison.png"} <= set(keys)
    assert not any(p for p in tmp_path.iterdir()), "nothing written to the local working dir"
    print("STAGE_SECONDS", {stage: s["seconds"] for stage, s in summary["stages"].items()})

    again = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-4000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["ran"] == []
