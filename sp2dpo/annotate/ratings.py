"""The `ratings` teacher: an annotation read off the pair's own scores, no LLM.

UltraFeedback scores each response (1-10 overall, in half points). The score gap says how much
better the chosen response was rated, but not why, so this teacher only distinguishes what a gap
can tell:

    gap <= -tie_gap         reversed             the rejected response was rated higher
    |gap| < tie_gap         no_real_difference   a tie (magnitude 0): label noise
    gap < minor_gap         style                a small gap: a matter of taste (magnitude 1)
    gap < severe_gap        helpfulness          a clear gap (magnitude 2)
    otherwise               helpfulness          a large gap (magnitude 3)

confidence = min(1, confidence_floor + (1 - confidence_floor) * |gap| / full_confidence_gap): a
tie is still a confident "no difference" at the floor, a large gap approaches 1. A pair without
both scores gets status `failed` (reason "no scores"): it is reported, never guessed.

Vectorised over a pyarrow batch, so Ray Data streams 60k pairs in seconds.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from sp2dpo.annotate.config import RatingsOptions
from sp2dpo.annotate.schema import ANNOTATIONS_SCHEMA

RATINGS_TEACHER = "ratings"


def ratings_annotations(batch: pa.Table, options: RatingsOptions, prompt_version: str) -> pa.Table:
    """Annotation rows (ANNOTATIONS_SCHEMA) for a batch with pair_id, score_chosen, score_rejected."""
    n = batch.num_rows
    chosen = batch["score_chosen"].to_numpy(zero_copy_only=False).astype(np.float64)
    rejected = batch["score_rejected"].to_numpy(zero_copy_only=False).astype(np.float64)
    gap = chosen - rejected  # NaN where a score is missing (nulls become NaN above)
    missing = ~np.isfinite(gap)
    size = np.abs(np.nan_to_num(gap))

    tie = size < options.tie_gap
    reversed_ = ~tie & (gap < 0)
    category = np.full(n, "helpfulness", dtype=object)
    category[~tie & ~reversed_ & (size < options.minor_gap)] = "style"
    category[reversed_] = "reversed"
    category[tie] = "no_real_difference"
    magnitude = np.where(tie, 0, np.where(size < options.minor_gap, 1, np.where(size < options.severe_gap, 2, 3)))
    confidence = np.minimum(1.0, options.confidence_floor
                            + (1.0 - options.confidence_floor) * size / options.full_confidence_gap)
    rationale = np.char.add(np.char.add("score gap ", np.char.mod("%.2f", np.nan_to_num(gap))), " (chosen - rejected)")

    status = np.where(missing, "failed", "ok").astype(object)
    return pa.table(
        {
            "pair_id": batch["pair_id"],
            "teacher": pa.repeat(pa.scalar(RATINGS_TEACHER), n),
            "prompt_version": pa.repeat(pa.scalar(prompt_version), n),
            "category": pa.array(category, pa.string(), mask=missing),
            "magnitude": pa.array(magnitude.astype(np.int32), pa.int32(), mask=missing),
            "confidence": pa.array(confidence, pa.float64(), mask=missing),
            "rationale": pa.array(rationale.astype(object), pa.string(), mask=missing),
            "status": pa.array(status, pa.string()),
            "repairs": pa.array(np.where(missing, json.dumps(["no scores"]), None), pa.string()),
            "raw_text": pa.nulls(n, pa.string()),
            "prompt_tokens": pa.repeat(pa.scalar(0, pa.int32()), n),
            "completion_tokens": pa.repeat(pa.scalar(0, pa.int32()), n),
        },
        schema=ANNOTATIONS_SCHEMA,
    )
