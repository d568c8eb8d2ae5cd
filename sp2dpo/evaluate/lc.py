"""Length-controlled win rate: AlpacaEval's GLM (alpaca_eval/metrics/glm_winrate.py), offline.

For each instruction i the GLM models the judge's preference for the model over the baseline as

    logit p_i = theta * 1[not gamed baseline] + phi * tanh(std_delta_len_i) + psi * difficulty_i

where std_delta_len is (len(baseline output) - len(model output)) / its std over this file. It is
fitted with alpaca_eval's own `fit_LogisticRegressionCV` (L1, liblinear, no intercept, 5-fold
GroupKFold CV over C, soft labels). For `length_controlled_v1` the model's rows are joined by the
rows of two length-gamed versions of the baseline (verbose, concise) at weight lambda/2 each:
having no `theta`, they pull phi and psi toward what pure length changes of the baseline show
(the "regularisation toward the baseline"). The LC win rate is the mean counterfactual
prediction with no length difference: mean_i sigmoid(theta + psi * difficulty_i).

AlpacaEval downloads the per-instruction difficulty and the gamed rows (`df_gamed.csv`) from the
hub. Pass the official files when you have them; otherwise `sp2dpo.evaluate.difficulty`
supplies an offline estimate of both (see docs/evaluate.md for how it is made and its error).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np

COLUMNS = ("np.tanh(std_delta_len)", "instruction_difficulty", "not_gamed_baseline.astype(float)")
GLMS = ("length_controlled_v1", "length_controlled_noreg", "length_controlled_minimal")


def glm_info(glm: str) -> dict[str, Any]:
    """alpaca_eval's definition of the named GLM (formula, lambda, CV folds)."""
    from alpaca_eval.metrics.glm_winrate import GLM_INFO

    if glm not in GLM_INFO:
        raise ValueError(f"unknown GLM {glm!r}; choose one of {sorted(GLM_INFO)}")
    return GLM_INFO[glm]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0, -x))


def length_controlled_winrate(
    pref01: np.ndarray,
    len_baseline: np.ndarray,
    len_model: np.ndarray,
    difficulty: np.ndarray,
    gamed: "Any | None" = None,
    glm: str = "length_controlled_v1",
) -> dict[str, Any]:
    """LC win rate (percent), its standard error, and the fitted GLM weights.

    pref01: preference - 1 in [0, 1] per instruction; difficulty: that instruction's difficulty;
    gamed: a DataFrame with `std_delta_len`, `instruction_difficulty`, `preference` in [0, 1]
    (the regularisation rows), required when the GLM regularises toward the baseline.
    """
    import pandas as pd
    from alpaca_eval.metrics.glm_winrate import fit_LogisticRegressionCV

    info = glm_info(glm)
    use_difficulty = "instruction_difficulty" in info["formula"]
    lam = info["regularize_to_baseline_lambda"]
    delta = np.asarray(len_baseline, float) - np.asarray(len_model, float)
    std = delta.std(ddof=1) if len(delta) > 1 else 0.0
    # All outputs exactly as long as the baseline's: no length signal to control for.
    std_delta_len = delta / std if std > 0 else np.zeros_like(delta)
    rows = pd.DataFrame({
        COLUMNS[0]: np.tanh(std_delta_len),
        COLUMNS[1]: np.asarray(difficulty, float),
        COLUMNS[2]: 1.0,
        "preference": np.asarray(pref01, float),
    })
    sample_weight = None
    if lam:
        if gamed is None:
            raise ValueError(f"{glm} regularises toward the baseline and needs the gamed-baseline rows")
        reg = pd.DataFrame({
            COLUMNS[0]: np.tanh(gamed["std_delta_len"].to_numpy(float)),
            COLUMNS[1]: gamed["instruction_difficulty"].to_numpy(float),
            COLUMNS[2]: 0.0,
            "preference": gamed["preference"].to_numpy(float),
        })
        # Two gamed baselines share the weight lambda, as in alpaca_eval.
        sample_weight = np.concatenate([np.full(len(reg), lam / 2), np.ones(len(rows))])
        rows = pd.concat([reg, rows], ignore_index=True)
    if not use_difficulty:
        rows = rows.drop(columns=[COLUMNS[1]])
    keep = rows["preference"].notna().to_numpy()
    rows = rows[keep].reset_index(drop=True)
    if sample_weight is not None:
        sample_weight = sample_weight[keep]
    with warnings.catch_warnings():
        # scikit-learn >= 1.8 deprecates the `penalty` argument alpaca_eval passes; same fit.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        # k-fold CV picks the L1 strength; with fewer than k instructions (smoke runs) there is
        # nothing to cross-validate, so fit at alpaca_eval's fixed C (its n_splits=0 path).
        kwargs = dict(info["kwargs"])
        n_splits = kwargs.get("n_splits", 5)
        if len(rows) < n_splits:
            kwargs["n_splits"] = n_splits = 0
        model = fit_LogisticRegressionCV(rows, "preference", is_ytrue_proba=True, sample_weight=sample_weight, **kwargs)
    names = [c for c in rows.columns if c != "preference"]
    weights = dict(zip(names, (float(w) for w in model.coef_[0])))
    logit = weights[COLUMNS[2]] + (weights.get(COLUMNS[1], 0.0) * np.asarray(difficulty, float))
    predicted = _sigmoid(np.broadcast_to(logit, (len(pref01),)))
    return {
        "lc_win_rate": float(predicted.mean() * 100),
        "lc_standard_error": float(predicted.std(ddof=1) / np.sqrt(len(predicted)) * 100) if len(predicted) > 1 else float("nan"),
        "glm": glm,
        "glm_weights": weights,
        "glm_cross_validated": n_splits > 0,
    }


