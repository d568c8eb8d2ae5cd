"""Faults survived on real parts, each ending in "nothing lost": the outputs after the fault are
compared with those of an uninterrupted run.

- serve: 64 streaming clients for 2 minutes on 127.0.0.1, one model replica SIGKILLed mid-stream
- annotate: the Ray Data teacher actor SIGKILLed mid-batch (the driver keeps running)
- evaluate: the judge endpoint answers 503 and times out for a stretch, then the run is resumed
- storage: a writer SIGKILLed mid-file, on local disk and on the S3 server

Every test prints a `FAULT <name> {...}` line with its figures (run with -s to see them).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
from local_app import LocalApp
from s3_server import free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _report(name: str, figures: dict) -> None:
    print(f"\nFAULT {name} {json.dumps(figures, sort_keys=True)}", flush=True)


def _processes(title: str) -> list[psutil.Process]:
    """Workers of this test's Ray instance (children of its raylet; others may run Ray on the same
    machine) whose title (`ray::<actor class>...`) contains `title`."""
    import ray

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    found = []
    for proc in psutil.Process(raylet).children(recursive=True):
        try:
            cmdline = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if cmdline.startswith("ray::") and title in cmdline:
            found.append(proc)
    return found


def _rss_mb(procs: list[psutil.Process]) -> float:
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return round(total / 2**20, 1)


# ----------------------------------------------------------------------------- serve


CLIENTS = 64
LOAD_S = 120.0
KILL_AT_S = 40.0
PROMPTS = [f"Tell me about the number {i}." for i in range(8)]


def test_serve_replica_killed_under_64_streaming_clients(ray_local, tiny_model_dir):
    """Two replicas of the tiny model behind the app; 64 clients stream greedy chat completions for
    two minutes; 40 s in, one replica's process gets SIGKILL. Its clients get a clean error event
    and retry; every answer that arrives equals the one asked before the fault; the replica is
    replaced; RSS of the surviving processes stays flat."""
    import openai
    from ray import serve

    from sp2dpo.serve import ModelConfig, ServeConfig, start_server, stop_server

    key = "fault-key-1"
    cfg = ServeConfig(port=free_port(), access_log=False, models=[
        ModelConfig(id="tiny", path=str(tiny_model_dir), num_replicas=2, num_cpus=0.5, max_model_len=256,
                    max_ongoing_requests=48, default_max_tokens=24)])
    url = start_server(cfg, api_key=key)
    try:
        expected = {}
        sync = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120)
        for p in PROMPTS:
            r = sync.chat.completions.create(model="tiny", messages=[{"role": "user", "content": p}], temperature=0,
                                             max_tokens=24)
            expected[p] = r.choices[0].message.content
        replicas = _processes("ServeReplica:sp2dpo:model-tiny")
        assert len(replicas) == 2, [p.info["cmdline"] for p in replicas]
        stats = {"ok": 0, "retried_ok": 0, "clean_errors": 0, "other_errors": 0, "gave_up": 0, "wrong_text": 0}
        errors: list[str] = []
        rss: dict[str, float] = {}

        async def stream_once(client, prompt: str) -> str:
            text = []
            stream = await client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=24, stream=True)
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    text.append(chunk.choices[0].delta.content)
            return "".join(text)

        async def client_loop(i: int, client, stop_at: float) -> None:
            n = 0
            while time.monotonic() < stop_at:
                prompt = PROMPTS[(i + n) % len(PROMPTS)]
                n += 1
                for attempt in range(4):
                    try:
                        text = await stream_once(client, prompt)
                    except openai.APIError as exc:
                        # A clean error: an OpenAI error (event or status) naming a server-side failure.
                        clean = (getattr(exc, "code", None) == "replica_failed"
                                 or getattr(exc, "status_code", 0) in (500, 503))
                        stats["clean_errors" if clean else "other_errors"] += 1
                        errors.append(f"{type(exc).__name__}: {exc}"[:200])
                        await asyncio.sleep(0.5)
                        continue
                    stats["ok" if attempt == 0 else "retried_ok"] += 1
                    stats["wrong_text"] += text != expected[prompt]
                    break
                else:
                    stats["gave_up"] += 1

        def measure() -> dict[int, float]:
            return {p.pid: _rss_mb([p]) for p in _processes("ServeReplica:sp2dpo") + _processes("ProxyActor")}

        async def killer(t0: float) -> None:
            await asyncio.sleep(15)  # warmed up: every client has streamed a few answers
            rss["start"] = measure()
            await asyncio.sleep(KILL_AT_S - 15)
            handle = serve.get_deployment_handle("model-tiny", app_name="sp2dpo")
            loads = {}
            for _ in range(12):  # routed to either replica: ask until both have answered
                load = await handle.load.remote()
                loads[load["pid"]] = load["prompts_now"]
            stats["in_flight_at_kill"] = {str(pid): n for pid, n in loads.items()}
            os.kill(replicas[0].pid, signal.SIGKILL)
            stats["killed_at_s"] = round(time.monotonic() - t0, 1)
            await asyncio.sleep(LOAD_S - KILL_AT_S - 3)
            rss["end"] = measure()  # still under load

        async def run() -> None:
            t0 = time.monotonic()
            clients = [openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0, timeout=120) for _ in range(8)]
            try:
                await asyncio.gather(killer(t0), *(client_loop(i, clients[i % 8], t0 + LOAD_S) for i in range(CLIENTS)))
            finally:
                for c in clients:
                    await c.close()

        before = {p.pid for p in _processes("ServeReplica:sp2dpo")}
        asyncio.run(run())
        deadline = time.monotonic() + 120
        while True:
            app = serve.status().applications["sp2dpo"]
            deployment = app.deployments["model-tiny"]
            running = sum(n for state, n in deployment.replica_states.items()
                          if getattr(state, "value", state) == "RUNNING")
            if app.status == "RUNNING" and deployment.status == "HEALTHY" and running == 2:
                break
            assert time.monotonic() < deadline, (app.status, deployment.status, deployment.replica_states)
            time.sleep(1)
        new = [p.pid for p in _processes("ServeReplica:sp2dpo:model-tiny") if p.pid not in before]
        survivors = [pid for pid in rss["start"] if pid != replicas[0].pid and pid in rss["end"]]
        rss_start = round(sum(rss["start"][pid] for pid in survivors), 1)
        rss_end = round(sum(rss["end"][pid] for pid in survivors), 1)
        figures = {**stats, "clients": CLIENTS, "load_s": LOAD_S, "replaced_by": new, "rss_start_mb": rss_start,
                   "rss_end_mb": rss_end, "rss_processes": len(survivors), "rss_per_process": rss,
                   "sample_errors": sorted(set(errors))[:5]}
        _report("serve_replica_killed", figures)
        total = stats["ok"] + stats["retried_ok"]
        assert stats["gave_up"] == 0 and stats["other_errors"] == 0, figures
        assert stats["wrong_text"] == 0, figures
        assert stats["in_flight_at_kill"].get(str(replicas[0].pid), 0) > 0, figures  # killed mid-stream
        assert total >= CLIENTS * 2, figures
        # Only requests that were on the killed replica may fail once: at most its ongoing limit.
        assert stats["clean_errors"] <= 48, figures
        assert len(new) == 1, figures
        assert len(survivors) >= 2 and rss_end <= rss_start * 1.15 + 50, figures
        # And the replaced app still answers exactly as before.
        for p in PROMPTS[:2]:
            r = sync.chat.completions.create(model="tiny", messages=[{"role": "user", "content": p}], temperature=0,
                                             max_tokens=24)
            assert r.choices[0].message.content == expected[p]
    finally:
        stop_server()


# ----------------------------------------------------------------------------- annotate


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    from sp2dpo.data.prepare import DataConfig, prepare

    out = tmp_path_factory.mktemp("pairs")
    prepare(DataConfig(inputs=["ultrafeedback-sample"], out=str(out)), show_progress=False)
    return out


def test_annotation_actor_killed_mid_batch_is_retried(ray_local, pairs_dir, tmp_path, tiny_model_dir):
    """The transformers teacher (tiny model, greedy) in a one-actor Ray Data pool; once shards are
    being written, the actor's process gets SIGKILL while it works on a batch. Ray Data restarts the
    actor and reruns its task; the driver carries on. The table equals an uninterrupted run's."""
    from sp2dpo.annotate import AnnotateConfig, annotate
    from sp2dpo.annotate.store import read_shards, shard_files

    n = 24

    def config(out: Path) -> AnnotateConfig:
        return AnnotateConfig(pairs=str(pairs_dir), out=str(out), teacher="transformers", model=str(tiny_model_dir),
                              limit=n, shard_rows=2, generation={"max_tokens": 32},
                              pool={"batch_size": 2, "min_actors": 1, "max_actors": 1, "max_concurrent_batches": 1})

    t0 = time.monotonic()
    reference = annotate(config(tmp_path / "uninterrupted"), show_progress=False)
    uninterrupted_s = time.monotonic() - t0
    result: dict = {}

    def run() -> None:
        try:
            result["summary"] = annotate(config(tmp_path / "killed"), show_progress=False)
        except BaseException as exc:  # reported by the main thread
            result["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 600
    while len(shard_files(str(tmp_path / "killed"))) < 2:
        assert worker.is_alive(), result
        assert time.monotonic() < deadline, "no shard written in time"
        time.sleep(0.05)
    actors = _processes("MapBatches(TeacherActor)")
    assert len(actors) == 1, actors
    victim = actors[0].pid
    rows_before_kill = read_shards(str(tmp_path / "killed")).num_rows
    os.kill(victim, signal.SIGKILL)
    replacement = None
    while worker.is_alive():
        if replacement is None:
            replacement = next((p.pid for p in _processes("MapBatches(TeacherActor)") if p.pid != victim), None)
        time.sleep(0.2)
    worker.join()
    assert "error" not in result, result.get("error")
    summary = result["summary"]

    def rows(out: Path) -> list[tuple]:
        table = read_shards(str(out))
        return sorted(zip(table["pair_id"].to_pylist(), table["status"].to_pylist(), table["raw_text"].to_pylist()))

    killed, clean = rows(tmp_path / "killed"), rows(tmp_path / "uninterrupted")
    ids = [r[0] for r in killed]
    figures = {"pairs": n, "rows_before_kill": rows_before_kill, "rows_after": len(killed),
               "duplicates": len(ids) - len(set(ids)), "missing": n - len(set(ids)),
               "differ_from_uninterrupted": sum(a != b for a, b in zip(killed, clean)),
               "replacement_pid_seen": replacement is not None, "uninterrupted_s": round(uninterrupted_s, 1),
               "annotated": summary["annotated"], "failed": summary["failed"], "reference_failed": reference["failed"]}
    _report("annotate_actor_killed", figures)
    assert 0 < rows_before_kill < n, figures
    assert replacement is not None, figures
    assert figures["duplicates"] == 0 and figures["missing"] == 0, figures
    assert killed == clean, figures
    assert summary["annotated"] + summary["failed"] == n
    assert not list((tmp_path / "killed").rglob(".tmp-*"))


# ----------------------------------------------------------------------------- evaluate


class FlakyJudge(LocalApp):
    """An OpenAI-compatible judge on 127.0.0.1 (the real judge is a hosted API, which nothing here
    reaches). It answers like GPT-4 Turbo's AlpacaEval prompt (one token, log-probs), its pick fixed
    by the instruction; requests number `outage[0]` to `outage[1]` (counted from 1) fail, in turn
    with a 503 and by hanging past the client's timeout."""

    def __init__(self, outage: tuple[int, int] = (0, -1), hang_s: float = 3.0):
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse

        self.calls: list[tuple[str, str]] = []  # (instruction key, outcome)
        self.lock = threading.Lock()
        api = FastAPI()

        @api.post("/v1/chat/completions")
        async def chat(body: dict):
            content = body["messages"][-1]["content"]
            with self.lock:
                n = len(self.calls) + 1
                failing = outage[0] <= n <= outage[1]
                outcome = ("503" if n % 2 else "hang") if failing else "ok"
                self.calls.append((content, outcome))
            if outcome == "503":
                return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)
            if outcome == "hang":
                await asyncio.sleep(hang_s)
            token = "M" if sum(map(ord, content)) % 3 else "m"
            other = "m" if token == "M" else "M"
            top = [{"token": token, "logprob": -0.2, "bytes": None}, {"token": other, "logprob": -1.8, "bytes": None}]
            return {"id": "j", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": token},
                                 "logprobs": {"content": [{"token": token, "logprob": -0.2, "bytes": None,
                                                           "top_logprobs": top}]}}]}

        super().__init__(api)


