"""The β artifact: one row per pair with its β_i, why it has that β, and what training does with it.

    sp2dpo schedule --pairs runs/data/pairs.parquet --annotations runs/ann --out runs/beta.parquet

Built from the pairs table and the annotations table (consensus → schedule → control), written as
one Parquet file whose key-value metadata holds everything needed to audit or reproduce it: the
schedule config and its hash, the control, the annotation provenance, counts, a digest of the
pair ids and of the β column. Training reads it through `training_pairs`, which refuses an
artifact that does not cover its pairs table exactly.

Controls, from the same annotations and config; all three train the same pairs (the semantic
schedule's drops and flips), so they differ in β alone:
    semantic  β_i from the schedule (SP²DPO)
    global    β_i = one global β for every trained pair (beta0, or `global_beta` for a β sweep):
              standard DPO on the same pairs
    shuffled  the semantic β values permuted across the trained pairs (seeded), so only the
              pairing of β with meaning is destroyed

Every artifact records the mean β it trains with (`beta_stats.mean`) beside the target (beta0)
and whether the semantic schedule reached it; no artifact is written with a missing, non-finite
or non-positive β on a trained pair.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sp2dpo import __version__
from sp2dpo.annotate.store import read_shards
from sp2dpo.schedule.beta import UNANNOTATED, Schedule, schedule_beta
from sp2dpo.schedule.config import CONTROLS, Control, ScheduleConfig
from sp2dpo.schedule.consensus import CONSENSUS_INPUTS, consensus
from sp2dpo.storage import read_parquet, read_sp2dpo_metadata, write_parquet
from sp2dpo.utils import progress_bar

ARTIFACT_VERSION = "1"

ARTIFACT_SCHEMA = pa.schema(
    [
        pa.field("pair_id", pa.string(), nullable=False),
        pa.field("beta", pa.float64()),  # what training uses; null where dropped
        pa.field("beta_semantic", pa.float64()),  # the schedule's β, whatever the control
        pa.field("category", pa.string(), nullable=False),  # consensus category, or "unannotated"
        pa.field("magnitude", pa.float64()),  # median over the agreeing annotations
        pa.field("confidence", pa.float64()),  # mean confidence × agreement
        pa.field("agreement", pa.float64()),  # share of annotations voting for `category`
        pa.field("n_annotations", pa.int32(), nullable=False),  # valid annotations combined
        pa.field("n_failed", pa.int32(), nullable=False),  # failed annotations (counted, not voted)
        pa.field("flipped", pa.bool_(), nullable=False),  # chosen/rejected swapped at training
        pa.field("dropped", pa.bool_(), nullable=False),  # excluded from training
    ]
)
REF_LOGP_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")  # added later by the training stage
TRAINING_COLUMNS = ("pair_id", "prompt", "prompt_messages", "chosen", "rejected", "beta", "category")


class ArtifactError(ValueError):
    """The artifact is malformed or does not match the pairs table it is used with."""


def pair_ids_digest(pair_ids: pa.Array | pa.ChunkedArray | list[str]) -> str:
    """sha256 of the sorted pair ids: the set of pairs an artifact covers, in 64 hex chars."""
    ids = pa.chunked_array([pa.array(pair_ids, pa.string())]) if isinstance(pair_ids, list) else pair_ids
    ordered = ids.take(pc.sort_indices(ids)).to_pylist()
    return hashlib.sha256("\n".join(ordered).encode()).hexdigest()


def beta_digest(beta: pa.Array | pa.ChunkedArray) -> str:
    """sha256 of the β column's float64 bytes (null as NaN): equal digests ⇔ byte-identical β."""
    values = pc.fill_null(pc.cast(beta, pa.float64()), float("nan")).to_numpy(zero_copy_only=False)
    return hashlib.sha256(np.ascontiguousarray(values, dtype="<f8").tobytes()).hexdigest()


