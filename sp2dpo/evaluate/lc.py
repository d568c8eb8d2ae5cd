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
from functools import cache
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


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + e^-x) without overflow for large |x|."""
    return np.exp(-np.logaddexp(0, -x))


def length_controlled_winrate(
    pref01: np.ndarray,
    len_baseline: np.ndarray,
    len_model: np.ndarray,
    difficulty: np.ndarray,
    gamed: Any | None = None,
    glm: str = "length_controlled_v1",
    contributions: bool = False,
) -> dict[str, Any]:
    """LC win rate (percent), its standard error, and the fitted GLM weights.

    pref01: preference - 1 in [0, 1] per instruction, NaN where the judge named neither answer
    (such rows count in the length std and the prediction but not in the fit, as in alpaca_eval);
    difficulty: that instruction's difficulty; gamed: a DataFrame with `std_delta_len`,
    `instruction_difficulty`, `preference` in [0, 1] (the regularisation rows), required when the
    GLM regularises toward the baseline. With `contributions`, also each instruction's share of
    the LC win rate to first order (see `_contributions`), whose mean is the LC win rate.
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
    n_reg = 0
    sample_weight = np.ones(len(rows))
    if lam:
        if gamed is None:
            raise ValueError(f"{glm} regularises toward the baseline and needs the gamed-baseline rows")
        reg = pd.DataFrame({
            COLUMNS[0]: np.tanh(gamed["std_delta_len"].to_numpy(float)),
            COLUMNS[1]: gamed["instruction_difficulty"].to_numpy(float),
            COLUMNS[2]: 0.0,
            "preference": gamed["preference"].to_numpy(float),
        })
        n_reg = len(reg)
        # Two gamed baselines share the weight lambda, as in alpaca_eval.
        sample_weight = np.concatenate([np.full(len(reg), lam / 2), sample_weight])
        rows = pd.concat([reg, rows], ignore_index=True)
    if not use_difficulty:
        rows = rows.drop(columns=[COLUMNS[1]])
    keep = rows["preference"].notna().to_numpy()
    fit_rows = rows[keep].reset_index(drop=True)
    with warnings.catch_warnings():
        # scikit-learn >= 1.8 deprecates the `penalty` argument alpaca_eval passes; same fit.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        # k-fold CV picks the L1 strength; with fewer than k instructions (smoke runs) there is
        # nothing to cross-validate, so fit at alpaca_eval's fixed C (its n_splits=0 path).
        kwargs = dict(info["kwargs"])
        n_splits = kwargs.get("n_splits", 5)
        if len(fit_rows) - n_reg < n_splits:
            kwargs["n_splits"] = n_splits = 0
        model = fit_LogisticRegressionCV(fit_rows, "preference", is_ytrue_proba=True,
                                         sample_weight=None if not lam else sample_weight[keep], **kwargs)
    names = [c for c in rows.columns if c != "preference"]
    beta = model.coef_[0].astype(float)
    weights = dict(zip(names, (float(w) for w in beta)))
    x_test = rows.iloc[n_reg:][names].to_numpy(float).copy()
    x_test[:, names.index(COLUMNS[0])] = 0.0  # the counterfactual: no length difference
    predicted = sigmoid(x_test @ beta)
    out = {
        "lc_win_rate": float(predicted.mean() * 100),
        "lc_standard_error": (float(predicted.std(ddof=1) / np.sqrt(len(predicted)) * 100) if len(predicted) > 1
                              else float("nan")),
        "glm": glm,
        "glm_weights": weights,
        "glm_cross_validated": n_splits > 0,
    }
    if contributions:
        x = rows[names].to_numpy(float)
        y = rows["preference"].to_numpy(float)
        out["contributions"] = _contributions(x, y, sample_weight, keep, n_reg, x_test, beta) * 100
    return out


def _contributions(x: np.ndarray, y: np.ndarray, weight: np.ndarray, keep: np.ndarray, n_reg: int,
                   x_test: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """Each model row's share c_i of LC = mean_i c_i, linearised around the fit.

    Re-weighting the model's instructions by m_i (a bootstrap draw) moves the coefficients by
    H^-1 sum_i (m_i - 1) s_i to first order (s_i: row i's score, H: the Hessian of the weighted
    log-likelihood, gamed rows fixed), so LC* = mean_i m_i c_i with
    c_i = sigmoid(x0_i b) + n grad(LC) . H^-1 (s_i - mean s). Coefficients the L1 fit set to zero
    stay zero (the active set is kept). Resampling instructions then costs no refit.
    """
    p_test = sigmoid(x_test @ beta)
    n = len(x_test)
    active = np.abs(beta) > 0
    if not active.any():
        return p_test
    xa = x[:, active]
    p = sigmoid(x @ beta)
    ok = keep.astype(float)
    hessian = (xa * (weight * ok * p * (1 - p))[:, None]).T @ xa
    score = xa * (weight * ok * np.nan_to_num(y - p))[:, None]
    score = score[n_reg:]
    grad = ((p_test * (1 - p_test))[:, None] * x_test[:, active]).mean(axis=0)
    direction = np.linalg.solve(hessian, grad)
    return p_test + n * (score - score.mean(axis=0)) @ direction


HUB_REPO = "tatsu-lab/alpaca_eval"  # alpaca_eval's own hf_hub_download: this repo, repo_type "dataset"


def hub_file(filename: str) -> str | None:
    """Local path of AlpacaEval's `filename` (df_gamed.csv, instruction_difficulty.csv) through
    huggingface_hub, or None when it cannot be had. The hub cache (HF_HOME / HF_HUB_CACHE) is
    looked in first; a download is tried only when HF_HUB_OFFLINE is unset and the hub endpoint
    answers a 2-second connection (so an offline machine does not wait through the client's
    retries)."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(HUB_REPO, filename, repo_type="dataset")
    if isinstance(cached, str):
        return cached
    if constants.HF_HUB_OFFLINE or not _hub_reachable(constants.ENDPOINT):
        return None
    try:
        return hf_hub_download(HUB_REPO, filename, repo_type="dataset")
    except Exception:  # noqa: BLE001 - any hub failure means: use the offline estimate
        return None


@cache
def _hub_reachable(endpoint: str) -> bool:
    import socket
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=2).close()
        return True
    except OSError:
        return False


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


def read_df_gamed(path: str | Path) -> Any:
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


def difficulty_from_df_gamed(df_gamed: Any, n: int) -> np.ndarray:
    """The difficulty column of df_gamed, per eval-set position (what alpaca_eval does with it)."""
    first = df_gamed.drop_duplicates("index").set_index("index")["instruction_difficulty"]
    if set(first.index) != set(range(n)):
        raise ValueError(f"df_gamed must cover eval positions 0..{n - 1}")
    return first.sort_index().to_numpy(float)
