"""LC win rate against the official AlpacaEval 2.0 leaderboard, per annotated model.

    python benchmarks/bench_evaluate_lc.py

For each model with public per-instruction annotations (tests/data/alpaca_eval) it prints the
leaderboard's WR and LC, our WR, and our LC error for:
  - v1 (in-sample): length_controlled_v1 with the shipped difficulty estimate (which used this
    model's annotations too);
  - v1 (leave-one-out): difficulty re-estimated without this model's annotations or leaderboard row;
  - noreg / minimal: alpaca_eval's GLMs without the regularisation toward the baseline / without
    difficulty either — the baseline measured in the same run (a plain length-only logistic fit).
"""

from __future__ import annotations

import gzip
import json
import tempfile
import time
from pathlib import Path

from sp2dpo.evaluate.difficulty import estimate_difficulty, official_leaderboard
from sp2dpo.evaluate.protocol import load_eval_set
from sp2dpo.evaluate.score import score_annotations

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "alpaca_eval"
MODELS = ["FuseChat-Llama-3.1-8B-Instruct", "FuseChat-Llama-3.2-1B-Instruct", "alpaca-7b"]


def main() -> None:
    board = official_leaderboard()
    instructions = [r["instruction"] for r in load_eval_set()]
    rows = {m: json.load(gzip.open(DATA / f"{m}.annotations.json.gz", "rt")) for m in MODELS}
    t0 = time.perf_counter()
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in MODELS:
            path = DATA / f"{m}.annotations.json.gz"
            lb_wr, lb_lc = board.loc[m, "win_rate"], board.loc[m, "length_controlled_winrate"]
            v1 = score_annotations(path)
            others = {k: v for k, v in rows.items() if k != m}
            values = estimate_difficulty(others, instructions, exclude_from_prior=[m])
            csv = Path(tmp) / f"{m}.csv"
            csv.write_text("index,instruction_difficulty\n" + "".join(f"{i},{v}\n" for i, v in enumerate(values)))
            loo = score_annotations(path, instruction_difficulty=str(csv))
            noreg = score_annotations(path, glm="length_controlled_noreg")
            minimal = score_annotations(path, glm="length_controlled_minimal")
            table.append((m, lb_wr, v1["win_rate"] - lb_wr, lb_lc, v1["lc_win_rate"] - lb_lc, loo["lc_win_rate"] - lb_lc,
                          noreg["lc_win_rate"] - lb_lc, minimal["lc_win_rate"] - lb_lc))
    seconds = time.perf_counter() - t0
    print("| model | LB WR | WR error | LB LC | LC error v1 (in-sample) | v1 (leave-one-out) | noreg | minimal |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for m, wr, wr_err, lc, e1, eloo, enoreg, emin in table:
        print(f"| {m} | {wr:.2f} | {wr_err:+.4f} | {lc:.2f} | {e1:+.2f} | {eloo:+.2f} | {enoreg:+.2f} | {emin:+.2f} |")
    worst = max(abs(r[4]) for r in table)
    worst_loo = max(abs(r[5]) for r in table)
    worst_min = max(abs(r[7]) for r in table)
    print(f"max |LC error|: v1 in-sample {worst:.2f}, v1 leave-one-out {worst_loo:.2f}, "
          f"minimal GLM (baseline) {worst_min:.2f} points; {seconds:.1f} s")
    print(f"RESULT evaluate_lc_max_abs_error_points {worst:.2f}")


if __name__ == "__main__":
    main()
