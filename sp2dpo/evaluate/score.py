"""Score an annotations.json: win rate, its standard error, discrete win rate, average length and
the length-controlled win rate.

    sp2dpo evaluate score runs/eval/annotations.json --json
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sp2dpo.evaluate.annotations import load_annotations, preferences, winrate_metrics
from sp2dpo.evaluate.protocol import BASELINE, DEFAULT_ANNOTATOR, load_eval_set


def score_annotations(
    path: str | Path,
    glm: str = "length_controlled_v1",
    instruction_difficulty: str | None = None,
    df_gamed: str | None = None,
    allow_missing: bool = False,
    eval_set: str = "alpaca-eval",
) -> dict[str, Any]:
    from sp2dpo.evaluate import difficulty as offline
    from sp2dpo.evaluate import lc

    eval_rows = load_eval_set(eval_set)
    instructions = [r["instruction"] for r in eval_rows]
    rows, n_missing = load_annotations(path, instructions, allow_missing=allow_missing)
    summary: dict[str, Any] = {"generator": rows[0]["generator_2"], "baseline": rows[0]["generator_1"]}
    summary.update(winrate_metrics(rows))
    summary["n_missing"] = n_missing

    gamed = lc.read_df_gamed(df_gamed) if df_gamed else None
    if instruction_difficulty:
        values = lc.read_instruction_difficulty(instruction_difficulty, instructions)
        source = f"file {instruction_difficulty}"
    elif gamed is not None:
        values = lc.difficulty_from_df_gamed(gamed, len(instructions))
        source = f"df_gamed {df_gamed}"
    else:
        values = offline.packaged_estimate(instructions)
        source = "offline estimate (docs/evaluate.md)"
    if gamed is None:
        gamed = offline.synthetic_gamed(values, np.array([len(r["output"]) for r in eval_rows], float))
        gamed_source = "synthetic (official gamed-baseline GLM weights)"
    else:
        gamed_source = f"file {df_gamed}"
    position = {s: i for i, s in enumerate(instructions)}
    idx = np.array([position[r["instruction"]] for r in rows])

    if summary["generator"] == summary["baseline"]:
        summary.update(lc_win_rate=50.0, lc_standard_error=0.0, glm=glm, glm_weights={})
    else:
        summary.update(lc.length_controlled_winrate(
            pref01=preferences(rows) - 1.0,
            len_baseline=np.array([len(r["output_1"]) for r in rows], float),
            len_model=np.array([len(r["output_2"]) for r in rows], float),
            difficulty=values[idx],
            gamed=gamed,
            glm=glm,
        ))
    annotators = sorted({str(r.get("annotator", "")) for r in rows})
    summary["annotator"] = annotators[0] if len(annotators) == 1 else annotators
    summary["difficulty_source"] = source
    summary["df_gamed_source"] = gamed_source if lc.glm_info(glm)["regularize_to_baseline_lambda"] else None
    # The leaderboard's numbers come from its own judge against its own baseline, on all 805.
    summary["comparable_with_leaderboard"] = bool(
        summary["annotator"] == DEFAULT_ANNOTATOR and summary["baseline"] == BASELINE
        and summary["n"] == len(instructions) and n_missing == 0)
    if not summary["comparable_with_leaderboard"]:
        summary["note"] = ("not comparable with the AlpacaEval leaderboard: "
                           + _why_not_comparable(summary, len(instructions)))
    return summary


def _why_not_comparable(summary: dict[str, Any], n_eval: int) -> str:
    reasons = []
    if summary["annotator"] != DEFAULT_ANNOTATOR:
        reasons.append(f"judge is {summary['annotator']!r}, not the leaderboard's GPT-4 Turbo")
    if summary["baseline"] != BASELINE:
        reasons.append(f"baseline is {summary['baseline']!r}")
    if summary["n"] != n_eval or summary["n_missing"]:
        reasons.append(f"{summary['n']} of {n_eval} instructions scored")
    return "; ".join(reasons)