def apply_control(schedule: Schedule, control: Control, cfg: ScheduleConfig,
                  global_beta: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(beta, dropped, flipped) for a control arm; see the module docstring."""
    if control == "semantic":
        return schedule.beta, schedule.dropped, schedule.flipped
    if control == "global":
        beta = np.where(schedule.dropped, np.nan, cfg.beta0 if global_beta is None else global_beta)
        return beta, schedule.dropped, schedule.flipped
    if control == "shuffled":
        beta = schedule.beta.copy()
        trained = np.flatnonzero(~schedule.dropped)
        beta[trained] = beta[trained][np.random.default_rng(cfg.shuffle_seed).permutation(len(trained))]
        return beta, schedule.dropped, schedule.flipped
    raise ValueError(f"unknown control {control!r}; expected one of {list(CONTROLS)}")


def check_trained_beta(beta: np.ndarray, dropped: np.ndarray, pair_ids: pa.Array) -> None:
    """ArtifactError unless every trained pair has a finite, positive β."""
    bad = np.flatnonzero(~dropped & ~(np.isfinite(beta) & (beta > 0)))
    if len(bad):
        ids = pair_ids.take(pa.array(bad[:3])).to_pylist()
        raise ArtifactError(f"{len(bad)} trained pairs would get a non-finite or non-positive beta "
                            f"({_examples([f'{i}={beta[j]}' for i, j in zip(ids, bad)])}); no artifact written")


def mean_miss_message(sched: Schedule, cfg: ScheduleConfig) -> str | None:
    """Why the semantic mean β is not beta0, or None when it is (or rescale_mean is off)."""
    if sched.mean_reached is not False:
        return None
    return (f"the semantic schedule's mean beta is {sched.mean_beta:.6g}, not beta0={cfg.beta0:g}: pairs pinned at "
            f"beta_min (noise_policy / reversed_policy={cfg.reversed_policy}) or clipped at beta_max leave too "
            "little room; raise beta_max, lower beta_min, set noise_policy=drop, or compare against a global beta "
            "equal to the achieved mean (on_mean_miss=refuse stops here, on_mean_miss=warn records it)")


def build_artifact(pairs_path: str, annotations_path: str, out_path: str, config: ScheduleConfig | None = None,
                   control: Control = "semantic", show_progress: bool = False,
                   global_beta: float | None = None) -> dict[str, Any]:
    """Write the β artifact for every pair of `pairs_path`; return the summary.

    `global_beta` sets the global control's β (default beta0): one artifact per point of a β sweep.
    """
    cfg = config or ScheduleConfig()
    if control not in CONTROLS:
        raise ValueError(f"unknown control {control!r}; expected one of {list(CONTROLS)}")
    if global_beta is not None and (control != "global" or not (np.isfinite(global_beta) and global_beta > 0)):
        raise ValueError(f"global_beta={global_beta!r}: only for control=global, and a positive finite number")
    t0 = time.perf_counter()
    with progress_bar(5, "schedule", disable=not show_progress) as bar:
        try:
            pair_ids = read_parquet(pairs_path, columns=["pair_id"])["pair_id"].combine_chunks()
        except (pa.ArrowInvalid, KeyError) as exc:
            raise ValueError(f"{pairs_path}: not a pairs table (no pair_id column)") from exc
        if pair_ids.null_count or pc.count_distinct(pair_ids).as_py() != len(pair_ids):
            raise ValueError(f"{pairs_path}: pair_id must be unique and non-null")
        bar.update()
        annotations = read_shards(annotations_path, columns=CONSENSUS_INPUTS, required=True)
        bar.update()
        t1 = time.perf_counter()
        cons, provenance = consensus(annotations, pair_ids)
        t2 = time.perf_counter()
        bar.update()
        sched = schedule_beta(cons["category"], cons["magnitude"].to_numpy(zero_copy_only=False),
                              cons["confidence"].to_numpy(zero_copy_only=False), cfg)
        miss = mean_miss_message(sched, cfg)
        if miss and cfg.on_mean_miss == "refuse":
            raise ValueError(miss)
        if miss:
            warnings.warn(miss, stacklevel=2)
        beta, dropped, flipped = apply_control(sched, control, cfg, global_beta)
        check_trained_beta(beta, dropped, pair_ids)
        t3 = time.perf_counter()
        bar.update()

        table = pa.table(
            {
                "pair_id": pair_ids,
                "beta": pa.array(beta, pa.float64(), mask=dropped),
                "beta_semantic": pa.array(sched.beta, pa.float64(), mask=sched.dropped),
                **{name: cons[name] for name in ("category", "magnitude", "confidence", "agreement",
                                                 "n_annotations", "n_failed")},
                "flipped": pa.array(flipped, pa.bool_()),
                "dropped": pa.array(dropped, pa.bool_()),
            },
            schema=ARTIFACT_SCHEMA,
        )
        trained = beta[~dropped]
        categories = cons["category"].to_numpy(zero_copy_only=False)
        counts = {
            "pairs": table.num_rows,
            "trained": int((~dropped).sum()),
            "dropped": int(dropped.sum()),
            "flipped": int(flipped.sum()),
            "unannotated": int((categories == UNANNOTATED).sum()),
            "per_category": {str(k): int(v) for k, v in zip(*np.unique(categories.astype(str), return_counts=True))},
        }
        beta_stats = {
            "mean": float(trained.mean()) if len(trained) else None,  # the achieved mean of this arm
            "min": float(trained.min()) if len(trained) else None,
            "max": float(trained.max()) if len(trained) else None,
            "rescale_factor": sched.rescale_factor,
            "target_mean": cfg.beta0,
            "semantic_mean": None if np.isnan(sched.mean_beta) else sched.mean_beta,
            "semantic_mean_reached": sched.mean_reached,
            "zero_strength_pairs": sched.zero_strength,
            "global_beta": (cfg.beta0 if global_beta is None else global_beta) if control == "global" else None,
        }
        metadata = {
            "artifact_version": ARTIFACT_VERSION,
            "library_version": __version__,
            "schedule_config": cfg.model_dump(mode="json"),
            "schedule_hash": cfg.config_hash(),
            "control": control,
            "shuffle_seed": cfg.shuffle_seed if control == "shuffled" else None,
            "provenance": {**provenance, "annotations": annotations_path, "pairs": pairs_path},
            "counts": counts,
            "beta_stats": beta_stats,
            "pair_ids_digest": pair_ids_digest(pair_ids),
            "beta_digest": beta_digest(table["beta"]),
        }
        write_parquet(table, out_path, metadata)
        bar.update()
    return {
        "artifact": out_path,
        "control": control,
        "schedule_hash": metadata["schedule_hash"],
        **{k: v for k, v in counts.items() if k != "per_category"},
        "per_category": counts["per_category"],
        "mean_beta": None if beta_stats["mean"] is None else round(beta_stats["mean"], 6),
        "target_mean": cfg.beta0,
        "semantic_mean_reached": sched.mean_reached,
        "warnings": [miss] if miss else [],
        "min_beta": beta_stats["min"],
        "max_beta": beta_stats["max"],
        "annotations": provenance["status_counts"],
        "teachers": sorted(provenance["teachers"]),
        "beta_digest": metadata["beta_digest"][:16],
        "consensus_seconds": round(t2 - t1, 4),
        "schedule_seconds": round(t3 - t2, 4),
        "seconds": round(time.perf_counter() - t0, 3),
    }


# ----------------------------------------------------------------------------- reading and checking


def read_artifact(path: str) -> tuple[pa.Table, dict[str, Any]]:
    """The artifact table and its decoded `sp2dpo.*` metadata."""
    table = read_parquet(path)
    missing = [name for name in ARTIFACT_SCHEMA.names if name not in table.column_names]
    if missing:
        raise ArtifactError(f"{path}: not a β artifact, missing columns {missing}")
    return table, read_sp2dpo_metadata(path)


def _examples(values: list, limit: int = 3) -> str:
    shown = ", ".join(map(str, values[:limit]))
    return f"{shown}, ..." if len(values) > limit else shown


def _pair_content_ids(pairs: pa.Table) -> list[str]:
    from sp2dpo.data.schema import pair_id_of

    has_messages = "prompt_messages" in pairs.column_names
    messages = pairs["prompt_messages"].to_pylist() if has_messages else [None] * pairs.num_rows
    return [pair_id_of(json.loads(m) if m is not None else p, c, r)
            for p, m, c, r in zip(pairs["prompt"].to_pylist(), messages, pairs["chosen"].to_pylist(),
                                  pairs["rejected"].to_pylist())]


def verify_artifact(artifact: pa.Table, pairs: pa.Table, metadata: dict[str, Any] | None = None) -> None:
    """Raise ArtifactError unless `artifact` covers exactly the pairs of `pairs`, every trained pair
    has a finite positive β, and the pairs' content still hashes to their ids."""
    for name, table, needed in (("artifact", artifact, ("pair_id", "beta", "dropped", "flipped", "category")),
                                ("pairs table", pairs, ("pair_id", "prompt", "chosen", "rejected"))):
        missing = [c for c in needed if c not in table.column_names]
        if missing:
            raise ArtifactError(f"{name} is missing columns {missing}")
    ids = artifact["pair_id"].to_pylist()
    pair_ids = pairs["pair_id"].to_pylist()
    if None in ids:
        raise ArtifactError("artifact has null pair_ids")
    for name, values in (("artifact", ids), ("pairs table", pair_ids)):
        if len(set(values)) != len(values):
            seen: set[str] = set()
            dups = sorted({v for v in values if v in seen or seen.add(v)})
            raise ArtifactError(f"{name} has {len(dups)} duplicated pair_ids: {_examples(dups)}")
    missing = sorted(set(pair_ids) - set(ids))
    if missing:
        raise ArtifactError(f"artifact is missing {len(missing)} pairs of the pairs table: {_examples(missing)}")
    extra = sorted(set(ids) - set(pair_ids))
    if extra:
        raise ArtifactError(f"artifact has {len(extra)} pairs not in the pairs table: {_examples(extra)}")

    dropped = artifact["dropped"].to_numpy(zero_copy_only=False).astype(bool)
    flipped = artifact["flipped"].to_numpy(zero_copy_only=False).astype(bool)
    beta = pc.fill_null(pc.cast(artifact["beta"], pa.float64()), float("nan")).to_numpy(zero_copy_only=False)
    bad = ~dropped & ~(np.isfinite(beta) & (beta > 0))
    if bad.any():
        rows = np.flatnonzero(bad).tolist()
        raise ArtifactError(f"{len(rows)} trained pairs have a missing, NaN, infinite or non-positive beta: "
                            + _examples([f"{ids[i]}={beta[i]}" for i in rows]))
    both = np.flatnonzero(dropped & flipped).tolist()
    if both:
        raise ArtifactError(f"{len(both)} pairs are both dropped and flipped: {_examples([ids[i] for i in both])}")

    content = _pair_content_ids(pairs)
    changed = [pid for pid, cid in zip(pair_ids, content) if pid != cid]
    if changed:
        raise ArtifactError(f"the pairs table's content does not hash to its pair_ids for {len(changed)} pairs "
                            f"({_examples(changed)}): it was modified after `sp2dpo data prepare`")
    if metadata is not None:
        if metadata.get("artifact_version") != ARTIFACT_VERSION:
            raise ArtifactError(f"artifact version {metadata.get('artifact_version')!r} is not {ARTIFACT_VERSION!r}")
        digest = pair_ids_digest(pair_ids)
        if metadata.get("pair_ids_digest") != digest:
            raise ArtifactError("the artifact was built for another set of pairs (pair_ids_digest differs)")


def training_pairs(artifact_path: str, pairs_path: str) -> pa.Table:
    """Verified rows to train on, in pairs-table order: dropped pairs excluded, flipped pairs with
    chosen and rejected swapped, each with its β (and reference log-probs when the artifact has them)."""
    artifact, metadata = read_artifact(artifact_path)
    pairs = read_parquet(pairs_path)
    verify_artifact(artifact, pairs, metadata)
    rows = artifact.take(pc.index_in(pairs["pair_id"], value_set=artifact["pair_id"]))
    keep = pc.invert(rows["dropped"])
    pairs, rows = pairs.filter(keep), rows.filter(keep)
    flipped = rows["flipped"]
    has_messages = "prompt_messages" in pairs.column_names
    prompt_messages = pairs["prompt_messages"] if has_messages else pa.nulls(pairs.num_rows, pa.string())
    columns = {
        "pair_id": pairs["pair_id"],
        "prompt": pairs["prompt"],
        "prompt_messages": prompt_messages,
        "chosen": pc.if_else(flipped, pairs["rejected"], pairs["chosen"]),
        "rejected": pc.if_else(flipped, pairs["chosen"], pairs["rejected"]),
        "beta": rows["beta"],
        "category": rows["category"],
    }
    for name in REF_LOGP_COLUMNS:
        if name in rows.column_names:
            columns[name] = rows[name]
    return pa.table(columns)
