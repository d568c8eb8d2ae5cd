"""Paired differences between two runs judged on the same instructions: ΔWR and ΔLC with a paired
bootstrap 95% CI and a sign-flip permutation p-value.

    from sp2dpo.evaluate.paired import paired_comparison
    paired_comparison("runs/eval/global", "runs/eval/sp2dpo", EvaluateConfig())

Both runs are restricted to the instructions both judged (a preference in both). ΔWR is the mean
over them of run b's preference minus run a's, in points. ΔLC is LC(b) − LC(a), each run's GLM
refitted on the shared instructions. Resampling instructions (the bootstrap) or swapping the two
runs' results on an instruction (the permutation test) would need two GLM fits per draw; instead
each run's LC is written as a mean of per-instruction contributions, linearised around its fit
(`sp2dpo.evaluate.lc._contributions`), and the draws act on those. For WR the contributions are
the preferences themselves, so WR's bootstrap is exact.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sp2dpo import storage
from sp2dpo.evaluate.config import EvaluateConfig
from sp2dpo.evaluate.protocol import load_eval_set


def resolve_annotations(run: str) -> str:
    """An annotations.json path or URI, or a directory holding one."""
    path = run
    if storage.is_dir(path):
        path = storage.join_uri(path, "annotations.json")
    if not storage.is_file(path):
        raise FileNotFoundError(f"run {run!r}: no annotations file at {path}")
    return path


def paired_comparison(annotations_a: str, annotations_b: str, cfg: EvaluateConfig,
                      n_resamples: int = 2000, seed: int = 0) -> dict:
    """Run b minus run a on the instructions both judged.
    Returns {"n_shared": int, "a": <score dict of a>, "b": <score dict of b>,
             "win_rate": {"delta", "ci_low", "ci_high", "p_value", "within_noise"},
             "lc_win_rate": {"delta", "ci_low", "ci_high", "p_value", "within_noise"}}
    deltas in points; 95% paired bootstrap CI over shared instructions; p_value from a paired
    sign-flip (permutation) test; within_noise = CI contains 0. `lc_win_rate` holds Nones and a
    `note` when either run's LC is not estimable on the shared instructions."""
    from sp2dpo.evaluate.score import lc_inputs, read_scored_rows, summarise

    eval_rows = load_eval_set(cfg.eval_set)
    inputs = lc_inputs(eval_rows, cfg.instruction_difficulty, cfg.df_gamed, cfg.hub_files)
    runs = []
    for path in (resolve_annotations(annotations_a), resolve_annotations(annotations_b)):
        rows, missing = read_scored_rows(path, eval_rows, cfg.allow_missing)
        runs.append((rows, missing, summarise(rows, missing, inputs, cfg.glm, cfg.lc_min_instructions)))
    return paired_from_rows(runs[0], runs[1], inputs, cfg, n_resamples, seed)


def paired_from_rows(run_a: tuple, run_b: tuple, inputs: dict[str, Any], cfg: EvaluateConfig,
                     n_resamples: int = 2000, seed: int = 0) -> dict:
    """`paired_comparison` on already loaded runs: (rows, missing rows, score dict) each."""
    from sp2dpo.evaluate.annotations import preferences
    from sp2dpo.evaluate.score import fit_lc

    (rows_a, _, score_a), (rows_b, _, score_b) = run_a, run_b
    by_a = {r["instruction"]: r for r in rows_a}
    by_b = {r["instruction"]: r for r in rows_b}
    shared = sorted(set(by_a) & set(by_b), key=inputs["position"].__getitem__)
    if not shared:
        raise ValueError("the two runs share no judged instruction: "
                         "a paired comparison needs runs on the same eval set")
    sub_a, sub_b = [by_a[s] for s in shared], [by_b[s] for s in shared]
    wr = (preferences(sub_b) - preferences(sub_a)) * 100
    rng = np.random.default_rng(seed)
    out = {"n_shared": len(shared), "a": score_a, "b": score_b, "win_rate": paired_stats(wr, n_resamples, rng)}
    fits = [fit_lc(sub, [], inputs, cfg.glm, cfg.lc_min_instructions, contributions=True) for sub in (sub_a, sub_b)]
    if any(f["lc_win_rate"] is None for f in fits):
        note = "; ".join(f"{name}: {f['lc_note']}" for name, f in zip("ab", fits) if f["lc_win_rate"] is None)
        out["lc_win_rate"] = {"delta": None, "ci_low": None, "ci_high": None, "p_value": None,
                              "within_noise": None, "note": note}
    else:
        out["lc_win_rate"] = paired_stats(fits[1]["contributions"] - fits[0]["contributions"], n_resamples, rng)
    return out


def paired_stats(diff: np.ndarray, n_resamples: int, rng: np.random.Generator) -> dict[str, Any]:
    """Mean of per-instruction differences, its 95% bootstrap CI and the two-sided sign-flip p-value."""
    diff = np.asarray(diff, float)
    n = len(diff)
    delta = float(diff.mean())
    means = np.empty(n_resamples)
    flipped = np.empty(n_resamples)
    # Chunks keep the draw matrices small for large eval sets.
    for start in range(0, n_resamples, 250):
        k = min(250, n_resamples - start)
        means[start:start + k] = diff[rng.integers(0, n, size=(k, n))].mean(axis=1)
        flipped[start:start + k] = (diff * rng.choice([-1.0, 1.0], size=(k, n))).mean(axis=1)
    ci_low, ci_high = (float(v) for v in np.percentile(means, [2.5, 97.5]))
    p_value = float((1 + np.sum(np.abs(flipped) >= abs(delta) - 1e-12)) / (n_resamples + 1))
    return {"delta": delta, "ci_low": ci_low, "ci_high": ci_high, "p_value": p_value,
            "within_noise": bool(ci_low <= 0.0 <= ci_high)}
