"""Score an annotations.json: win rate, its standard error, discrete win rate, average length and
the length-controlled win rate.

    sp2dpo evaluate score runs/eval/annotations.json --json
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sp2dpo.evaluate.annotations import load_annotations, preferences, winrate_metrics
from sp2dpo.evaluate.protocol import BASELINE, DEFAULT_ANNOTATOR, load_eval_set, read_json_list

LC_MIN_INSTRUCTIONS = 50


def score_annotations(
    path: str | Path,
    glm: str = "length_controlled_v1",
    instruction_difficulty: str | None = None,
    df_gamed: str | None = None,
    allow_missing: bool = False,
    eval_set: str = "alpaca-eval",
    hub_files: bool = True,
    lc_min_instructions: int = LC_MIN_INSTRUCTIONS,
) -> dict[str, Any]:
    eval_rows = load_eval_set(eval_set)
    rows, missing = read_scored_rows(path, eval_rows, allow_missing)
    inputs = lc_inputs(eval_rows, instruction_difficulty, df_gamed, hub_files)
    return summarise(rows, missing, inputs, glm, lc_min_instructions)


def read_scored_rows(path: str | Path, eval_rows: list[dict], allow_missing: bool) -> tuple[list[dict], list[dict]]:
    """(rows with a preference, rows without one) of a validated annotations file."""
    rows, n_missing = load_annotations(path, [r["instruction"] for r in eval_rows], allow_missing=allow_missing)
    missing: list[dict] = []
    if n_missing:
        have = {r["instruction"] for r in rows}
        missing = [r for r in read_json_list(path, "annotations file") if r["instruction"] not in have]
    return rows, missing


def lc_inputs(eval_rows: list[dict], instruction_difficulty: str | None = None, df_gamed: str | None = None,
              hub_files: bool = True) -> dict[str, Any]:
    """Instruction difficulty per eval position and the gamed-baseline rows, with their sources.

    In order: the files given; else AlpacaEval's own df_gamed.csv / instruction_difficulty.csv from
    the Hugging Face hub (cache first, see `lc.hub_file`); else the shipped offline estimate.
    """
    from sp2dpo.evaluate import difficulty as offline
    from sp2dpo.evaluate import lc

    instructions = [r["instruction"] for r in eval_rows]
    gamed, gamed_source = None, None
    if df_gamed:
        gamed, gamed_source = lc.read_df_gamed(df_gamed), f"file {df_gamed}"
    elif hub_files and not instruction_difficulty:
        hub = lc.hub_file("df_gamed.csv")
        if hub:
            gamed, gamed_source = lc.read_df_gamed(hub), f"hub {lc.HUB_REPO}/df_gamed.csv ({hub})"
    if instruction_difficulty:
        values = lc.read_instruction_difficulty(instruction_difficulty, instructions)
        source = f"file {instruction_difficulty}"
    elif gamed is not None:
        values = lc.difficulty_from_df_gamed(gamed, len(instructions))
        source = gamed_source if gamed_source.startswith("hub") else f"df_gamed {df_gamed}"
    else:
        hub = lc.hub_file("instruction_difficulty.csv") if hub_files else None
        if hub:
            values = lc.read_instruction_difficulty(hub, instructions)
            source = f"hub {lc.HUB_REPO}/instruction_difficulty.csv ({hub})"
        else:
            values = offline.packaged_estimate(instructions)
            source = f"offline estimate ({offline.ESTIMATE_FILE}, docs/evaluate.md)"
    if gamed is None:
        gamed = offline.synthetic_gamed(values, np.array([len(r["output"]) for r in eval_rows], float))
        gamed_source = "synthetic (official gamed-baseline GLM weights)"
    return {"position": {s: i for i, s in enumerate(instructions)}, "n_eval": len(instructions),
            "difficulty": values, "difficulty_source": source, "gamed": gamed, "df_gamed_source": gamed_source}


def fit_lc(rows: list[dict], missing: list[dict], inputs: dict[str, Any], glm: str,
           lc_min_instructions: int, contributions: bool = False) -> dict[str, Any]:
    """LC win rate of these rows, or `lc_win_rate: None` with `lc_note` saying why it is not
    estimable. Rows without a preference count in the length std and the prediction, as in
    alpaca_eval."""
    from sp2dpo.evaluate import lc

    generator, baseline = rows[0]["generator_2"], rows[0]["generator_1"]
    if generator == baseline:
        out = {"lc_win_rate": 50.0, "lc_standard_error": 0.0, "glm": glm, "glm_weights": {},
               "lc_note": "the baseline against itself: 50 by construction"}
        if contributions:
            out["contributions"] = np.full(len(rows) + len(missing), 50.0)
        return out
    if len(rows) < lc_min_instructions:
        return {"lc_win_rate": None, "lc_standard_error": None, "glm": glm, "glm_weights": {},
                "lc_note": f"not estimated: {len(rows)} judged instructions, fewer than lc_min_instructions="
                           f"{lc_min_instructions}; the length-controlled GLM cannot be fitted meaningfully "
                           "at this size"}
    every = rows + missing
    idx = np.array([inputs["position"][r["instruction"]] for r in every])
    pref = np.concatenate([preferences(rows) - 1.0, np.full(len(missing), np.nan)])
    out = lc.length_controlled_winrate(
        pref01=pref,
        len_baseline=np.array([len(r["output_1"]) for r in every], float),
        len_model=np.array([len(r["output_2"]) for r in every], float),
        difficulty=inputs["difficulty"][idx],
        gamed=inputs["gamed"],
        glm=glm,
        contributions=contributions,
    )
    if not any(out["glm_weights"].values()):
        return {**out, "lc_win_rate": None, "lc_standard_error": None,
                "lc_note": f"not estimated: the L1 fit set every GLM weight to zero on these {len(rows)} instructions "
                           "(no signal), which would read as a constant 50"}
    return out


def summarise(rows: list[dict], missing: list[dict], inputs: dict[str, Any], glm: str = "length_controlled_v1",
              lc_min_instructions: int = LC_MIN_INSTRUCTIONS) -> dict[str, Any]:
    from sp2dpo.evaluate import lc

    summary: dict[str, Any] = {"generator": rows[0]["generator_2"], "baseline": rows[0]["generator_1"]}
    summary.update(winrate_metrics(rows))
    summary["n_missing"] = len(missing)
    summary.update(fit_lc(rows, missing, inputs, glm, lc_min_instructions))
    summary.setdefault("lc_note", None)
    annotators = sorted({str(r.get("annotator", "")) for r in rows})
    summary["annotator"] = annotators[0] if len(annotators) == 1 else annotators
    summary["difficulty_source"] = inputs["difficulty_source"]
    regularised = lc.glm_info(glm)["regularize_to_baseline_lambda"]
    summary["df_gamed_source"] = inputs["df_gamed_source"] if regularised else None
    # The leaderboard's numbers come from its own judge against its own baseline, on all 805.
    n_eval = inputs["n_eval"]
    summary["comparable_with_leaderboard"] = bool(
        summary["annotator"] == DEFAULT_ANNOTATOR and summary["baseline"] == BASELINE
        and summary["n"] == n_eval and not missing)
    if not summary["comparable_with_leaderboard"]:
        summary["note"] = "not comparable with the AlpacaEval leaderboard: " + _why_not_comparable(summary, n_eval)
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

