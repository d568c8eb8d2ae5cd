"""A small real study on CPU: the experiment grid on SmolLM2-135M with planted label noise.

    python benchmarks/study_grid_cpu.py [--pairs 24] [--flip 0.25] [--eval-pairs 64] [--instructions 4]
        [--learning-rate 5e-5] [--run-dir runs/study-grid] [--global-betas 0.05 0.1] [--seed 0]

A known fraction (`--flip`) of the bundled UltraFeedback pairs gets chosen and rejected swapped,
the scores travelling with the texts: the ratings teacher sees the original scores, so it can
call those pairs `reversed` (the schedule then gives them β_min, `reversed_policy: min_beta`).
The grid (one student, SmolLM2; `global@β` for each β, `semantic`, `shuffled`; one seed; the
untrained base) runs through `sp2dpo pipeline` with the demo-grid config, then:

- held-out preference accuracy: the implicit reward margin
  [log π(y_w) − log π_ref(y_w)] − [log π(y_l) − log π_ref(y_l)] of every student on the bundled
  UltraFeedback eval pairs (`--eval-pairs`, no judge needed; π_ref = the base model), its accuracy
  (share of pairs with margin > 0), and the paired difference semantic − tuned global with a 95%
  bootstrap CI and a sign-flip p-value (sp2dpo.evaluate.paired.paired_stats over pairs);
- the AlpacaEval numbers of every arm from the pipeline's comparison.json (SmolLM2 as judge).

It prints one table and writes study.json beside the run. Whatever it finds is the result: on
tens of pairs and a 135M model the CIs are wide, and the point is an honest, reproducible
comparison. Not part of `make test` (about 20 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa


def planted_noise_input(out: Path, flip: float, seed: int) -> str:
    """The bundled pairs with a seeded `flip` share swapped (texts and scores), marked in metadata."""
    from sp2dpo.data.bundled import bundled_path

    records = [json.loads(line) for line in bundled_path("ultrafeedback-sample").read_text().splitlines()]
    rng = np.random.default_rng(seed)
    flipped = rng.permutation(len(records))[: round(flip * len(records))]
    for i in flipped:
        r = records[i]
        r["chosen"], r["rejected"] = r["rejected"], r["chosen"]
        meta = r["metadata"]
        meta["score_chosen"], meta["score_rejected"] = meta["score_rejected"], meta["score_chosen"]
        meta["planted_flip"] = True
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(out)


def held_out_pairs(out: Path, n: int) -> pa.Table:
    from sp2dpo.data.prepare import DataConfig, prepare
    from sp2dpo.storage import read_parquet

    prepare(DataConfig(inputs=["ultrafeedback-eval"], limit=n, max_tokens=200, tokenizer="smollm2", out=str(out)),
            show_progress=False)
    return read_parquet(str(out / "pairs.parquet")).select(["pair_id", "prompt", "prompt_messages", "chosen",
                                                             "rejected"])


def logps(model: str, rows: pa.Table, max_length: int) -> np.ndarray:
    """(n, 2) summed log-probs of chosen and rejected under `model` (the training code's scorer)."""
    from sp2dpo.train.reference import ReferenceScorer

    scored = ReferenceScorer(model, max_length, "float32", 8, True)(rows)
    return np.stack([scored["ref_chosen_logps"].to_numpy(), scored["ref_rejected_logps"].to_numpy()], axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=24)
    ap.add_argument("--learning-rate", type=float, default=5e-5)  # demo-grid's 5e-6 barely moves a student in 12 steps
    ap.add_argument("--flip", type=float, default=0.25)
    ap.add_argument("--eval-pairs", type=int, default=64)
    ap.add_argument("--instructions", type=int, default=4)
    ap.add_argument("--global-betas", type=float, nargs="+", default=[0.05, 0.1])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run-dir", default="runs/study-grid")
    args = ap.parse_args()

    from sp2dpo.config import load_config
    from sp2dpo.evaluate.paired import paired_stats
    from sp2dpo.pipeline.cli import run
    from sp2dpo.pipeline.config import PipelineConfig
    from sp2dpo.storage import read_parquet

    t0 = time.perf_counter()
    # Ray gives a starting raylet 30 s; on a loaded machine that can pass, so retry the start.
    from sp2dpo.utils import init_ray

    for attempt in range(5):
        try:
            init_ray()
            break
        except Exception as exc:  # Ray raises a bare Exception for this
            import ray

            ray.shutdown()  # the half-started local instance this process began
            if attempt == 4 or "timed out during startup" not in str(exc):
                raise
            time.sleep(10)
    root = Path(args.run_dir).absolute()
    noisy = planted_noise_input(root / "input" / "pairs.jsonl", args.flip, args.seed)
    max_length = 256
    config = load_config(PipelineConfig, "demo-grid", [
        f"run_dir={root / 'pipeline'}", "students=[{name: smollm2, model: smollm2}]",
        f"global_betas={json.dumps(args.global_betas)}", f"seeds=[{args.seed}]",
        f"data.inputs=[{noisy}]", f"data.limit={args.pairs}", "data.max_tokens=200",
        f"train.max_length={max_length}", f"train.learning_rate={args.learning_rate}",
        f"evaluate.limit={args.instructions}", "evaluate.max_tokens=48"])
    summary = run(config)
    stages = summary["stages"]
    comparison = json.loads(Path(stages["compare"]["path"], "comparison.json").read_text())

    # What the teacher saw: how many planted flips it called reversed.
    artifact = read_parquet(str(Path(stages["schedule"]["path"], "beta-semantic.parquet")))
    pairs = read_parquet(str(Path(stages["data"]["path"], "pairs.parquet")))
    planted = np.array(["planted_flip" in (m or "") for m in pairs["meta"].to_pylist()])
    category = np.array(artifact["category"].to_pylist())
    caught = int((planted & (category == "reversed")).sum())
    n_flipped = int(planted.sum())

    rows = held_out_pairs(root / "heldout", args.eval_pairs)
    ref = logps("smollm2", rows, max_length)
    margins = {}
    for r in comparison["rows"]:
        if r["cost"] is None:
            continue
        lp = logps(r["provenance"]["model_dir"], rows, max_length)
        margins[r["arm"]] = (lp[:, 0] - ref[:, 0]) - (lp[:, 1] - ref[:, 1])
    tuned = comparison["tuned_global"]["smollm2"]["arm"]
    rng = np.random.default_rng(0)
    acc = {arm: float((m > 0).mean() * 100) for arm, m in margins.items()}
    deltas = {f"semantic - {name}": paired_stats(((margins["semantic"] > 0).astype(float) - (margins[arm] > 0)) * 100,
                                                 2000, rng)
              for name, arm in (("tuned_global", tuned), ("shuffled", "shuffled"))}

    print(f"\nplanted flips: {n_flipped} of {pairs.num_rows} training pairs; the ratings teacher called {caught} "
          "of them reversed")
    print(f"held-out pairs: {rows.num_rows}; AlpacaEval instructions: {args.instructions}; judge {comparison['judge']}")
    print(f"tuned_global: {tuned} by {comparison['tuned_global']['smollm2']['metric']}\n")
    print("| arm | mean β | held-out acc (%) | mean margin | AE WR (%) | ± SE | LC (%) | train s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in comparison["rows"]:
        m = margins.get(r["arm"])
        lc = "–" if r["lc_win_rate"] is None else f"{r['lc_win_rate']:.1f}"
        print(f"| {r['arm']} | {'–' if r['mean_beta'] is None else format(r['mean_beta'], '.4f')} | "
              f"{'–' if m is None else format(acc[r['arm']], '.1f')} | "
              f"{'–' if m is None else format(m.mean(), '+.4f')} | "
              f"{r['win_rate']:.1f} | {r['standard_error']:.1f} | {lc} | "
              f"{'–' if r['cost'] is None else format(r['cost']['wall_seconds'], '.0f')} |")
    print("\n| paired difference (points) | held-out acc Δ [95% CI] | p | AE WR Δ [95% CI] | p |")
    print("|---|---|---:|---|---:|")
    for d in comparison["deltas"]:
        h, w = deltas[d["comparison"]], d["win_rate"]
        print(f"| {d['comparison']} | {h['delta']:+.1f} [{h['ci_low']:+.1f}, {h['ci_high']:+.1f}] | {h['p_value']:.3f} "
              f"| {w['delta']:+.1f} [{w['ci_low']:+.1f}, {w['ci_high']:+.1f}] | {w['p_value']:.3f} |")
    seconds = time.perf_counter() - t0
    print(f"\nRESULT study_grid_cpu: {seconds:.0f} s; comparison {Path(stages['compare']['path'], 'comparison.md')}")
    (root / "study.json").write_text(json.dumps({
        "pairs": pairs.num_rows, "planted_flips": n_flipped, "caught_as_reversed": caught,
        "held_out_pairs": rows.num_rows,
        "held_out_accuracy": acc, "held_out_deltas": deltas, "tuned_global": tuned,
        "alpaca_eval_deltas": comparison["deltas"], "seconds": round(seconds, 1)}, indent=2))


if __name__ == "__main__":
    main()
