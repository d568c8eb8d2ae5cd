"""The CPU-runnable stages at the paper's scale: 59,960 pairs (UltraFeedback binarized's size).

    python benchmarks/bench_scale.py [--n 59960] [--curve 6000,20000,59960] [--skip-ingest]
    python benchmarks/bench_scale.py --only-ingest [--ingest-n 59960] [--ingest-workers 16]
    python benchmarks/bench_scale.py --curve "" --skip-ingest --openai-kill-only   # openai + kill at 59,960

The bundled 1,000-row sample's valid pairs are replicated, each copy made unique, to `--n` distinct
pair_ids. This process starts one local Ray instance; every step runs in its own process (joining
that instance where it uses Ray, as `ray job submit` drivers do), timed here end to end, while this
process samples the RSS of its whole process tree (the step, and every Ray process, workers
included) every 0.2 s. "Peak RSS" is that tree's peak during the step less the tree before it
(the idle Ray instance), so it is what the step adds. The steps:
- data prepare (`sp2dpo.data.prepare`), from a JSONL file;
- annotate with the ratings teacher;
- annotate with the `openai` teacher against a local OpenAI-compatible server on 127.0.0.1 that
  answers every request at once with a valid annotation. It is a stand-in for a teacher: the
  figure is the plumbing's ceiling (Ray Data, the async client, shards, resume), not a teacher's;
- the same run, its driver killed with SIGKILL once ~50% of the rows are in shards, then the same
  command again: 0 pairs lost and 0 duplicated is the pass mark;
- schedule: `build_artifact` (consensus, β schedule, artifact write) + `read_artifact` +
  `verify_artifact`;
- training-data ingest, as `sp2dpo train` does it: the driver tokenizes the training rows once
  (`sp2dpo.train.tokens.tokenize_once`, the SmolLM2 tokenizer, no max_length) into the cache
  beside the artifact, first in the driver alone, then again with one Ray task per CPU (as
  `sp2dpo train` does); then one Ray Train worker of `--ingest-workers` reads its shard of that
  cache (`read_shard`) and collates its first micro-batch: its time to the first step's data,
  and the RSS that adds. `--only-ingest` makes the inputs at `--ingest-n` (prepare, annotate
  with the ratings teacher, schedule) and runs only this step.
The scaling curve repeats prepare (with each engine, and with `auto`, which picks one by input
size), annotate (ratings), schedule, the one-off tokenize pass (in the driver) and one worker's
ingest at each size of `--curve`, and fits the exponent b of seconds ∝ n^b (least squares on
log-log; 1 is linear). A fixed cost pulls b under 1 over small sizes, so each curve also prints
the cost of each further 1,000 pairs between neighbouring sizes, and `marginal_ratio` is the
last interval's over the one before (1 is linear, above 1 grows faster). Step seconds for the
curve are the stage's own time (Ray start-up excluded), wall seconds are printed beside them.
Each figure is printed with the 1-minute load average at its end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SP2DPO_RAY_OBJECT_STORE_MB", "1024")  # a share of a machine, as the tests take
HERE = Path(__file__).resolve()


# ----------------------------------------------------------------------------- steps (child processes)


def make_input(n: int, path: str) -> None:
    """`n` distinct UltraFeedback rows as JSONL: the bundled sample's valid rows, copies made unique."""
    from sp2dpo.data.bundled import bundled_path
    from sp2dpo.data.validate import normalize_record

    valid = []
    for line in bundled_path("ultrafeedback-sample").read_text().splitlines():
        record = json.loads(line)
        try:
            normalize_record(record, "ultrafeedback-sample")
        except ValueError:
            continue
        valid.append(record)
    with open(path, "w") as f:
        for i in range(n):
            row = dict(valid[i % len(valid)])
            if i >= len(valid):
                row["prompt"] = f"{row['prompt']} [copy {i // len(valid)}]"
            f.write(json.dumps(row) + "\n")


def step_prepare(jsonl: str, out: str, engine: str = "auto") -> dict:
    from sp2dpo.data.prepare import DataConfig, prepare

    s = prepare(DataConfig(inputs=[jsonl], out=out, engine=engine), show_progress=False)
    return {"seconds": s["seconds"], "valid": s["valid"], "quarantined": s["quarantined"], "engine": s["engine"]}


