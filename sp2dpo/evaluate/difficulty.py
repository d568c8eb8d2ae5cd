"""Offline stand-ins for AlpacaEval's hub-only LC inputs: instruction difficulty and df_gamed.

    python -m sp2dpo.evaluate.difficulty tests/data/alpaca_eval/*.annotations.json.gz \
        --out sp2dpo/evaluate/data/instruction_difficulty_estimate.csv

Instruction difficulty (one number per eval instruction) is estimated in two steps:

1. Its distribution, from the leaderboard. For every leaderboard model the official GLM weights
   (theta_m, psi_m) and LC win rate are public, and LC_m = mean_i sigmoid(theta_m + psi_m d_i).
   ~200 such equations pin down the distribution of d: we fit a smooth histogram on a grid
   (non-negative least squares with a curvature penalty). It reproduces every leaderboard LC from
   the official weights to within 0.2 points.
2. Which instruction gets which value, from the per-instruction annotations we have. Under each
   annotated model's official weights (phi_m, psi_m, theta_m) and its own length features, every
   grid value of d_i has a likelihood for that model's judged preference on instruction i; the
   posterior mean under the step-1 prior ranks the instructions, and the ranks are mapped onto
   the step-1 distribution (so the marginal stays the one the leaderboard implies).

df_gamed (the verbose and concise baselines judged against the baseline) is synthesised from the
official GLM weights of `gpt4_1106_preview_verbose` / `_concise` and their leaderboard average
lengths: each gamed output is taken to be the reference output scaled to that average length,
and its preference is the gamed model's own GLM prediction on that instruction.
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import numpy as np

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


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0, -x))


def leaderboard_prior(exclude: Iterable[str] = ()) -> tuple[np.ndarray, float]:
    """Distribution of difficulty on GRID implied by the leaderboard; returns (probabilities, max
    LC error in points when predicting every leaderboard model from its official weights)."""
    from scipy.optimize import nnls

    j = official_leaderboard().join(official_weights(), how="inner")
    j = j[~j.index.isin([BASELINE, *exclude])]
    a = _sigmoid(j["theta"].to_numpy()[:, None] + j["psi"].to_numpy()[:, None] * GRID[None, :])
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
    pred = _sigmoid(j["theta"].to_numpy()[:, None] + j["psi"].to_numpy()[:, None] * np.asarray(difficulty_values)[None, :])
    out = j[["length_controlled_winrate"]].copy()
    out["predicted"] = pred.mean(axis=1) * 100
    return out


def model_features(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(preference in [0, 1], tanh(std_delta_len)) of one model's annotations, as in the GLM."""
    pref = np.array([float(r["preference"]) for r in rows])
    pref = np.where(pref == 0.0, 1.5, pref) - 1.0
    delta = np.array([len(r["output_1"]) - len(r["output_2"]) for r in rows], float)
    return pref, np.tanh(delta / delta.std(ddof=1))


def estimate_difficulty(annotations: dict[str, list[dict]], eval_instructions: list[str],
                        exclude_from_prior: Iterable[str] = ()) -> np.ndarray:
    """Difficulty per eval instruction from annotated leaderboard models (name → annotation rows)."""
    weights = official_weights()
    pi, _ = leaderboard_prior(exclude_from_prior)
    position = {s: i for i, s in enumerate(eval_instructions)}
    log_lik = np.zeros((len(eval_instructions), len(GRID)))
    for name, rows in annotations.items():
        if name not in weights.index:
            raise ValueError(f"{name!r} has no official GLM weights; only leaderboard models can inform the estimate")
        w = weights.loc[name]
        pref, tanh_len = model_features(rows)
        ok = ~np.isnan(pref)
        logit = w["theta"] + w["phi"] * tanh_len[ok, None] + w["psi"] * GRID[None, :]
        ll = pref[ok, None] * np.log(_sigmoid(logit)) + (1 - pref[ok, None]) * np.log(_sigmoid(-logit))
        idx = np.array([position[r["instruction"]] for r, keep in zip(rows, ok) if keep])
        np.add.at(log_lik, idx, ll)
    log_post = log_lik + np.log(pi + 1e-300)
    log_post -= log_post.max(axis=1, keepdims=True)
    post = np.exp(log_post)
    post /= post.sum(axis=1, keepdims=True)
    posterior_mean = post @ GRID
    ranks = (np.argsort(np.argsort(posterior_mean, kind="stable"), kind="stable") + 0.5) / len(posterior_mean)
    # Grid point k holds the probability mass around it: its mid-mass rank is cdf_k - pi_k / 2.
    return np.interp(ranks, np.cumsum(pi) - pi / 2, GRID)


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
        pref = _sigmoid(w["theta"] + w["phi"] * np.tanh(std_delta_len) + w["psi"] * difficulty_values)
        parts.append(pd.DataFrame({"index": np.arange(len(ref)), "model": name, "std_delta_len": std_delta_len,
                                   "instruction_difficulty": difficulty_values, "preference": pref}))
    return pd.concat(parts, ignore_index=True)


def packaged_estimate(eval_instructions: list[str]) -> np.ndarray:
    """The shipped estimate (made from the three annotated models in tests/data/alpaca_eval)."""
    from sp2dpo.evaluate.lc import read_instruction_difficulty

    return read_instruction_difficulty(data_path(ESTIMATE_FILE), eval_instructions)


def main() -> None:
    import pandas as pd

    from sp2dpo.evaluate.protocol import load_eval_set, read_json_list

    parser = argparse.ArgumentParser(description="Estimate AlpacaEval instruction difficulty offline.")
    parser.add_argument("annotations", nargs="+", help="annotations.json(.gz) of leaderboard models (GPT-4 Turbo judge)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    instructions = [r["instruction"] for r in load_eval_set()]
    annotations: dict[str, list[dict]] = {}
    for path in args.annotations:
        rows = read_json_list(path, "annotations file")
        annotations[rows[0]["generator_2"]] = rows
    values = estimate_difficulty(annotations, instructions)
    pd.DataFrame({"instruction_difficulty": values}).to_csv(args.out, float_format="%.6f")
    print(f"wrote {args.out}: {len(values)} instructions from {sorted(annotations)}")


if __name__ == "__main__":
    main()
