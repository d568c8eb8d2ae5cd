"""Several annotations per pair (teachers × prompt variants) → one consensus annotation.

    category    the majority category; a tie in votes goes to the larger summed confidence;
                a tie in both (a 1-1 split at equal confidence) is no consensus: the pair is
                `unannotated` (trained as standard DPO by the default unannotated_policy), so no
                category's place in a list decides it and the rule is symmetric in the labels
    agreement   votes for the top category / valid annotations of the pair, in (0, 1] (kept for
                unresolved ties, e.g. 0.5)
    magnitude   median magnitude of the annotations that voted for the category (a teacher that
                saw a different kind of gap says nothing about the size of this one)
    confidence  mean confidence of those annotations × agreement: disagreement lowers it
    n_annotations / n_failed   valid (ok, repaired) and failed annotations of the pair

Failed annotations carry no category: they are counted, never voted. A pair with no valid
annotation comes out as category `unannotated` (magnitude/confidence/agreement null); the schedule
decides what happens to it (`unannotated_policy`), it is never silently dropped.

A (pair, teacher, prompt_version) written twice (a resumed run) counts once: a valid row over a
failed one, then the smallest content (category, magnitude, confidence), so the read order never
decides which of two differing rows is kept.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sp2dpo.annotate.schema import ANNOTATION_STATUSES, MAGNITUDE_MAX, MAGNITUDE_MIN
from sp2dpo.schedule.beta import ALL_CATEGORIES, UNANNOTATED, category_codes

CONSENSUS_SCHEMA = pa.schema(
    [
        pa.field("pair_id", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=False),
        pa.field("magnitude", pa.float64()),
        pa.field("confidence", pa.float64()),
        pa.field("agreement", pa.float64()),
        pa.field("n_annotations", pa.int32(), nullable=False),
        pa.field("n_failed", pa.int32(), nullable=False),
    ]
)
VALID_STATUSES = ("ok", "repaired")
# The annotation columns consensus reads (rationales and raw text stay on disk).
CONSENSUS_INPUTS = ["pair_id", "teacher", "prompt_version", "category", "magnitude", "confidence", "status"]
N_LEVELS = MAGNITUDE_MAX - MAGNITUDE_MIN + 1


def _sorted_codes(values: pa.ChunkedArray) -> np.ndarray:
    """Integer codes that sort like the strings (rank in the sorted distinct values)."""
    distinct = pc.unique(values)
    distinct = distinct.take(pc.sort_indices(distinct))
    return pc.index_in(values, value_set=distinct).to_numpy(zero_copy_only=False).astype(np.int64)


def consensus(annotations: pa.Table, pair_ids: pa.Array | pa.ChunkedArray) -> tuple[pa.Table, dict[str, Any]]:
    """One consensus row per pair, in the order of `pair_ids`, and the annotation provenance.

    Annotation rows are first put in a canonical order (pair, teacher, prompt_version), so neither
    the shard layout nor the row order can change a single bit of the result.
    """
    statuses = set(pc.unique(annotations["status"]).to_pylist())
    if statuses - set(ANNOTATION_STATUSES):
        raise ValueError(f"unknown annotation status {sorted(map(str, statuses - set(ANNOTATION_STATUSES)))}; "
                         f"expected one of {list(ANNOTATION_STATUSES)}")
    pair_index = pc.index_in(annotations["pair_id"], value_set=pair_ids)
    orphans = pair_index.null_count  # annotations of pairs that are not in this pairs table
    ann = annotations.filter(pc.is_valid(pair_index))
    pair_index = pair_index.drop_null().to_numpy(zero_copy_only=False).astype(np.int64)

    # A resumed run may have written a (pair, teacher, prompt_version) twice: keep one row, a valid
    # one over a failed one, then by content (never by read order).
    teacher, version = _sorted_codes(ann["teacher"]), _sorted_codes(ann["prompt_version"])
    failed_rank = pc.equal(ann["status"], "failed").to_numpy(zero_copy_only=False).astype(np.int64)
    content = [pc.fill_null(pc.cast(ann[name], pa.float64()), -1.0).to_numpy(zero_copy_only=False)
               for name in ("confidence", "magnitude")]
    category_rank = _sorted_codes(pc.fill_null(ann["category"], ""))
    order = np.lexsort((*content, category_rank, failed_rank, version, teacher, pair_index))
    key = np.stack([pair_index[order], teacher[order], version[order]])
    first = np.ones(len(order), dtype=bool)
    first[1:] = np.any(key[:, 1:] != key[:, :-1], axis=0)
    order = order[first]
    duplicates = int((~first).sum())
    ann, pair_index = ann.take(pa.array(order)), pair_index[order]

    valid = pc.is_in(ann["status"], value_set=pa.array(VALID_STATUSES)).to_numpy(zero_copy_only=False)

    def counts(column: str) -> dict[str, int]:
        vc = pc.value_counts(ann[column])
        return dict(sorted(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist())))

    provenance = {
        "annotation_rows": annotations.num_rows,
        "duplicate_rows": duplicates,
        "orphan_rows": orphans,
        "status_counts": counts("status"),
        "teachers": counts("teacher"),
        "prompt_versions": counts("prompt_version"),
    }

    good = ann.filter(pa.array(valid))
    for name in ("category", "magnitude", "confidence"):
        if good[name].null_count:
            raise ValueError(f"{good[name].null_count} annotations with status ok/repaired have a null {name}")
    codes = category_codes(good["category"])
    if np.any(codes == ALL_CATEGORIES.index(UNANNOTATED)):
        raise ValueError(f"{UNANNOTATED!r} is not an annotation category")
    mag = good["magnitude"].to_numpy().astype(np.int64)
    conf = good["confidence"].to_numpy().astype(np.float64)
    if np.any((mag < MAGNITUDE_MIN) | (mag > MAGNITUDE_MAX)):
        raise ValueError(f"annotation magnitude outside [{MAGNITUDE_MIN}, {MAGNITUDE_MAX}]")
    if not np.all(np.isfinite(conf)) or np.any((conf < 0) | (conf > 1)):
        raise ValueError("annotation confidence outside [0, 1] or not finite")

    n, n_cat = len(pair_ids), len(ALL_CATEGORIES)
    p = pair_index[valid]
    cell = p * n_cat + codes
    votes = np.bincount(cell, minlength=n * n_cat).reshape(n, n_cat)
    conf_sum = np.bincount(cell, weights=conf, minlength=n * n_cat).reshape(n, n_cat)
    top = votes.max(axis=1)
    # Majority, then summed confidence; several categories still level is no consensus.
    level = np.where(votes == top[:, None], conf_sum, -np.inf)
    best = level.max(axis=1)
    contenders = (votes == top[:, None]) & np.isclose(level, best[:, None], rtol=1e-9, atol=1e-12)
    winner = np.argmax(contenders, axis=1)
    n_valid = votes.sum(axis=1)
    unresolved = (n_valid > 0) & (contenders.sum(axis=1) > 1)
    annotated = (n_valid > 0) & ~unresolved
    provenance["unresolved_ties"] = int(unresolved.sum())
    rows = np.arange(n)

    voter = codes == winner[p]
    hist = np.bincount(p[voter] * N_LEVELS + (mag[voter] - MAGNITUDE_MIN), minlength=n * N_LEVELS).reshape(n, N_LEVELS)
    cum = np.cumsum(hist, axis=1)
    # Median from the histogram: mean of the elements at ranks ceil(top/2) and floor(top/2)+1.
    lower = np.argmax(cum >= ((top + 1) // 2)[:, None], axis=1)
    upper = np.argmax(cum >= (top // 2 + 1)[:, None], axis=1)
    magnitude = (lower + upper) / 2.0 + MAGNITUDE_MIN

    with np.errstate(invalid="ignore", divide="ignore"):
        agreement = top / n_valid
        confidence = conf_sum[rows, winner] / top * agreement
    failed = np.bincount(pair_index[~valid], minlength=n)

    category = np.asarray(ALL_CATEGORIES, dtype=object)[np.where(annotated, winner, ALL_CATEGORIES.index(UNANNOTATED))]
    table = pa.table(
        {
            "pair_id": pair_ids if isinstance(pair_ids, pa.Array) else pair_ids.combine_chunks(),
            "category": pa.array(category, pa.string()),
            "magnitude": pa.array(magnitude, pa.float64(), mask=~annotated),
            "confidence": pa.array(confidence, pa.float64(), mask=~annotated),
            "agreement": pa.array(agreement, pa.float64(), mask=n_valid == 0),
            "n_annotations": pa.array(n_valid, pa.int32()),
            "n_failed": pa.array(failed, pa.int32()),
        },
        schema=CONSENSUS_SCHEMA,
    )
    return table, provenance
