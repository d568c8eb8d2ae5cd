"""Stand-in annotations derived from the pairs' scores, for tests, benchmarks and the audit demo.

Not a teacher: the category is drawn from a seeded RNG (nothing in a score says *what kind* of gap
it is), only the magnitude and the ties come from the data:

    score gap  <= 0  → no_real_difference, magnitude 0
               <= 1  → magnitude 1;  <= 3 → 2;  > 3 → 3
    no scores        → a failed annotation (status `failed`, null fields), as a teacher that
                       could not answer would write
    confidence       grows with the gap (0.55 at a tie-break gap of 0.5, up to 0.95)

Each extra teacher agrees with the first on the category with probability `agreement`, so the
consensus step has real disagreements to resolve; `reversed_rate` marks a few pairs reversed.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from sp2dpo.annotate.schema import ANNOTATIONS_SCHEMA

GAP_CATEGORIES = ("safety", "factuality", "instruction_following", "reasoning", "helpfulness", "style")
GAP_PROBS = (0.04, 0.12, 0.16, 0.14, 0.40, 0.14)


def synthetic_annotations(pairs: pa.Table, teachers: int = 1, seed: int = 0, agreement: float = 0.75,
                      reversed_rate: float = 0.03, failed_rate: float = 0.0) -> pa.Table:
    """ANNOTATIONS_SCHEMA rows: one per (pair, teacher), teachers named `synthetic-<k>`."""
    rng = np.random.default_rng(seed)
    n = pairs.num_rows
    sc = pairs["score_chosen"].to_numpy(zero_copy_only=False).astype(np.float64)
    sr = pairs["score_rejected"].to_numpy(zero_copy_only=False).astype(np.float64)
    gap = sc - sr
    magnitude = np.select([gap <= 0, gap <= 1, gap <= 3], [0, 1, 2], default=3)
    base_conf = np.clip(0.5 + 0.1 * np.nan_to_num(gap), 0.5, 0.95)
    base_cat = rng.choice(len(GAP_CATEGORIES), size=n, p=GAP_PROBS)
    is_reversed = rng.random(n) < reversed_rate
    columns: dict[str, list] = {name: [] for name in ANNOTATIONS_SCHEMA.names}
    for t in range(teachers):
        cat = np.asarray(GAP_CATEGORIES, dtype=object)[base_cat]
        if t > 0:
            disagree = rng.random(n) >= agreement
            other = np.asarray(GAP_CATEGORIES, dtype=object)[rng.integers(0, len(GAP_CATEGORIES), n)]
            cat = np.where(disagree, other, cat)
        cat = np.where(gap <= 0, "no_real_difference", cat)
        cat = np.where(is_reversed & (gap > 0), "reversed", cat)
        mag = np.clip(magnitude + (rng.integers(-1, 2, n) if t > 0 else 0), 0, 3)
        mag = np.where(gap <= 0, 0, mag)
        conf = np.round(np.clip(base_conf + (rng.normal(0, 0.05, n) if t > 0 else 0), 0, 1), 3)
        failed = np.isnan(gap) | (rng.random(n) < failed_rate)
        columns["pair_id"] += pairs["pair_id"].to_pylist()
        columns["teacher"] += [f"synthetic-{t}"] * n
        columns["prompt_version"] += ["scores-v1"] * n
        columns["category"] += [None if f else str(c) for c, f in zip(cat, failed)]
        columns["magnitude"] += [None if f else int(m) for m, f in zip(mag, failed)]
        columns["confidence"] += [None if f else float(c) for c, f in zip(conf, failed)]
        columns["rationale"] += [None if f else f"score gap {g:g}" for g, f in zip(gap, failed)]
        columns["status"] += ["failed" if f else "ok" for f in failed]
        columns["repairs"] += ['"no scores"' if f else None for f in failed]
        columns["raw_text"] += [None] * n
        columns["prompt_tokens"] += [None] * n
        columns["completion_tokens"] += [None] * n
    return pa.table(columns, schema=ANNOTATIONS_SCHEMA)