def test_judge_outage_retries_then_resumes_without_rejudging(tmp_path):
    """16 outputs judged at concurrency 4 with 2 retries and a 1 s timeout; from the 7th request on,
    16 requests in a row fail (503s and hangs). The run retries, keeps what finished and stops with
    "rerun"; the rerun asks only for the rows still missing; the judgments equal an uninterrupted run's."""
    from sp2dpo.evaluate.config import EvaluateConfig
    from sp2dpo.evaluate.protocol import load_eval_set
    from sp2dpo.evaluate.run import judge

    rows = load_eval_set()[:16]
    outputs = [{"instruction": r["instruction"], "output": f"answer {i}: " + r["instruction"][:40],
                "generator": "student", "dataset": r["dataset"]} for i, r in enumerate(rows)]
    for name in ("clean", "faulty"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_outputs.json").write_text(json.dumps(outputs))

    def cfg(url: str) -> EvaluateConfig:
        return EvaluateConfig(judge_endpoint=url, judge_model="judge", concurrency=4, max_retries=2,
                              request_timeout_s=1.0)

    with FlakyJudge() as healthy:
        judge(cfg(healthy.url), str(tmp_path / "clean" / "model_outputs.json"), show_progress=False)
    clean = json.loads((tmp_path / "clean" / "annotations.json").read_text())

    t0 = time.monotonic()
    with FlakyJudge(outage=(7, 22)) as flaky:
        with pytest.raises(ValueError, match="rerun the same command to resume") as info:
            judge(cfg(flaky.url), str(tmp_path / "faulty" / "model_outputs.json"), show_progress=False)
        first_calls = list(flaky.calls)
    outage_s = time.monotonic() - t0
    partial = tmp_path / "faulty" / "annotations.partial.jsonl"
    finished = [json.loads(line)["instruction"] for line in partial.read_text().splitlines()]
    assert not (tmp_path / "faulty" / "annotations.json").exists()

    with FlakyJudge() as healthy:
        summary = judge(cfg(healthy.url), str(tmp_path / "faulty" / "model_outputs.json"), show_progress=False)
        rerun_prompts = [content for content, _ in healthy.calls]
    faulty = json.loads((tmp_path / "faulty" / "annotations.json").read_text())

    def asked_for(content: str) -> str:
        return next(o["instruction"] for o in outputs if o["output"] in content)

    retried = len(first_calls) - len({c for c, _ in first_calls})
    figures = {"rows": 16, "first_run_requests": len(first_calls),
               "first_run_503": sum(o == "503" for _, o in first_calls),
               "first_run_hangs": sum(o == "hang" for _, o in first_calls), "first_run_retries": retried,
               "finished_first_run": len(finished), "rerun_judged": summary["judged"],
               "rerun_resumed": summary["resumed"],
               "rejudged_finished_rows": sum(asked_for(c) in finished for c in rerun_prompts),
               "first_run_s": round(outage_s, 1), "error": str(info.value)[:160]}
    _report("judge_outage", figures)
    assert retried > 0 and 0 < len(finished) < 16, figures
    assert summary["resumed"] == len(finished) and summary["judged"] == 16 - len(finished), figures
    assert figures["rejudged_finished_rows"] == 0 and len(rerun_prompts) == 16 - len(finished), figures

    def key(a):
        return (a["instruction"], a["output_2"], a["preference"], a["is_switched_outputs"])

    assert [key(a) for a in faulty] == [key(a) for a in clean]


# ----------------------------------------------------------------------------- storage


WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sp2dpo import storage

    uri, pause = sys.argv[1], float(sys.argv[2])
    rng = np.random.default_rng(0)
    groups = [pa.table({"i": np.arange(k * 200_000, (k + 1) * 200_000), "x": rng.random(200_000)}) for k in range(12)]
    with storage.atomic_output(uri) as (fs, path):
        with pq.ParquetWriter(path, groups[0].schema, filesystem=fs) as writer:
            for k, group in enumerate(groups):
                writer.write_table(group)
                if k == 3:
                    print("HALFWAY", flush=True)
                time.sleep(pause)
    print("DONE", flush=True)
""")


def _write(uri: str, pause: float, kill_halfway: bool) -> int:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, uri, str(pause)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    if kill_halfway:
        assert proc.stdout.readline().strip() == "HALFWAY", proc.stderr.read()
        time.sleep(pause / 2)
        proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    if not kill_halfway:
        assert proc.returncode == 0 and "DONE" in out, err[-2000:]
    return proc.returncode


@pytest.mark.parametrize("where", ["local", "s3"])
def test_writer_killed_mid_file_leaves_nothing_a_rerun_trusts(where, tmp_path, request):
    """A 2.4 M-row (38 MB) Parquet file written a row group at a time through sp2dpo.storage (every stage's
    writer); SIGKILL after 4 of 12 groups (on S3: with parts of a multipart upload sent). Nothing readable
    is at the target, the rerun writes it whole, and it equals a file written without interruption."""
    from sp2dpo import storage

    if where == "s3":
        s3 = request.getfixturevalue("s3")
        root = s3.new_prefix("kill-write")

        def listing():  # what the server really holds
            return s3.keys(root)
    else:
        root = str(tmp_path / "out")

        def listing():
            return sorted(os.listdir(root)) if os.path.isdir(root) else []
    target, clean = storage.join_uri(root, "pairs.parquet"), storage.join_uri(root, "clean.parquet")
    rc = _write(target, pause=0.5, kill_halfway=True)
    after_kill = listing()
    hidden = [name for name in after_kill if name.startswith(".tmp-")]
    visible = storage.list_files(root) if storage.exists(root) else []
    figures = {"where": where, "returncode": rc, "after_kill": after_kill, "visible_to_readers": visible}
    if where == "s3":
        bucket, _, prefix = root[len("s3://"):].partition("/")
        uploads = s3.client().list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])
        figures["unfinished_multipart_uploads"] = len(uploads)
        if uploads:
            parts = s3.client().list_parts(Bucket=bucket, Key=uploads[0]["Key"], UploadId=uploads[0]["UploadId"])
            figures["parts_sent_before_kill"] = len(parts.get("Parts", []))
    assert rc == -signal.SIGKILL, figures
    assert not storage.exists(target) and "pairs.parquet" not in after_kill, figures
    assert visible == [], figures
    assert storage.remove_stale_tmp(root) == len(hidden)
    _write(target, pause=0.0, kill_halfway=False)
    _write(clean, pause=0.0, kill_halfway=False)
    rerun, uninterrupted = storage.read_parquet(target), storage.read_parquet(clean)
    figures.update(rows=rerun.num_rows, after_rerun=listing())
    _report(f"storage_killed_writer_{where}", figures)
    assert rerun.num_rows == 2_400_000 and rerun.equals(uninterrupted), figures
    assert [n for n in listing() if n.startswith(".tmp-")] == [], figures


# ----------------------------------------------------------------------------- train


def _driver(run_dir: str) -> psutil.Process | None:
    """The job driver of the pipeline writing `run_dir`: `python jobs/pipeline.py ...`, started on
    the head by the job's JobSupervisor (not a shell around it, not a `ray job` client)."""
    for proc in psutil.process_iter(["cmdline"]):
        args = proc.info["cmdline"] or []
        if (len(args) > 1 and Path(args[0]).name.startswith("python") and args[1] == "jobs/pipeline.py"
                and f"run_dir={run_dir}" in args):
            return proc
    return None


def _committed_step(run_dir: str) -> int:
    """The step of the last checkpoint Ray Train has committed for the run's train stage (its
    controller's `checkpoint_manager_snapshot.json`), 0 before the first."""
    for snapshot in Path(run_dir).glob("train-*/**/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
        except (OSError, json.JSONDecodeError):  # being rewritten: read it again next time
            return 0
        if latest:
            return int(latest["checkpoint_dir_name"].removeprefix("step_"))
    return 0


@pytest.mark.timeout(3600)
def test_train_job_driver_killed_then_resubmitted_resumes_from_its_checkpoint(tmp_path, tiny_model_dir):
    """The demo pipeline up to its first train stage as a `ray job submit` job on a two-node local
    cluster (tiny student, a checkpoint every step, 8 steps). Once Ray Train has committed the
    stage's second checkpoint, the job's driver process on the head gets SIGKILL; its Ray Train
    workers go with it and the job is FAILED. The same command resubmitted skips the finished
    stages and resumes training from the last committed checkpoint."""
    from cluster_harness import LocalCluster

    run_dir = str(tmp_path / "run")
    overrides = [f"run_dir={run_dir}", f"train.model={tiny_model_dir}", "data.limit=6", "data.max_tokens=200",
                 "teachers=[{teacher: ratings}]", "controls=[semantic]", "train.max_length=256",
                 "train.resources_per_worker={CPU: 1}", "train.checkpoint_every=1", "train.max_steps=8",
                 "until=train-semantic"]
    command = ["python", "jobs/pipeline.py", "--config", "demo", "--json"]
    for item in overrides:
        command += ["--set", item]
    with LocalCluster() as cluster:
        job_id = f"sp2dpo-kill-driver-{time.time_ns() % 10**8}"
        submitted = cluster.submit(command, wait=False, submission_id=job_id)
        assert submitted.returncode == 0, submitted.stderr
        deadline = time.monotonic() + 1800
        # A checkpoint's directory is written before Ray Train commits it; a resubmitted run
        # resumes from the last committed one, so wait for the commit, not the directory.
        while _committed_step(run_dir) < 2:
            status = cluster.job_status(job_id)
            assert status in ("PENDING", "RUNNING"), (status, cluster.job("logs", job_id).stdout[-4000:])
            assert time.monotonic() < deadline, "the train stage never committed two checkpoints"
            time.sleep(0.2)
        driver = _driver(run_dir)
        assert driver is not None, "no driver process found"
        stage = next(Path(run_dir).glob("train-*"))
        os.kill(driver.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        while cluster.job_status(job_id) in ("PENDING", "RUNNING"):
            assert time.monotonic() < killed_at + 300, "the job outlived its driver"
            time.sleep(1)
        status_after_kill = cluster.job_status(job_id)
        checkpoints = sorted(p.name for p in stage.rglob("step_*") if p.is_dir())
        assert not (stage / "_SUCCESS.json").exists()

        again = cluster.submit(command, timeout=1800)
        assert again.returncode == 0, again.stderr[-4000:] + again.stdout[-4000:]
    summary = next(json.loads(line) for line in reversed(again.stdout.splitlines()) if line.startswith("{"))
    training = json.loads((stage / "training_summary.json").read_text())
    figures = {"status_after_kill": status_after_kill, "checkpoints_when_killed": checkpoints,
               "complete_on_resubmit": summary["complete"], "ran_on_resubmit": summary["ran"],
               "resumed_from_steps": training.get("resumed_from_steps"), "steps": training.get("steps")}
    _report("train_driver_killed", figures)
    assert status_after_kill == "FAILED", figures
    assert summary["complete"] == ["data", "annotate", "schedule", "reference"], figures
    assert summary["ran"] == ["train-semantic"], figures
    assert training["resumed_from_steps"] and training["resumed_from_steps"][0] >= 2, figures
    assert training["steps"] == 8 and (stage / "_SUCCESS.json").exists(), figures
