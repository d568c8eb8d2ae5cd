"""Offline stand-ins for AlpacaEval's hub-only LC inputs: instruction difficulty and df_gamed.

    python -m sp2dpo.evaluate.difficulty ../shared/data/alpaca_eval/results \
        --out sp2dpo/evaluate/data/instruction_difficulty_estimate.csv

Instruction difficulty d_i (one number per eval instruction) is what AlpacaEval's joint GLM over
many leaderboard models calls the per-instruction term: logit P(model m beats the reference on
i) = theta_m + phi_m tanh(std_delta_len_mi) + psi_m d_i. We estimate it from the official
annotations of leaderboard models in three steps, on the official scale:

1. A prior, from the leaderboard. For every leaderboard model the official GLM weights
   (theta_m, psi_m) and LC win rate are public, and LC_m = mean_i sigmoid(theta_m + psi_m d_i).
   ~200 such equations pin down the distribution of d: a smooth histogram on a grid (non-negative
   least squares with a curvature penalty).
2. Each instruction's posterior mean. Under each annotated model's official weights and its own
   length features, every grid value of d_i has a likelihood for that model's judged (soft)
   preference on instruction i; the product over models times the prior gives d_i's posterior,
   and its mean is the estimate (the regression-calibration choice: noisy values shrunk toward
   the prior, so a GLM fitted on them is not attenuated).
3. An affine calibration a d + b that best reproduces the leaderboard's LC of every leaderboard
   model from its official weights (shrinkage narrows the spread a little; this restores the scale
   the official weights were fitted at).

A model whose score is being validated is left out of every step (its annotations, its weights
and its leaderboard row): `estimate_difficulty(..., exclude=[name])` is what a new model gets.

df_gamed (the verbose and concise baselines judged against the baseline) is synthesised from the
official GLM weights of `gpt4_1106_preview_verbose` / `_concise` and their leaderboard average
lengths: each gamed output is taken to be the reference output scaled to that average length,
and its preference is the gamed model's own GLM prediction on that instruction.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from sp2dpo.evaluate.lc import sigmoid
from sp2dpo.evaluate.protocol import BASELINE

ESTIMATE_FILE = "instruction_difficulty_estimate.csv"
WEIGHTS_FILE = "glm_weights_length_controlled_v1_baseline_gpt4_1106_preview.csv"
LEADERBOARD_FILE = "leaderboard_weighted_alpaca_eval_gpt4_turbo.csv"
GAMED = ("gpt4_1106_preview_verbose", "gpt4_1106_preview_concise")
GRID = np.linspace(-6.0, 6.0, 241)
SMOOTHNESS = 0.3


def data_path(name: str) -> Path:
    return Path(str(resources.files("sp2dpo.evaluate") / "data" / name))


def official_weights() -> Any:
    """Official per-model GLM coefficients (length_controlled_v1, baseline gpt4_1106_preview)."""
    import pandas as pd

    w = pd.read_csv(data_path(WEIGHTS_FILE), index_col=0)
    return w.rename(columns={"np.tanh(std_delta_len)": "phi", "instruction_difficulty": "psi",
                             "not_gamed_baseline.astype(float)": "theta"})


def official_leaderboard() -> Any:
    import pandas as pd

    return pd.read_csv(data_path(LEADERBOARD_FILE), index_col=0)


def leaderboard_prior(exclude: Iterable[str] = ()) -> tuple[np.ndarray, float]:
    """Distribution of difficulty on GRID implied by the leaderboard; returns (probabilities, max
    LC error in points when predicting every leaderboard model from its official weights)."""
    from scipy.optimize import nnls

    j = official_leaderboard().join(official_weights(), how="inner")
    j = j[~j.index.isin([BASELINE, *exclude])]
    a = sigmoid(j["theta"].to_numpy()[:, None] + j["psi"].to_numpy()[:, None] * GRID[None, :])
    b = j["length_controlled_winrate"].to_numpy() / 100
    curvature = np.diff(np.eye(len(GRID)), 2, axis=0)
    # A heavily weighted row makes the probabilities sum to one inside plain NNLS.
    big = 100.0
    lhs = np.vstack([a, SMOOTHNESS * curvature, big * np.ones(len(GRID))])
    rhs = np.concatenate([b, np.zeros(len(curvature)), [big]])
    pi, _ = nnls(lhs, rhs, maxiter=10_000)
    pi = pi / pi.sum()
    return pi, float(np.abs(a @ pi - b).max() * 100)


def lc_from_official_weights(difficulty_values: np.ndarray) -> Any:
    """LC win rate every leaderboard model would get from its official weights and these values."""
    j = official_leaderboard().join(official_weights(), how="inner")
    difficulty = np.asarray(difficulty_values)[None, :]
    pred = sigmoid(j["theta"].to_numpy()[:, None] + j["psi"].to_numpy()[:, None] * difficulty)
    out = j[["length_controlled_winrate"]].copy()
    out["predicted"] = pred.mean(axis=1) * 100
    return out


def model_features(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(preference in [0, 1], tanh(std_delta_len)) of one model's annotations, as in the GLM."""
    pref = np.array([np.nan if r["preference"] is None else float(r["preference"]) for r in rows])
    pref = np.where(pref == 0.0, 1.5, pref) - 1.0
    delta = np.array([len(r["output_1"]) - len(r["output_2"]) for r in rows], float)
    return pref, np.tanh(delta / delta.std(ddof=1))


