"""Jobs submitted with `ray job submit` to a real two-node Ray cluster started on this machine
(tests/cluster_harness.py), as on a cluster: the repository is the uploaded working dir.

The `shared_nothing_cluster` tests go one step closer to a real cluster: the second node lives in a
mount namespace of its own where the head's temp dirs and caches are covered by private tmpfs
mounts, the head holds 1 CPU and the worker 2 (so the work lands on the worker), and the run dir
is on a real S3 API server (moto, tests/s3_server.py): the stages can only meet through S3 and Ray.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from cluster_harness import LocalCluster, free_port, local_cluster  # noqa: F401  (the fixture)

from sp2dpo.storage import read_json, read_parquet

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
        # (`ray job status` prints "failed" / "succeeded" in lower case: ask the API instead.)
        status = local_cluster.job_status(job_id)
        assert status not in ("FAILED", "SUCCEEDED", "STOPPED"), local_cluster.job("logs", job_id).stdout
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


# ----------------------------------------------------------------------------- shared nothing


@pytest.fixture(scope="module")
def shared_nothing_cluster(s3):
    """Head: 1 CPU; worker: 2 CPUs, the custom resource `worker_node`, no view of the head's disk
    (its own /tmp, HOME and model cache); both nodes and every job driver reach the S3 server."""
    with LocalCluster(shared_nothing=True, head_cpus=1, worker_cpus=2, env=s3.env, object_store_mb=300) as cluster:
        yield cluster


LOOK = """
import json, os, sys, tempfile
import pyarrow.fs as pafs
import ray

test_file, uri, head_log = sys.argv[1:4]
ray.init()
own = os.path.join(tempfile.mkdtemp(prefix="sp2dpo-head-only-"), "written-by-driver.txt")
with open(own, "w") as f:
    f.write("head")
fs, key = pafs.FileSystem.from_uri(uri + "/from-driver.txt")
with fs.open_output_stream(key) as f:
    f.write(b"written on the head, through S3")

def look(paths, uri):
    import sp2dpo.storage as storage
    fs, key = pafs.FileSystem.from_uri(uri + "/from-driver.txt")
    with fs.open_input_stream(key) as f:
        body = f.read().decode()
    out, key = pafs.FileSystem.from_uri(uri + "/from-worker.txt")
    with out.open_output_stream(key) as f:
        f.write(b"written on the worker, through S3")
    return {"node": ray.get_runtime_context().get_node_id(), "sees": {p: os.path.exists(p) for p in paths},
            "s3_body": body, "home": os.environ.get("HOME"), "cache": str(storage.cache_root()),
            "tmp": tempfile.gettempdir()}

paths = [own, os.path.dirname(own), test_file, os.path.dirname(test_file), head_log]
task = ray.remote(resources={"worker_node": 1}, num_cpus=1)(look).remote(paths, uri)
print(json.dumps({"driver": ray.get_runtime_context().get_node_id(),
                  "driver_sees": {p: os.path.exists(p) for p in paths}, "worker": ray.get(task)}))