def step_annotate(config: dict) -> dict:
    from sp2dpo.annotate import AnnotateConfig, annotate
    from sp2dpo.utils import init_ray

    init_ray()  # joins the benchmark's cluster (RAY_ADDRESS)
    s = annotate(AnnotateConfig.model_validate(config), show_progress=False)
    rows = s["annotated"] + s["failed"]
    return {"seconds": rows / s["rows_per_s"] if s["rows_per_s"] else s["seconds"], "end_to_end_s": s["seconds"],
            "annotated": s["annotated"], "failed": s["failed"], "skipped": s["skipped"], "shards": s["shards"]}


def step_schedule(pairs: str, annotations: str, out: str) -> dict:
    from sp2dpo.schedule.artifact import build_artifact, read_artifact, verify_artifact
    from sp2dpo.storage import read_parquet

    t0 = time.perf_counter()
    s = build_artifact(pairs, annotations, out)
    t_built = time.perf_counter()
    artifact, metadata = read_artifact(out)
    verify_artifact(artifact, read_parquet(pairs), metadata)
    t_end = time.perf_counter()
    return {"seconds": t_end - t0, "build_s": t_built - t0, "verify_s": t_end - t_built, "pairs": s["pairs"]}


def step_tokenize(pairs: str, artifact: str, tasks: int = 1) -> dict:
    """The driver's one-off pass: every training pair tokenized into the cache beside the artifact,
    in the driver (`tasks` 1) or by that many Ray tasks at once, as `sp2dpo train` does."""
    import resource

    from sp2dpo.models import bundled_model_dir
    from sp2dpo.train.data import load_training_table
    from sp2dpo.train.logps import load_tokenizer
    from sp2dpo.train.tokens import cache_path, cache_tag, tokenize_once

    table, _ = load_training_table(artifact, pairs)
    tokenizer = load_tokenizer(bundled_model_dir())
    Path(cache_path(artifact, cache_tag(table, tokenizer, None))).unlink(missing_ok=True)  # time a build
    if tasks > 1:
        import ray

        ray.init(address=os.environ["RAY_ADDRESS"])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    tokens = tokenize_once(table, tokenizer, None, artifact, tasks=tasks)  # no max_length: every pair whole
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "rows": table.num_rows, "rss_added_mb": after - before,
            "pairs_per_s": table.num_rows / seconds, "tokens": tokens, "reused": tokens["reused"]}


def step_ingest(tokens: dict, workers: int) -> dict:
    """One Ray Train worker's ingest before its first step: its shard of the cache, one micro-batch."""
    import resource

    from sp2dpo.models import bundled_model_dir
    from sp2dpo.train.config import TrainConfig
    from sp2dpo.train.logps import load_tokenizer, make_collator
    from sp2dpo.train.tokens import read_shard
    from sp2dpo.train.trainer import StepPlan

    tokenizer = load_tokenizer(bundled_model_dir())  # the worker loads it with the model anyway
    cfg = TrainConfig(num_workers=workers, strategy="torch", max_length=None)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    plan = StepPlan(tokens["tag"]["rows"], cfg, workers)
    shard = read_shard(tokens, plan.shard(0), tokenizer)
    collate = make_collator(cfg.shared_prompt, tokenizer.pad_token_id, cfg.max_length)
    collate([shard.example(i) for i in plan.indices(0, 0, 0)])
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "rows": len(shard), "workers": workers, "rss_added_mb": after - before}


