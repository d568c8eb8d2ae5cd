"""LC win rate on leaderboard models it has never seen: leave-one-model-out against the official
AlpacaEval 2.0 leaderboard.

    python benchmarks/bench_evaluate_lc.py [RESULTS_DIR] [--models NAME ...]

RESULTS_DIR (default ../shared/data/alpaca_eval/results) holds the official
`weighted_alpaca_eval_gpt4_turbo` annotations of leaderboard models. For each model with a
leaderboard row, instruction difficulty is re-estimated from the *other* models only (their
annotations, official GLM weights and leaderboard rows; `estimate_difficulty(exclude=[model])`),
the model is scored with `sp2dpo evaluate score --instruction-difficulty <that estimate>` (its own
per-model LC GLM, as alpaca_eval fits it), and the result is compared with its leaderboard LC.

alpaca_eval looks difficulty up by row position in the annotations file, not by instruction; a
file that skips instructions (four here) therefore got misaligned difficulties on the leaderboard.
For those files the error is given both ways: "as alpaca_eval" (row position, how the leaderboard
number was made; used in the summary) and "by instruction" (what `sp2dpo evaluate score` does).

Measured in the same run, for comparison: the minimal GLM (length only, no difficulty, no
regularisation; alpaca_eval's `length_controlled_minimal`), and the shipped estimate in-sample.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from sp2dpo.evaluate import difficulty as offline
from sp2dpo.evaluate import lc
from sp2dpo.evaluate.protocol import load_eval_set
from sp2dpo.evaluate.score import score_annotations

DEFAULT_RESULTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_eval" / "results"
SHORT, LONG = 800, 1800


def alpaca_eval_lookup_lc(rows: list[dict], values: np.ndarray, reference_lengths: np.ndarray) -> float:
    """LC with difficulty taken by row position, as alpaca_eval's `_get_featurized_data` does."""
    pref = np.array([float(r["preference"]) for r in rows])
    res = lc.length_controlled_winrate(
        np.where(pref == 0.0, 1.5, pref) - 1.0, np.array([len(r["output_1"]) for r in rows], float),
        np.array([len(r["output_2"]) for r in rows], float), values[: len(rows)],
        gamed=offline.synthetic_gamed(values, reference_lengths))
    return res["lc_win_rate"]