"""


def test_shared_nothing_worker_sees_only_s3_not_the_heads_disk(shared_nothing_cluster, s3, tmp_path):
    cluster = shared_nothing_cluster
    test_file = tmp_path / "written-by-the-test.txt"
    test_file.write_text("test")
    uri = s3.new_prefix("shared-nothing")
    # head.log: the harness's log of the head, in the head's Ray temp dir (the worker's Ray temp
    # dir has the same path, on its own tmpfs).
    proc = cluster.submit(["python", "-c", LOOK, str(test_file), uri, str(Path(cluster.temp_dir) / "head.log")])
    _check(proc)
    seen = _summary(proc)
    nodes = cluster.alive_nodes()
    head = next(n["node_id"] for n in nodes if n["is_head_node"])
    worker = next(n["node_id"] for n in nodes if n["resources_total"].get("worker_node") == 1)
    assert seen["driver"] == head and seen["worker"]["node"] == worker
    # The driver on the head sees its own file, the test's tmp dir and the head's log ...
    assert all(seen["driver_sees"].values()), seen
    # ... the task on the worker sees none of them, but reads (and writes) S3.
    assert not any(seen["worker"]["sees"].values()), seen
    assert seen["worker"]["s3_body"] == "written on the head, through S3"
    assert s3.keys(uri) == ["from-driver.txt", "from-worker.txt"]
    # Its own HOME, temp dir and sp2dpo cache, on its private tmpfs.
    assert (seen["worker"]["home"].startswith("/tmp/sp2dpo-node/")
            and seen["worker"]["cache"].startswith("/tmp/sp2dpo-node/"))
    assert seen["worker"]["tmp"].startswith("/tmp/sp2dpo-node/")
    assert not Path(seen["worker"]["home"]).exists()  # and nothing of it shows on the head


def test_a_run_dir_the_worker_cannot_see_is_refused_before_any_stage(shared_nothing_cluster, tmp_path):
    """The packaged demo config as a new user submits it: its relative run_dir resolves inside
    the driver's working dir on the head, which the worker node cannot see. The job fails before
    the first stage, naming the fix, instead of crashing in stage 2 on the other node."""
    proc = shared_nothing_cluster.submit(["python", "jobs/pipeline.py", "--config", "demo", "--json"])
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert "nodes cannot see it" in output and "run_dir=s3://" in output, output[-3000:]
    assert "[1/9] data" not in output, "refused before any stage started"
    # A local dir on the head, named absolutely: refused the same way, and left with no stage dir.
    local = tmp_path / "run"
    proc = shared_nothing_cluster.submit(["python", "jobs/pipeline.py", "--config", "demo", "--json",
                                          "--set", f"run_dir={local}"])
    assert proc.returncode != 0 and "nodes cannot see it" in proc.stdout + proc.stderr
    assert not any(local.iterdir()), "no stage dir, no probe left behind"


def _demo_command(run_dir: str, student: str, *extra: str) -> list[str]:
    overrides = [f"run_dir={run_dir}", f"train.model={student}", "data.limit=6", "data.max_tokens=200",
                 "teachers=[{teacher: ratings}]", "train.max_length=256", "evaluate_base=true", "evaluate.limit=2",
                 "evaluate.max_tokens=16", f"serve.port={free_port()}", *extra]
    command = ["python", "jobs/pipeline.py", "--config", "demo", "--json"]
    for item in overrides:
        command += ["--set", item]
    return command


def _run_job(cluster: LocalCluster, s3, command: list[str], run_dir: str, timeout: float, job_id: str | None = None,
             until=None, poll_s: float = 3):
    """Submit without waiting, then poll: print each stage dir as it appears on S3 (`-s`), stop
    polling when the job ends, when `until(stage dirs → keys)` returns something (then that is
    returned; the job still runs) or at `timeout`. Returns (status line, `ray job logs`, until's value)."""
    job_id = job_id or f"sp2dpo-s3-{time.time_ns() % 10**10}"
    _check(cluster.submit(command, wait=False, submission_id=job_id))
    t0, seen, deadline = time.monotonic(), set(), time.monotonic() + timeout
    while True:
        stages = _stage_keys(s3.keys(run_dir))
        for name in sorted(set(stages) - seen):
            print(f"  +{time.monotonic() - t0:6.0f} s  {name}", flush=True)
        seen |= set(stages)
        if until is not None and (found := until(stages)):
            return "RUNNING", "", found
        status = cluster.job_status(job_id)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status, cluster.job("logs", job_id).stdout, None
        if time.monotonic() > deadline:
            logs = cluster.job("logs", job_id).stdout
            cluster.job("stop", job_id)
            raise AssertionError(f"job {job_id} still running after {timeout:.0f} s; stages on S3: "
                                 f"{sorted(seen)}\n{logs[-6000:]}")
        time.sleep(poll_s)


def _job_summary(status: str, logs: str) -> dict:
    assert status == "SUCCEEDED", f"job did not succeed: {status}\n{logs[-6000:]}"
    lines = [line for line in logs.splitlines() if line.startswith("{")]
    assert lines, f"no JSON summary in the job logs:\n{logs[-4000:]}"
    return json.loads(lines[-1])


def _stage_keys(keys: list[str]) -> dict[str, list[str]]:
    """S3 keys under the run dir → {stage dir name: keys inside it}."""
    out: dict[str, list[str]] = {}
    for key in keys:
        top, _, rest = key.partition("/")
        if rest:
            out.setdefault(top, []).append(rest)
    return out


@pytest.mark.timeout(3600)
def test_demo_pipeline_on_shared_nothing_nodes_with_the_run_dir_on_s3(shared_nothing_cluster, s3, tiny_student_on_s3):
    """The scaled-down demo (as test_demo_pipeline_job_on_two_nodes_writes_every_stage, students
    from the tiny model on S3) submitted to the shared-nothing cluster with run_dir on S3: every
    output is checked on the S3 server itself, never on a local disk; the wall time of each stage
    is printed (`-s`)."""
    run_dir = s3.new_prefix("demo")
    t0 = time.monotonic()
    status, logs, _ = _run_job(shared_nothing_cluster, s3, _demo_command(run_dir, tiny_student_on_s3), run_dir,
                                timeout=3300)
    wall = time.monotonic() - t0
    summary = _job_summary(status, logs)
    stages = summary["stages"]
    order = [s["name"] for s in read_json(f"{run_dir}/pipeline.json")["stages"]]
    print("STAGE_SECONDS", json.dumps({name: stages[name]["seconds"] for name in order}), f"job_wall={wall:.0f}")
    assert summary["complete"] == [] and len(summary["ran"]) == 9, summary
    assert all(s["path"].startswith(run_dir + "/") for s in stages.values()), stages
    keys = s3.keys(run_dir)
    by_stage = _stage_keys(keys)
    name_of = {s["path"][len(run_dir) + 1:]: name for name, s in stages.items()}
    assert set(name_of) <= set(by_stage), (sorted(name_of), sorted(by_stage))
    files = {name_of[d]: by_stage[d] for d in name_of}
    path = {name: s["path"] for name, s in stages.items()}
    for name in stages:
        assert "_SUCCESS.json" in files[name], name
        assert "_ERROR.txt" not in files[name], name
    assert "pipeline.json" in keys
    assert read_parquet(f"{path['data']}/pairs.parquet").num_rows == 6
    assert any(k.endswith(".parquet") for k in files["annotate"])
    for control in ("semantic", "global", "shuffled"):
        assert read_parquet(f"{path['schedule']}/beta-{control}.parquet").num_rows == 6
        import pyarrow.fs as pafs

        fs, key = pafs.FileSystem.from_uri(f"{path['reference']}/beta-{control}.parquet")
        assert pq.read_table(key, filesystem=fs)["ref_chosen_logps"].null_count == 0
        train = files[f"train-{control}"]
        assert "model/config.json" in train and "model/model.safetensors" in train, train
        assert read_json(f"{path[f'train-{control}']}/training_summary.json")["steps"] >= 1
    assert "audit/report.md" in files["schedule"]
    for run in ("base", "semantic", "global", "shuffled"):
        assert len(read_json(f"{path['evaluate']}/{run}/annotations.json")) == 2
        assert "win_rate" in read_json(f"{path['evaluate']}/{run}/score.json")
    assert "comparison.md" in files["compare"] and "comparison.png" in files["compare"]
    manifest = read_json(f"{run_dir}/pipeline.json")
    assert sorted(s["name"] for s in manifest["stages"]) == sorted(stages)
    assert all(s["status"] == "ran" for s in manifest["stages"]), manifest


@pytest.mark.timeout(5400)
def test_demo_pipeline_stopped_in_training_resumes_from_its_s3_checkpoint(shared_nothing_cluster, s3,
                                                                          tiny_student_on_s3):
    """Submit the demo up to train-global (run_dir on S3), `ray job stop` it once the first train
    stage has checkpointed on S3 (checkpoint_every=1: wait for its second checkpoint, so the first
    is certainly registered), resubmit the same command: the finished stages are skipped (status
    "complete"), the cut train stage resumes from its Ray Train checkpoint on S3
    (`resumed_from_steps`), and the run finishes."""
    cluster = shared_nothing_cluster
    run_dir = s3.new_prefix("resume")
    # Up to the second train stage: the cut one resumes, the next one starts fresh after it. The
    # tiny student takes a step (and an S3 checkpoint) in a few seconds: 12 leave time to stop it.
    command = _demo_command(run_dir, tiny_student_on_s3, "train.checkpoint_every=1", "train.max_steps=12",
                            "until=train-global")
    job_id = f"sp2dpo-s3-stop-{time.time_ns() % 10**8}"

    def second_checkpoint(stages: dict[str, list[str]]) -> str | None:
        for stage_dir, inside in stages.items():
            if stage_dir.startswith("train-") and "_SUCCESS.json" not in inside and any(
                    "/step_0000002/" in f"/{k}" for k in inside):
                return stage_dir
        return None

    status, logs, cut = _run_job(cluster, s3, command, run_dir, timeout=2400, job_id=job_id, until=second_checkpoint,
                                  poll_s=1)
    assert cut, f"the job ended before the first train stage wrote two checkpoints: {status}\n{logs[-6000:]}"
    stopped_at = time.monotonic()
    stopped = cluster.job("stop", job_id)
    assert stopped.returncode == 0, stopped.stderr
    assert cluster.job_status(job_id) == "STOPPED"
    before = read_json(f"{run_dir}/pipeline.json")
    finished = [s["name"] for s in before["stages"] if s["status"] == "ran"]
    assert finished[:4] == ["data", "annotate", "schedule", "reference"], finished
    assert "_SUCCESS.json" not in _stage_keys(s3.keys(run_dir))[cut]
    ckpts = sorted({part for k in _stage_keys(s3.keys(run_dir))[cut] for part in k.split("/")[:-1]
                    if part.startswith("step_")})
    print("CUT", cut, "checkpoints on S3 when stopped:", ckpts)

    status, logs, _ = _run_job(cluster, s3, command, run_dir, timeout=2700)
    summary = _job_summary(status, logs)
    cut_name = next(name for name, s in summary["stages"].items() if s["path"].endswith("/" + cut))
    print("STAGE_SECONDS_RESUMED", json.dumps({n: s["seconds"] for n, s in summary["stages"].items()}),
          f"resubmitted_after={time.monotonic() - stopped_at:.0f}s")
    assert summary["complete"] == finished, summary
    assert set(summary["stages"]) == {"data", "annotate", "schedule", "reference", "train-semantic", "train-global"}
    assert summary["ran"][0] == cut_name and set(summary["complete"]) | set(summary["ran"]) == set(summary["stages"])
    training = read_json(f"{summary['stages'][cut_name]['path']}/training_summary.json")
    print("RESUMED_FROM_STEPS", training.get("resumed_from_steps"), "steps", training.get("steps"))
    assert training["resumed_from_steps"] and training["resumed_from_steps"][0] >= 1, training
    assert training["steps"] == 12
