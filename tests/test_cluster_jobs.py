"""Jobs submitted with `ray job submit` to a real two-node Ray cluster started on this machine
(tests/cluster_harness.py), as on a cluster: the repository is the uploaded working dir."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from cluster_harness import local_cluster  # noqa: F401  (the fixture)

pytestmark = pytest.mark.slow


def _summary(proc) -> dict:
    """The `--json` summary: the last JSON line of the job's logs, which `ray job submit` streams."""
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON summary in the job logs:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1])


def _check(proc) -> None:
    assert proc.returncode == 0, f"job failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"


WHERE = """
import json, ray
ray.init()
def where():
    return ray.get_runtime_context().get_node_id()
task = ray.remote(resources={"worker_node": 1})(where).remote()
print(json.dumps({"driver": where(), "task": ray.get(task), "nodes": len([n for n in ray.nodes() if n["Alive"]])}))
"""


def test_second_node_runs_tasks_that_need_its_resource(local_cluster):
    nodes = local_cluster.alive_nodes()
    assert len(nodes) == 2
    worker = [n for n in nodes if n["resources_total"].get("worker_node") == 1]
    head = [n for n in nodes if n["is_head_node"]]
    assert len(worker) == 1 and len(head) == 1 and worker[0]["node_id"] != head[0]["node_id"]
    proc = local_cluster.submit(["python", "-c", WHERE])
    _check(proc)
    placed = _summary(proc)
    assert placed["nodes"] == 2
    assert placed["task"] == worker[0]["node_id"]
    assert placed["driver"] == head[0]["node_id"]


def test_data_job_writes_the_pairs_table(local_cluster, tmp_path):
    out = tmp_path / "data"
    proc = local_cluster.submit(["python", "jobs/data.py", "ultrafeedback-sample", "--out", str(out), "--engine", "ray",
                                 "--json"])
    _check(proc)
    summary = _summary(proc)
    assert (summary["engine"], summary["total"], summary["valid"], summary["quarantined"]) == ("ray", 1000, 994, 6)
    assert pq.read_table(out / "pairs.parquet").num_rows == 994
    assert pq.read_table(out / "quarantine.parquet").num_rows == 6


def test_pipeline_job_resumes_when_resubmitted(local_cluster, tmp_path):
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "until": "data",
                                      "data": {"inputs": ["ultrafeedback-sample"], "limit": 40, "engine": "ray"}}))
    first = local_cluster.submit(["python", "jobs/pipeline.py", "--config", str(config), "--json"])
    _check(first)
    summary = _summary(first)
    assert summary["ran"] == ["data"]
    data_dir = Path(summary["stages"]["data"]["path"])
    assert pq.read_table(data_dir / "pairs.parquet").num_rows == 40
    marker = (data_dir / "_SUCCESS.json").read_text()

    again = local_cluster.submit(["python", "jobs/pipeline.py", "--config", str(config), "--json"])
    _check(again)
    assert _summary(again)["complete"] == ["data"] and _summary(again)["ran"] == []
    assert (data_dir / "_SUCCESS.json").read_text() == marker


def test_pipeline_job_stopped_mid_way_resumes_on_resubmit(local_cluster, tmp_path):
    from test_pipeline import KILL_SCRIPT, _config

    config = _config(tmp_path)
    script, flags = tmp_path / "pipe.py", tmp_path / "flags"
    script.write_text(KILL_SCRIPT)
    flags.mkdir()
    entrypoint = ["python", str(script), config.model_dump_json(), str(flags)]
    job_id = "sp2dpo-stop-test"
    submitted = local_cluster.submit(entrypoint, wait=False, submission_id=job_id)
    _check(submitted)
    deadline = time.monotonic() + 300
    while not (flags / "started").exists():
        status = local_cluster.job("status", job_id).stdout
        assert "FAILED" not in status and "SUCCEEDED" not in status, local_cluster.job("logs", job_id).stdout
        assert time.monotonic() < deadline, "the slow stage never started"
        time.sleep(1)
    stopped = local_cluster.job("stop", job_id)
    assert stopped.returncode == 0, stopped.stderr
    slow_dir = Path((flags / "started").read_text())
    assert "stopped" in local_cluster.job("status", job_id).stdout.lower()
    assert not (slow_dir / "_SUCCESS.json").exists() and not (flags / "last-ran").exists()
    data_marker = next(Path(config.run_dir).glob("data-*/_SUCCESS.json")).read_text()

    (flags / "go").write_text("")
    again = local_cluster.submit(entrypoint)
    _check(again)
    results = [line.split()[1:] for line in again.stdout.splitlines() if line.startswith("RESULT")]
    assert results == [["data", "complete"], ["slow", "ran"], ["last", "ran"]]
    assert next(Path(config.run_dir).glob("data-*/_SUCCESS.json")).read_text() == data_marker


def test_demo_pipeline_job_on_two_nodes_writes_every_stage(local_cluster, tmp_path):
    """The packaged demo config, scaled down (fewer pairs and instructions, the ratings teacher
    alone), submitted with `ray job submit` to the two-node cluster: every stage's outputs exist."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    overrides = [f"run_dir={tmp_path / 'run'}", "data.limit=6", "data.max_tokens=200", "teachers=[{teacher: ratings}]",
                 "train.max_length=256", "train.resources_per_worker={CPU: 1}", "evaluate_base=true",
                 "evaluate.limit=2", "evaluate.max_tokens=16", f"serve.port={port}"]
    command = ["python", "jobs/pipeline.py", "--config", "demo", "--json"]
    for item in overrides:
        command += ["--set", item]
    proc = local_cluster.submit(command)
    _check(proc)
    summary = _summary(proc)
    stages = summary["stages"]
    assert summary["complete"] == [] and len(summary["ran"]) == 9, summary
    path = {name: Path(s["path"]) for name, s in stages.items()}
    assert pq.read_table(path["data"] / "pairs.parquet").num_rows == 6
    assert list(path["annotate"].rglob("*.parquet"))
    for control in ("semantic", "global", "shuffled"):
        assert pq.read_table(path["schedule"] / f"beta-{control}.parquet").num_rows == 6
        ref = pq.read_table(path["reference"] / f"beta-{control}.parquet")
        assert ref["ref_chosen_logps"].null_count == 0
        model = path[f"train-{control}"] / "model"
        assert (model / "config.json").exists() and (model / "model.safetensors").exists()
        assert json.loads((path[f"train-{control}"] / "training_summary.json").read_text())["steps"] >= 1
    assert (path["schedule"] / "audit" / "report.md").exists()
    for run in ("base", "semantic", "global", "shuffled"):
        assert len(json.loads((path["evaluate"] / run / "annotations.json").read_text())) == 2
        assert "win_rate" in json.loads((path["evaluate"] / run / "score.json").read_text())
    assert (path["compare"] / "comparison.md").exists() and (path["compare"] / "comparison.png").exists()
    for name in stages:
        assert (path[name] / "_SUCCESS.json").exists(), name