def _read_csv_text(path: str | Path, what: str) -> str:
    from sp2dpo import storage

    if not storage.is_file(str(path)):
        raise FileNotFoundError(f"{what} not found: {path}")
    return storage.read_text(str(path))


def read_instruction_difficulty(path: str | Path, eval_instructions: list[str]) -> np.ndarray:
    """Difficulty per eval-set position from a CSV: AlpacaEval's `instruction_difficulty.csv`
    (index column = position in the eval set), or one with `instruction` and
    `instruction_difficulty` columns."""
    import pandas as pd

    text = _read_csv_text(path, "instruction difficulty file")
    df = pd.read_csv(io.StringIO(text))
    if {"instruction", "instruction_difficulty"} <= set(df.columns):
        by_text = dict(zip(df["instruction"], df["instruction_difficulty"]))
        missing = [s for s in eval_instructions if s not in by_text]
        if missing:
            raise ValueError(f"{path}: no difficulty for {len(missing)} eval instruction(s), e.g. {missing[0][:60]!r}")
        values = np.array([by_text[s] for s in eval_instructions], float)
    else:
        series = pd.read_csv(io.StringIO(text), index_col=0).squeeze("columns")
        if not isinstance(series, pd.Series) or len(series) != len(eval_instructions):
            raise ValueError(f"{path}: expected one difficulty column with {len(eval_instructions)} rows "
                             f"(one per eval instruction, indexed by position)")
        values = series.sort_index().to_numpy(float)
    if not np.isfinite(values).all():
        raise ValueError(f"{path}: instruction difficulty has NaN or infinite values")
    return values


def read_df_gamed(path: str | Path) -> "Any":
    """AlpacaEval's `df_gamed.csv` (annotations of the verbose/concise baselines against the
    baseline, with their features). Preferences given in [1, 2] are moved to [0, 1]."""
    import pandas as pd

    df = pd.read_csv(io.StringIO(_read_csv_text(path, "df_gamed file")))
    need = {"index", "preference", "std_delta_len", "instruction_difficulty"}
    if not need <= set(df.columns):
        raise ValueError(f"{path}: a df_gamed file needs the columns {sorted(need)}, got {sorted(df.columns)}")
    df = df.copy()
    pref = df["preference"].astype(float)
    if pref.max() > 1.0:
        pref = pref.replace({0.0: 1.5}) - 1.0
    df["preference"] = pref
    return df


def difficulty_from_df_gamed(df_gamed: "Any", n: int) -> np.ndarray:
    """The difficulty column of df_gamed, per eval-set position (what alpaca_eval does with it)."""
    first = df_gamed.drop_duplicates("index").set_index("index")["instruction_difficulty"]
    if set(first.index) != set(range(n)):
        raise ValueError(f"df_gamed must cover eval positions 0..{n - 1}")
    return first.sort_index().to_numpy(float)