def stats(errors: dict[str, float], names: list[str]) -> dict[str, float]:
    a = np.abs([errors[m] for m in names])
    return {"n": len(a), "max": float(a.max()), "p90": float(np.percentile(a, 90)), "mean": float(a.mean())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("results", nargs="?", default=str(DEFAULT_RESULTS))
    parser.add_argument("--models", nargs="*", help="only these held-out models")
    args = parser.parse_args()
    board = offline.official_leaderboard()
    eval_rows = load_eval_set()
    instructions = [r["instruction"] for r in eval_rows]
    reference_lengths = np.array([len(r["output"]) for r in eval_rows], float)
    annotations = offline.read_model_annotations([args.results])
    models = [m for m in offline.usable_models(annotations)
              if m in board.index and (not args.models or m in args.models)]
    t0 = time.perf_counter()
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in models:
            rows = annotations[m]
            path = Path(tmp) / f"{m}.annotations.json"
            path.write_text(json.dumps(rows))
            lb_lc, length = board.loc[m, "length_controlled_winrate"], board.loc[m, "avg_length"]
            values = offline.estimate_difficulty(annotations, instructions, exclude=[m])
            csv = Path(tmp) / f"{m}.csv"
            csv.write_text("index,instruction_difficulty\n" + "".join(f"{i},{v}\n" for i, v in enumerate(values)))
            ours = score_annotations(path, instruction_difficulty=str(csv), hub_files=False)
            skips = [r["instruction"] for r in rows] != instructions[: len(rows)]
            as_alpaca_eval = alpaca_eval_lookup_lc(rows, values, reference_lengths) if skips else ours["lc_win_rate"]
            minimal = score_annotations(path, glm="length_controlled_minimal", hub_files=False)
            shipped = score_annotations(path, hub_files=False)
            table.append({"model": m, "avg_length": int(length), "lb_wr": board.loc[m, "win_rate"],
                          "wr_err": ours["win_rate"] - board.loc[m, "win_rate"], "lb_lc": lb_lc,
                          "loo": as_alpaca_eval - lb_lc, "loo_by_instruction": ours["lc_win_rate"] - lb_lc,
                          "skips": skips, "minimal": minimal["lc_win_rate"] - lb_lc,
                          "shipped": shipped["lc_win_rate"] - lb_lc})
            print(f"{m}: {table[-1]['loo']:+.2f}", flush=True)
    seconds = time.perf_counter() - t0
    table.sort(key=lambda r: r["avg_length"])
    print("\n| model | avg length | LB WR | WR error | LB LC | LC error, leave-one-out | by instruction "
          "| shipped (in-sample) | minimal GLM |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in table:
        by_instr = f"{r['loo_by_instruction']:+.2f}" if r["skips"] else "same"
        print(f"| {r['model']}{' (skips instructions)' if r['skips'] else ''} | {r['avg_length']} | {r['lb_wr']:.2f} | "
              f"{r['wr_err']:+.3f} | {r['lb_lc']:.2f} | {r['loo']:+.2f} | {by_instr} | {r['shipped']:+.2f} | "
              f"{r['minimal']:+.2f} |")
    errors = {r["model"]: r["loo"] for r in table}
    names = [r["model"] for r in table]
    groups = {"all": names, f"short (< {SHORT} chars)": [r["model"] for r in table if r["avg_length"] < SHORT],
              f"long (> {LONG} chars)": [r["model"] for r in table if r["avg_length"] > LONG]}
    print("\n| |abs LC error| (points) | models | max | p90 | mean |\n|---|---:|---:|---:|---:|")
    for label, group in groups.items():
        if group:
            s = stats(errors, group)
            print(f"| leave-one-out, {label} | {s['n']} | {s['max']:.2f} | {s['p90']:.2f} | {s['mean']:.2f} |")
    by_instruction = stats({r["model"]: r["loo_by_instruction"] for r in table}, names)
    shipped = stats({r["model"]: r["shipped"] for r in table}, names)
    minimal = stats({r["model"]: r["minimal"] for r in table}, names)
    print(f"| leave-one-out, by instruction for the files that skip some | {by_instruction['n']} | "
          f"{by_instruction['max']:.2f} | {by_instruction['p90']:.2f} | {by_instruction['mean']:.2f} |")
    print(f"| shipped estimate, in-sample | {shipped['n']} | {shipped['max']:.2f} | {shipped['p90']:.2f} | "
          f"{shipped['mean']:.2f} |")
    print(f"| minimal GLM (baseline: no difficulty, no regularisation) | {minimal['n']} | {minimal['max']:.2f} | "
          f"{minimal['p90']:.2f} | {minimal['mean']:.2f} |")
    overall = stats(errors, names)
    print(f"\nleave-one-out over {len(names)} models in {seconds:.0f} s; max |error| {overall['max']:.2f} vs "
          f"{minimal['max']:.2f} for the minimal GLM (ratio {overall['max'] / minimal['max']:.2f})")
    print(f"RESULT evaluate_lc_loo_max_abs_error_points {overall['max']:.2f}")
    print(f"RESULT evaluate_lc_loo_p90_abs_error_points {overall['p90']:.2f}")
    print(f"RESULT evaluate_lc_loo_mean_abs_error_points {overall['mean']:.2f}")
    for label, key in ((f"short (< {SHORT} chars)", "short"), (f"long (> {LONG} chars)", "long")):
        if groups[label]:
            s = stats(errors, groups[label])
            print(f"RESULT evaluate_lc_loo_max_abs_error_points_{key} {s['max']:.2f}")
            print(f"RESULT evaluate_lc_loo_mean_abs_error_points_{key} {s['mean']:.2f}")


if __name__ == "__main__":
    main()