def usable_models(annotations: dict[str, list[dict]]) -> list[str]:
    """The annotated models that can inform the estimate: those with official GLM weights."""
    weights = official_weights()
    return [m for m in annotations if m in weights.index and m != BASELINE]


def posterior_mean(annotations: dict[str, list[dict]], eval_instructions: list[str],
                   exclude: Iterable[str] = ()) -> np.ndarray:
    """Step 2: each instruction's posterior-mean difficulty under the step-1 prior."""
    exclude = set(exclude)
    weights = official_weights()
    pi, _ = leaderboard_prior(exclude)
    position = {s: i for i, s in enumerate(eval_instructions)}
    log_lik = np.zeros((len(eval_instructions), len(GRID)))
    for name in usable_models(annotations):
        if name in exclude:
            continue
        w, rows = weights.loc[name], annotations[name]
        pref, tanh_len = model_features(rows)
        ok = ~np.isnan(pref)
        logit = w["theta"] + w["phi"] * tanh_len[ok, None] + w["psi"] * GRID[None, :]
        ll = pref[ok, None] * np.log(sigmoid(logit)) + (1 - pref[ok, None]) * np.log(sigmoid(-logit))
        idx = np.array([position[r["instruction"]] for r, keep in zip(rows, ok) if keep])
        np.add.at(log_lik, idx, ll)
    log_post = log_lik + np.log(pi + 1e-300)
    log_post -= log_post.max(axis=1, keepdims=True)
    post = np.exp(log_post)
    post /= post.sum(axis=1, keepdims=True)
    return post @ GRID


def calibrate(values: np.ndarray, exclude: Iterable[str] = ()) -> tuple[np.ndarray, float]:
    """Step 3: a d + b fitted so that the official weights reproduce the leaderboard's LC of
    every leaderboard model not excluded; returns (calibrated values, max LC error in points)."""
    from scipy.optimize import least_squares

    j = official_leaderboard().join(official_weights(), how="inner")
    j = j[~j.index.isin([BASELINE, *exclude])]
    theta, psi = j["theta"].to_numpy()[:, None], j["psi"].to_numpy()[:, None]
    target = j["length_controlled_winrate"].to_numpy()

    def residual(ab: np.ndarray) -> np.ndarray:
        return sigmoid(theta + psi * (ab[0] * values[None, :] + ab[1])).mean(axis=1) * 100 - target

    fit = least_squares(residual, [1.0, 0.0])
    return fit.x[0] * values + fit.x[1], float(np.abs(fit.fun).max())


