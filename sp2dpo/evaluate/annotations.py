"""Annotation files in AlpacaEval's format: loading, validation, and the raw win-rate metrics.

An annotation row compares the baseline's `output_1` with the model's `output_2` on one
instruction; `preference` is in [1, 2] (2 = the model wins, 1.5 = a draw; the legacy draw code 0
is read as 1.5). Validation refuses what would silently bias a score: a missing or NaN
preference, a preference outside [1, 2], an instruction repeated or absent from the eval set,
several models or baselines mixed in one file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from sp2dpo.evaluate.protocol import read_json_list

REQUIRED = ("instruction", "output_1", "output_2", "preference", "generator_1", "generator_2")


def _where(indices: list[int]) -> str:
    shown = ", ".join(str(i) for i in indices[:5])
    return f"{len(indices)} row(s) (items {shown}{', ...' if len(indices) > 5 else ''})"


def load_annotations(path: str | Path, eval_instructions: list[str] | None = None,
                     allow_missing: bool = False) -> tuple[list[dict], int]:
    """Read and validate an annotations.json; returns (usable rows, number of missing preferences).

    With `allow_missing`, rows whose preference is missing or NaN (the judge named neither
    answer) are left out and counted; otherwise they are an error.
    """
    rows = read_json_list(path, "annotations file")
    if not rows:
        raise ValueError(f"{path}: no annotations")
    problems: list[str] = []
    bad = [i for i, r in enumerate(rows) if not isinstance(r, dict)]
    if bad:
        raise ValueError(f"{path}: {_where(bad)} are not JSON objects")
    for key in REQUIRED:
        if key == "preference":
            continue
        missing = [i for i, r in enumerate(rows) if not isinstance(r.get(key), str)]
        if missing:
            problems.append(f"{_where(missing)} have no {key!r} string")
    nan_rows = [i for i, r in enumerate(rows) if _missing_preference(r.get("preference"))]
    wrong_type = [i for i, r in enumerate(rows) if i not in set(nan_rows) and not _is_number(r.get("preference"))]
    if wrong_type:
        problems.append(f"{_where(wrong_type)} have a non-numeric preference")
    out_of_range = [i for i, r in enumerate(rows)
                    if _is_number(r.get("preference")) and not _missing_preference(r["preference"])
                    and not (1.0 <= float(r["preference"]) <= 2.0 or float(r["preference"]) == 0.0)]
    if out_of_range:
        problems.append(f"{_where(out_of_range)} have a preference outside [1, 2]")
    if nan_rows and not allow_missing:
        problems.append(f"{_where(nan_rows)} have a missing or NaN preference (the judge named neither answer); "
                        "re-judge them, or pass --allow-missing to score without them")
    if problems:
        raise ValueError(f"{path}: refusing to score: " + "; ".join(problems))

    seen: dict[str, int] = {}
    dupes = []
    for i, r in enumerate(rows):
        if r["instruction"] in seen:
            dupes.append(i)
        seen.setdefault(r["instruction"], i)
    if dupes:
        raise ValueError(f"{path}: refusing to score: {_where(dupes)} repeat an earlier instruction")
    if eval_instructions is not None:
        known = set(eval_instructions)
        unknown = [i for i, r in enumerate(rows) if r["instruction"] not in known]
        if unknown:
            raise ValueError(f"{path}: refusing to score: {_where(unknown)} have an instruction that is not in the "
                             "AlpacaEval eval set (mismatched instructions: were the outputs made from another set?)")
    for key in ("generator_1", "generator_2"):
        names = sorted({r[key] for r in rows})
        if len(names) != 1:
            raise ValueError(f"{path}: refusing to score: several {key} values in one file: {names[:5]}")
    usable = [r for i, r in enumerate(rows) if i not in set(nan_rows)]
    if not usable:
        raise ValueError(f"{path}: no row has a preference")
    return usable, len(nan_rows)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _missing_preference(value: Any) -> bool:
    return value is None or (_is_number(value) and math.isnan(float(value)))


def preferences(rows: list[dict]) -> np.ndarray:
    """Preferences in [1, 2], the legacy draw code 0 mapped to 1.5."""
    p = np.array([float(r["preference"]) for r in rows])
    return np.where(p == 0.0, 1.5, p)


def winrate_metrics(rows: list[dict]) -> dict[str, Any]:
    """AlpacaEval's head-to-head metrics (alpaca_eval.metrics.get_winrate), in percent."""
    p = preferences(rows) - 1.0
    n = len(p)
    discrete = np.where(p > 0.5, 1.0, np.where(p < 0.5, 0.0, 0.5))
    return {
        "win_rate": float(p.mean() * 100),
        "standard_error": float(p.std(ddof=1) / math.sqrt(n) * 100) if n > 1 else float("nan"),
        "discrete_win_rate": float(discrete.mean() * 100),
        "n_wins": int((p > 0.5).sum()),
        "n_wins_base": int((p < 0.5).sum()),
        "n_draws": int((p == 0.5).sum()),
        "n": n,
        # The leaderboard's avg_length: characters of the model's outputs, truncated to an int.
        "avg_length": int(np.mean([len(r["output_2"]) for r in rows])),
    }
