"""The β schedule: one consensus annotation (category, magnitude, confidence) → one β_i.

    beta_i = clip(beta0 · w[category] · g(magnitude) · h(confidence), beta_min, beta_max)
    g(m)   = magnitude_factors interpolated at m   (m = 0..3; aggregated m may be fractional)
    h(c)   = confidence_floor + (1 - confidence_floor) · c
    then, when rescale_mean: beta_i = clip(k · raw_i, beta_min, beta_max) with the one k that makes
    the mean β over the pairs trained on equal beta0 (found by bisection: the mean is monotone in k).

A raw strength of 0 (confidence 0 with confidence_floor 0: "no push at all") gets beta_min, the
least β allowed; it takes no part in finding k (no finite k moves it). When pinned pairs make
beta0 unreachable (e.g. most pairs are noise at beta_min), the schedule saturates and says so:
`Schedule.mean_beta` is the mean achieved and `mean_reached` whether it equals beta0;
`on_mean_miss` decides whether building an artifact then warns or refuses.

Pairs outside the semantic categories follow explicit policies instead of the formula:
    no_real_difference  min_beta (β = beta_min) | drop (excluded from training)
    reversed            min_beta | drop | flip (chosen/rejected swapped at training; β from the
                        formula with w["reversed"])
    unannotated         beta0 (β = beta0: standard DPO for pairs no teacher could read) | drop
Pinned values (beta_min, beta0) are not rescaled: only the semantic β move to match the mean.

Everything is numpy over whole columns: 60,000 pairs take milliseconds, and the same inputs with
the same config give the same bytes (no randomness, fixed-order float arithmetic).
See docs/schedule.md for why the defaults are what they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sp2dpo.annotate.schema import CATEGORIES, MAGNITUDE_MAX, MAGNITUDE_MIN
from sp2dpo.schedule.config import NOISE, REVERSED, SEMANTIC_CATEGORIES, ScheduleConfig

__all__ = ["ALL_CATEGORIES", "SEMANTIC_CATEGORIES", "UNANNOTATED", "Schedule", "ScheduleConfig", "schedule_beta"]

UNANNOTATED = "unannotated"
# Every category a consensus row can carry, in a fixed order (codes index this tuple).
ALL_CATEGORIES = (*CATEGORIES, UNANNOTATED)


@dataclass
class Schedule:
    beta: np.ndarray  # float64; NaN where dropped
    dropped: np.ndarray  # bool
    flipped: np.ndarray  # bool
    rescale_factor: float  # k (1.0 when rescale_mean is off)
    mean_beta: float  # over the pairs trained on (not dropped)
    mean_reached: bool | None  # mean_beta == beta0 (to MEAN_RTOL); None when rescale_mean is off
    zero_strength: int  # semantic pairs whose raw β was 0, set to beta_min


# Relative tolerance of "the mean equals beta0": the bisection lands within ~1e-15 when reachable.
MEAN_RTOL = 1e-6


def category_codes(categories: pa.Array | pa.ChunkedArray | list) -> np.ndarray:
    """Index of each category in ALL_CATEGORIES; ValueError naming any unknown (or null) value."""
    arr = categories if isinstance(categories, (pa.Array, pa.ChunkedArray)) else pa.array(categories, pa.string())
    codes = pc.index_in(arr, value_set=pa.array(ALL_CATEGORIES))
    if codes.null_count:
        values = sorted({str(v) for v in arr.filter(pc.is_null(codes)).to_pylist()})
        raise ValueError(f"unknown categories {values[:5]} (known: {list(ALL_CATEGORIES)})")
    return codes.to_numpy().astype(np.int64)


def _mean_matching_factor(raw: np.ndarray, pinned_sum: float, n: int, cfg: ScheduleConfig) -> float:
    """k with mean(clip(k·raw), pinned) = beta0; the mean is non-decreasing in k, so bisect."""
    if len(raw) == 0:
        return 1.0

    def mean_at(k: float) -> float:
        return (np.clip(k * raw, cfg.beta_min, cfg.beta_max).sum() + pinned_sum) / n

    lo, hi = cfg.beta_min / raw.max(), cfg.beta_max / raw.min()  # every raw β at beta_min / at beta_max
    if mean_at(lo) >= cfg.beta0:
        return lo
    if mean_at(hi) <= cfg.beta0:
        return hi
    for _ in range(100):  # a fixed count, not a tolerance: the result is the same bits every run
        mid = 0.5 * (lo + hi)
        if mean_at(mid) < cfg.beta0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def schedule_beta(categories: pa.Array | list, magnitude, confidence, cfg: ScheduleConfig) -> Schedule:
    """β_i for consensus annotations (vectorised; see the module docstring for the formula).

    `magnitude`/`confidence` are float arrays (NaN allowed only for `unannotated` rows).
    """
    codes = category_codes(categories)
    m = np.asarray(magnitude, dtype=np.float64)
    c = np.asarray(confidence, dtype=np.float64)
    n = len(codes)
    if not (len(m) == len(c) == n):
        raise ValueError(f"categories, magnitude and confidence differ in length: {n}, {len(m)}, {len(c)}")
    cat = np.asarray(ALL_CATEGORIES, dtype=object)[codes] if n else np.array([], dtype=object)
    is_unannotated, is_noise, is_reversed = cat == UNANNOTATED, cat == NOISE, cat == REVERSED
    annotated = ~is_unannotated
    if np.any(annotated & ~np.isfinite(m)) or np.any(annotated & ~np.isfinite(c)):
        raise ValueError("magnitude and confidence must be finite for annotated pairs")
    if np.any(annotated & ((m < MAGNITUDE_MIN) | (m > MAGNITUDE_MAX))):
        raise ValueError(f"magnitude outside [{MAGNITUDE_MIN}, {MAGNITUDE_MAX}]")
    if np.any(annotated & ((c < 0) | (c > 1))):
        raise ValueError("confidence outside [0, 1]")

    flipped = is_reversed & (cfg.reversed_policy == "flip")
    dropped = ((is_noise & (cfg.noise_policy == "drop")) | (is_reversed & (cfg.reversed_policy == "drop"))
               | (is_unannotated & (cfg.unannotated_policy == "drop")))
    pinned_min = (is_noise & (cfg.noise_policy == "min_beta")) | (is_reversed & (cfg.reversed_policy == "min_beta"))
    pinned_beta0 = is_unannotated & (cfg.unannotated_policy == "beta0")
    semantic = ~(dropped | pinned_min | pinned_beta0)  # the six gap categories and flipped pairs

    weights = np.array([cfg.category_weights.get(name, np.nan) for name in ALL_CATEGORIES])
    levels = np.arange(MAGNITUDE_MIN, MAGNITUDE_MAX + 1, dtype=np.float64)
    g = np.interp(np.nan_to_num(m), levels, np.asarray(cfg.magnitude_factors, dtype=np.float64))
    h = cfg.confidence_floor + (1.0 - cfg.confidence_floor) * np.nan_to_num(c)
    raw = cfg.beta0 * weights[codes] * g * h

    # Zero strength: clip(k·0) is beta_min for every finite k, so say it rather than divide by 0.
    zero = semantic & (raw <= 0)
    scaled = semantic & ~zero
    beta = np.full(n, np.nan)
    beta[pinned_min | zero] = cfg.beta_min
    beta[pinned_beta0] = cfg.beta0
    trained = ~dropped
    k = 1.0
    if cfg.rescale_mean and trained.any():
        pinned_sum = float(beta[pinned_min | pinned_beta0 | zero].sum())
        k = _mean_matching_factor(raw[scaled], pinned_sum, int(trained.sum()), cfg)
    beta[scaled] = np.clip(k * raw[scaled], cfg.beta_min, cfg.beta_max)
    if not np.all(np.isfinite(beta[trained]) & (beta[trained] > 0)):  # unreachable by construction; never pass one on
        raise ValueError(f"schedule produced a non-finite or non-positive beta (rescale factor {k})")
    mean = float(beta[trained].mean()) if trained.any() else float("nan")
    reached = None
    if cfg.rescale_mean and trained.any():
        reached = bool(abs(mean - cfg.beta0) <= MEAN_RTOL * cfg.beta0)
    return Schedule(beta=beta, dropped=dropped, flipped=flipped, rescale_factor=float(k), mean_beta=mean,
                    mean_reached=reached, zero_strength=int(zero.sum()))