def serve_stand_in(port: int) -> None:
    """An OpenAI-compatible /v1/chat/completions that answers at once with a valid annotation."""
    import uvicorn

    answer = json.dumps({"category": "factuality", "magnitude": 2, "confidence": 0.9,
                         "rationale": "Response B gets a fact wrong."})
    body = json.dumps({"id": "cmpl-0", "object": "chat.completion", "created": 0, "model": "stand-in",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                    "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 500, "completion_tokens": 30, "total_tokens": 530}}).encode()

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        more = True
        while more:  # read the request body to its end
            more = (await receive()).get("more_body", False)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


STEPS = {"prepare": step_prepare, "annotate": step_annotate, "schedule": step_schedule, "tokenize": step_tokenize,
         "ingest": step_ingest}


def child_main(name: str, args_json: str) -> None:
    result = STEPS[name](**json.loads(args_json))
    print("STEP " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- the driver


def _tree_rss_mb(proc) -> float:
    import psutil

    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0.0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def _load() -> str:
    return f"load {os.getloadavg()[0]:.1f}"


class Step:
    """A step as a child process: wall seconds, peak RSS it adds to this tree, its STEP result."""

    def __init__(self, name: str, **kwargs):
        import psutil

        self.name = name
        self.tree = psutil.Process(os.getpid())
        self.base_mb = _tree_rss_mb(self.tree)
        self.peak_mb = self.base_mb
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, str(HERE), "_step", name, json.dumps(kwargs)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.ps = psutil.Process(self.proc.pid)
        self.done = threading.Event()
        self.sampler = threading.Thread(target=self._sample, daemon=True)
        self.sampler.start()

    def _sample(self) -> None:
        while not self.done.is_set():
            self.peak_mb = max(self.peak_mb, _tree_rss_mb(self.tree))
            time.sleep(0.2)

    def wait(self) -> dict:
        out, err = self.proc.communicate()
        self.wall_s = time.perf_counter() - self.t0
        self.done.set()
        self.sampler.join()
        lines = [line for line in out.splitlines() if line.startswith("STEP ")]
        if self.proc.returncode != 0 or not lines:
            raise RuntimeError(f"step {self.name} failed ({self.proc.returncode}):\n{err[-3000:]}")
        result = json.loads(lines[-1][5:])
        result.update(wall_s=self.wall_s, peak_rss_mb=self.peak_mb - self.base_mb, load=_load())
        return result

    def kill(self) -> None:
        """SIGKILL the step's driver (the Ray instance, like a cluster, outlives it)."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.communicate()
        self.done.set()
        self.sampler.join()


def run(name: str, **kwargs) -> dict:
    return Step(name, **kwargs).wait()


def shard_rows(directory: str) -> int:
    import pyarrow.parquet as pq

    total = 0
    for path in Path(directory).rglob("*.parquet"):
        if not path.name.startswith(".tmp-"):
            try:
                total += pq.ParquetFile(path).metadata.num_rows
            except Exception:  # a shard being renamed into place
                pass
    return total


def fit_exponent(points: list[tuple[int, float]]) -> float:
    xs = [math.log(n) for n, _ in points]
    ys = [math.log(max(s, 1e-9)) for _, s in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def fmt(name: str, r: dict) -> str:
    extra = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()
             if k not in ("wall_s", "peak_rss_mb", "load", "seconds")}
    return (f"{name}: {r['seconds']:.2f} s in the stage, {r['wall_s']:.1f} s wall, peak RSS added "
            f"{r['peak_rss_mb']:,.0f} MB "
            f"[{r['load']}] {extra}")


def openai_config(pairs: str, out: str, port: int) -> dict:
    return {"pairs": pairs, "out": out, "teacher": "openai", "model": "stand-in",
            "openai": {"base_url": f"http://127.0.0.1:{port}/v1", "concurrency": 32, "max_retries": 2},
            "pool": {"batch_size": 64, "max_concurrent_batches": 4}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=59_960)
    parser.add_argument("--curve", default="6000,20000,59960")
    parser.add_argument("--skip-ingest", action="store_true")
    parser.add_argument("--skip-openai", action="store_true")
    # The openai, kill-and-resume and ingest steps at a smaller size (default --n), for a loaded machine.
    parser.add_argument("--openai-n", type=int, default=None)
    parser.add_argument("--openai-kill-only", action="store_true",
                        help="skip the uninterrupted openai run; its rate comes from the killed run + its resume")
    parser.add_argument("--ingest-n", type=int, default=None)
    parser.add_argument("--ingest-workers", type=int, default=16)
    parser.add_argument("--only-ingest", action="store_true", help="make the inputs at --ingest-n, run only ingest")
    args = parser.parse_args()
    if args.only_ingest:
        args.curve, args.skip_openai, args.skip_ingest = "", True, False
        args.n = args.ingest_n = args.ingest_n or args.n
    openai_n, ingest_n = args.openai_n or args.n, args.ingest_n or args.n
    sizes = sorted({int(x) for x in args.curve.split(",") if x} | {args.n, openai_n, ingest_n})
    print(f"sizes={sizes} cpus={os.cpu_count()} [{_load()}]", flush=True)
    results: dict[int, dict[str, dict]] = {}
    import ray

    from sp2dpo.utils import init_ray

    for attempt in range(10):  # a local Ray head gives its raylet 30 s to start: short on a loaded machine
        try:
            init_ray()
            break
        except Exception:
            ray.shutdown()
            if attempt == 9:
                raise
            time.sleep(10)
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            d = f"{tmp}/n{n}"
            os.makedirs(d)
            make_input(n, f"{d}/pairs.jsonl")
            r = results[n] = {}
            # Both engines at every size, so that each has its own curve; `auto` picks one by input size.
            for engine in () if args.only_ingest else ("local", "ray"):
                r[f"prepare_{engine}"] = run("prepare", jsonl=f"{d}/pairs.jsonl", out=f"{d}/data_{engine}",
                                             engine=engine)
                print(fmt(f"n={n} prepare (engine {engine})", r[f"prepare_{engine}"]), flush=True)
            r["prepare"] = run("prepare", jsonl=f"{d}/pairs.jsonl", out=f"{d}/data")
            print(fmt(f"n={n} prepare (engine auto)", r["prepare"]), flush=True)
            r["annotate_ratings"] = run("annotate",
                                        config={"pairs": f"{d}/data", "out": f"{d}/ann", "teacher": "ratings"})
            print(fmt(f"n={n} annotate ratings", r["annotate_ratings"]), flush=True)
            r["schedule"] = run("schedule", pairs=f"{d}/data/pairs.parquet", annotations=f"{d}/ann",
                                out=f"{d}/beta.parquet")
            print(fmt(f"n={n} schedule + artifact + verify", r["schedule"]), flush=True)
            if not args.skip_ingest:
                r["tokenize"] = run("tokenize", pairs=f"{d}/data/pairs.parquet", artifact=f"{d}/beta.parquet")
                print(fmt(f"n={n} train tokenize once (driver)", r["tokenize"]), flush=True)
                r["ingest"] = run("ingest", tokens=r["tokenize"]["tokens"], workers=args.ingest_workers)
                print(fmt(f"n={n} train ingest (one worker of {args.ingest_workers}: its shard, first batch)",
                          r["ingest"]), flush=True)

        big = results[args.n]
        d = f"{tmp}/n{openai_n}"
        if not args.skip_openai:
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            server = subprocess.Popen([sys.executable, str(HERE), "_server", str(port)])
            try:
                import httpx

                deadline = time.time() + 60
                while True:
                    try:
                        httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={}, timeout=2)
                        break
                    except httpx.HTTPError:
                        if time.time() > deadline:
                            raise
                        time.sleep(0.2)
                if not args.openai_kill_only:
                    big["annotate_openai"] = run("annotate",
                                                 config=openai_config(f"{d}/data", f"{d}/ann_openai", port))
                    print(fmt(f"n={openai_n} annotate openai (stand-in server: the plumbing's ceiling, not a teacher)",
                              big["annotate_openai"]), flush=True)

                out = f"{d}/ann_kill"
                step = Step("annotate", config=openai_config(f"{d}/data", out, port))
                while shard_rows(out) < openai_n // 2:
                    if step.proc.poll() is not None:
                        raise RuntimeError("the run ended before the kill: " + step.proc.stderr.read()[-2000:])
                    time.sleep(0.05)
                step.kill()
                killed_after_s, killed_peak_mb = time.perf_counter() - step.t0, step.peak_mb - step.base_mb
                before = shard_rows(out)
                resumed = run("annotate", config=openai_config(f"{d}/data", out, port))
            finally:
                server.terminate()
                server.wait(timeout=30)
            import pyarrow.parquet as pq

            ids = pq.read_table(f"{d}/data/pairs.parquet", columns=["pair_id"])["pair_id"].to_pylist()
            keys = []
            for path in Path(out).rglob("*.parquet"):
                if not path.name.startswith(".tmp-"):
                    keys += pq.read_table(path, columns=["pair_id"])["pair_id"].to_pylist()
            lost, duplicated = len(set(ids) - set(keys)), len(keys) - len(set(keys))
            print(f"n={openai_n} kill -9 at {before} rows ({before / openai_n:.0%}), resume: "
                  f"skipped={resumed['skipped']} "
                  f"annotated={resumed['annotated']} failed={resumed['failed']}, {resumed['wall_s']:.1f} s wall; "
                  f"rows in shards {len(keys)}, lost {lost}, duplicated {duplicated} [{resumed['load']}]", flush=True)
            both_s = killed_after_s + resumed["wall_s"]
            print(f"n={openai_n} the killed run wrote {before} rows in {killed_after_s:.1f} s wall (peak RSS added "
                  f"{killed_peak_mb:,.0f} MB); with the resume, {len(set(keys))} rows in {both_s:.1f} s wall, "
                  f"{len(set(keys)) / both_s:.1f} pairs/s end to end (peak RSS added {resumed['peak_rss_mb']:,.0f} MB "
                  f"in the resume)", flush=True)
            big["kill_resume"] = {"killed_at_rows": before, "lost": lost, "duplicated": duplicated,
                                  "pairs_per_s": len(set(keys)) / both_s,
                                  "peak_rss_mb": max(killed_peak_mb, resumed["peak_rss_mb"])}

        if not args.skip_ingest:
            d, ingested = f"{tmp}/n{ingest_n}", results[ingest_n]
            tasks = os.cpu_count()
            ingested["tokenize_tasks"] = run("tokenize", pairs=f"{d}/data/pairs.parquet",
                                             artifact=f"{d}/beta.parquet", tasks=tasks)
            print(fmt(f"n={ingest_n} train tokenize once ({tasks} Ray tasks at once)", ingested["tokenize_tasks"]),
                  flush=True)

    print()
    curve_stages = ["prepare_local", "prepare_ray", "prepare", "annotate_ratings", "schedule"]
    curve_stages += [] if args.skip_ingest else ["tokenize", "ingest"]
    for stage in curve_stages if len(sizes) > 1 else ():
        points = [(n, results[n][stage]["seconds"]) for n in sizes]
        curve = ", ".join(f"{n}: {s:.2f} s" for n, s in points)
        # The exponent over the whole range hides a fixed cost (it pulls b under 1); the cost of each
        # further 1,000 pairs between neighbouring sizes does not: equal steps are linear growth.
        marginal = ", ".join(f"{n0}→{n1}: {1000 * (s1 - s0) / (n1 - n0):.3f} s"
                             for (n0, s0), (n1, s1) in zip(points, points[1:]))
        print(f"{stage} curve: {curve}; fitted exponent {fit_exponent(points):.2f}; "
              f"per further 1,000 pairs {marginal}")
        print(f"RESULT scale_{stage}_exponent {fit_exponent(points):.3f}")
        if len(points) > 2:
            (n0, s0), (n1, s1), (n2, s2) = points[-3:]
            if s1 > s0:  # else the first interval is inside the fixed cost's noise: no ratio to give
                ratio = ((s2 - s1) / (n2 - n1)) / ((s1 - s0) / (n1 - n0))
                print(f"RESULT scale_{stage}_marginal_ratio {ratio:.3f}")
    def tag(n: int) -> str:
        return "60k" if n == 59_960 else str(n)

    for stage in ("prepare", "annotate_ratings", "schedule"):
        print(f"RESULT scale_{stage}_{tag(args.n)}_seconds {big[stage]['wall_s']:.1f}")
        print(f"RESULT scale_{stage}_{tag(args.n)}_peak_rss_mb {big[stage]['peak_rss_mb']:.0f}")
    if "annotate_openai" in big:
        print(f"RESULT scale_annotate_openai_{tag(openai_n)}_seconds {big['annotate_openai']['wall_s']:.1f}")
        print(f"RESULT scale_annotate_openai_{tag(openai_n)}_peak_rss_mb {big['annotate_openai']['peak_rss_mb']:.0f}")
        print(f"RESULT scale_annotate_openai_standin_pairs_per_s {openai_n / big['annotate_openai']['seconds']:.0f}")
    if "kill_resume" in big:
        print(f"RESULT scale_kill_resume_{tag(openai_n)}_lost {big['kill_resume']['lost']}")
        print(f"RESULT scale_kill_resume_{tag(openai_n)}_duplicated {big['kill_resume']['duplicated']}")
        print(f"RESULT scale_kill_resume_{tag(openai_n)}_pairs_per_s {big['kill_resume']['pairs_per_s']:.1f}")
        print(f"RESULT scale_kill_resume_{tag(openai_n)}_peak_rss_mb {big['kill_resume']['peak_rss_mb']:.0f}")
    if not args.skip_ingest:
        ingested = results[ingest_n]
        print(f"RESULT train_tokenize_once_{tag(ingest_n)}_seconds {ingested['tokenize']['seconds']:.1f}")
        print(f"RESULT train_tokenize_once_{tag(ingest_n)}_rss_mb {ingested['tokenize']['rss_added_mb']:.0f}")
        print(f"RESULT train_tokenize_once_tasks_{tag(ingest_n)}_seconds "
              f"{ingested['tokenize_tasks']['seconds']:.1f}")
        print(f"RESULT train_tokenize_once_tasks_speedup "
              f"{ingested['tokenize']['seconds'] / ingested['tokenize_tasks']['seconds']:.2f}")
        print(f"RESULT train_ingest_{tag(ingest_n)}_seconds {ingested['ingest']['seconds']:.1f}")
        print(f"RESULT train_ingest_{tag(ingest_n)}_rss_mb {ingested['ingest']['rss_added_mb']:.0f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_step":
        child_main(sys.argv[2], sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "_server":
        serve_stand_in(int(sys.argv[2]))
    else:
        main()