def estimate_difficulty(annotations: dict[str, list[dict]], eval_instructions: list[str],
                        exclude: Iterable[str] = ()) -> np.ndarray:
    """Difficulty per eval instruction from annotated leaderboard models (name → annotation rows),
    without the models in `exclude` (their annotations, weights and leaderboard rows)."""
    exclude = list(exclude)
    if not [m for m in usable_models(annotations) if m not in exclude]:
        raise ValueError("no annotated leaderboard model with official GLM weights to estimate difficulty from")
    values, _ = calibrate(posterior_mean(annotations, eval_instructions, exclude), exclude)
    return values


def read_model_annotations(paths: Iterable[str | Path]) -> dict[str, list[dict]]:
    """Annotation files (or directories searched for `annotations.json(.gz)`), keyed by generator."""
    from sp2dpo.evaluate.protocol import read_json_list

    files: list[Path] = []
    for path in map(Path, paths):
        files += sorted(path.rglob("annotations.json*")) if path.is_dir() else [path]
    out: dict[str, list[dict]] = {}
    for f in files:
        rows = read_json_list(f, "annotations file")
        names = {r["generator_2"] for r in rows}
        if len(names) != 1:
            raise ValueError(f"{f}: several generator_2 values {sorted(names)[:3]}")
        out[names.pop()] = rows
    return out


def synthetic_gamed(difficulty_values: np.ndarray, reference_lengths: np.ndarray) -> Any:
    """Stand-in for df_gamed: the two length-gamed baselines' rows, one per eval instruction each."""
    import pandas as pd

    weights, board = official_weights(), official_leaderboard()
    ref = np.asarray(reference_lengths, float)
    parts = []
    for name in GAMED:
        gamed_len = ref * board.loc[name, "avg_length"] / ref.mean()
        delta = ref - gamed_len
        std_delta_len = delta / delta.std(ddof=1)
        w = weights.loc[name]
        pref = sigmoid(w["theta"] + w["phi"] * np.tanh(std_delta_len) + w["psi"] * difficulty_values)
        parts.append(pd.DataFrame({"index": np.arange(len(ref)), "model": name, "std_delta_len": std_delta_len,
                                   "instruction_difficulty": difficulty_values, "preference": pref}))
    return pd.concat(parts, ignore_index=True)


def packaged_estimate(eval_instructions: list[str]) -> np.ndarray:
    """The shipped estimate (made from every annotated leaderboard model, see data/NOTICE)."""
    from sp2dpo.evaluate.lc import read_instruction_difficulty

    return read_instruction_difficulty(data_path(ESTIMATE_FILE), eval_instructions)


def main() -> None:
    import pandas as pd

    from sp2dpo.evaluate.protocol import load_eval_set

    parser = argparse.ArgumentParser(description="Estimate AlpacaEval instruction difficulty offline.")
    parser.add_argument("annotations", nargs="+",
                        help="annotations.json(.gz) files of leaderboard models (GPT-4 Turbo judge), "
                             "or directories holding them")
    parser.add_argument("--exclude", nargs="*", default=[],
                        help="models to leave out (annotations, weights, leaderboard row)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    instructions = [r["instruction"] for r in load_eval_set()]
    annotations = read_model_annotations(args.annotations)
    values = estimate_difficulty(annotations, instructions, exclude=args.exclude)
    pd.DataFrame({"instruction_difficulty": values}).rename_axis("index").to_csv(args.out, float_format="%.6f")
    used = [m for m in usable_models(annotations) if m not in args.exclude]
    skipped = sorted(set(annotations) - set(used))
    print(f"wrote {args.out}: {len(values)} instructions from {len(used)} models {used}"
          + (f"; skipped (no official weights or excluded): {skipped}" if skipped else ""))


if __name__ == "__main__":
    main()
