"""The β artifact: build on the bundled sample, controls, determinism, verifier, training rows, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from annotation_rows import annotation_table

from sp2dpo.schedule.artifact import (
    ARTIFACT_SCHEMA,
    ArtifactError,
    beta_digest,
    build_artifact,
    read_artifact,
    training_pairs,
    verify_artifact,
)
from sp2dpo.schedule.config import ScheduleConfig
from sp2dpo.schedule.synthetic import synthetic_annotations
from sp2dpo.storage import read_parquet, write_parquet

POLICIES = ScheduleConfig(noise_policy="drop", reversed_policy="flip")


@pytest.fixture(scope="module")
def sample(tmp_path_factory, sample_pairs_dir):
    """The bundled UltraFeedback sample as a pairs table, and 3 synthetic teachers' annotations in
    two shard directories (one teacher's failures included)."""
    root = tmp_path_factory.mktemp("sample")
    pairs_path = str(sample_pairs_dir / "pairs.parquet")
    pairs = read_parquet(pairs_path)
    ann = synthetic_annotations(pairs, teachers=3, seed=7, failed_rate=0.05)
    write_parquet(ann.slice(0, 1000), str(root / "ann" / "teacher-a" / "part-0.parquet"))
    write_parquet(ann.slice(1000), str(root / "ann" / "teacher-b" / "part-0.parquet"))
    return {"root": root, "pairs": pairs_path, "ann": str(root / "ann"), "annotations": ann, "n": pairs.num_rows}


def _build(sample, name, control="semantic", config=POLICIES, annotations=None):
    out = str(sample["root"] / f"{name}.parquet")
    summary = build_artifact(sample["pairs"], annotations or sample["ann"], out, config, control=control)
    table, meta = read_artifact(out)
    return summary, table, meta


def _build_global(sample, name, beta):
    out = str(sample["root"] / f"{name}.parquet")
    build_artifact(sample["pairs"], sample["ann"], out, POLICIES, control="global", global_beta=beta)
    return (None, *read_artifact(out))


def test_artifact_on_the_sample(sample):
    summary, table, meta = _build(sample, "semantic")
    n = sample["n"]
    assert table.schema.remove_metadata().equals(ARTIFACT_SCHEMA)
    assert table.num_rows == n == summary["pairs"]
    assert table["pair_id"].to_pylist() == read_parquet(sample["pairs"])["pair_id"].to_pylist()
    assert set(meta) >= {"schedule_config", "schedule_hash", "control", "shuffle_seed", "provenance", "counts",
                         "pair_ids_digest", "library_version", "artifact_version", "beta_digest"}
    assert meta["schedule_hash"] == POLICIES.config_hash() and meta["control"] == "semantic"
    assert ScheduleConfig.model_validate(meta["schedule_config"]) == POLICIES
    assert sorted(meta["provenance"]["teachers"]) == ["synthetic-0", "synthetic-1", "synthetic-2"]
    assert meta["provenance"]["prompt_versions"] == {"scores-v1": 3 * n}
    status = meta["provenance"]["status_counts"]
    assert status["failed"] > 0 and status["failed"] + status["ok"] == 3 * n
    counts = meta["counts"]
    assert sum(counts["per_category"].values()) == n
    dropped = table["dropped"].to_numpy(zero_copy_only=False)
    flipped = table["flipped"].to_numpy(zero_copy_only=False)
    # Policies: every tie was dropped, every reversed pair flipped; counts agree with the rows.
    category = np.asarray(table["category"].to_pylist())
    assert np.array_equal(dropped, category == "no_real_difference") and dropped.sum() == counts["dropped"] > 0
    assert np.array_equal(flipped, category == "reversed") and flipped.sum() == counts["flipped"] > 0
    beta = table["beta"].to_numpy(zero_copy_only=False)
    assert np.all(np.isnan(beta[dropped])) and np.all(beta[~dropped] > 0)
    assert beta[~dropped].mean() == pytest.approx(POLICIES.beta0, abs=1e-12)
    # Objective categories get more β than style, on average, on real score gaps.
    by_cat = {c: beta[category == c].mean() for c in ("safety", "factuality", "helpfulness", "style")}
    assert by_cat["safety"] > by_cat["factuality"] > by_cat["helpfulness"] > by_cat["style"]
    assert meta["beta_digest"] == beta_digest(table["beta"])
    assert table["n_annotations"].to_numpy().max() == 3
    assert (table["n_annotations"].to_numpy() + table["n_failed"].to_numpy() == 3).all()
    verify_artifact(table, read_parquet(sample["pairs"]), meta)


def test_same_inputs_same_beta_bytes_whatever_the_shard_layout(sample, tmp_path):
    _, first, meta1 = _build(sample, "det-a")
    # The same annotations, shuffled and cut into three other shards.
    ann = sample["annotations"]
    ann = ann.take(np.random.default_rng(0).permutation(ann.num_rows))
    for i, start in enumerate(range(0, ann.num_rows, 1100)):
        write_parquet(ann.slice(start, 1100), str(tmp_path / "other" / f"s{i}.parquet"))
    _, second, meta2 = _build(sample, "det-b", annotations=str(tmp_path / "other"))
    def beta_bytes(table):
        return table["beta"].to_numpy(zero_copy_only=False).tobytes()

    assert beta_bytes(first) == beta_bytes(second)
    assert meta1["beta_digest"] == meta2["beta_digest"]
    assert first.equals(second)
    _, third, meta3 = _build(sample, "det-c", config=POLICIES.model_copy(update={"beta0": 0.12}))
    assert meta3["beta_digest"] != meta1["beta_digest"] and meta3["schedule_hash"] != meta1["schedule_hash"]


def test_global_and_shuffled_controls(sample):
    _, sem, _ = _build(sample, "c-semantic")
    _, glob, gmeta = _build(sample, "c-global", control="global")
    _, shuf, smeta = _build(sample, "c-shuffled", control="shuffled")
    # global: standard DPO with beta0 on exactly the pairs semantic trains (its drops and flips).
    assert gmeta["control"] == "global" and gmeta["shuffle_seed"] is None
    assert glob["dropped"].equals(sem["dropped"]) and glob["flipped"].equals(sem["flipped"])
    assert pc.any(glob["dropped"]).as_py() and pc.any(glob["flipped"]).as_py()
    kept = pc.invert(glob["dropped"])
    assert pc.all(pc.equal(glob["beta"].filter(kept), POLICIES.beta0)).as_py()
    assert glob["beta"].filter(glob["dropped"]).null_count == pc.sum(glob["dropped"]).as_py()
    assert glob["beta_semantic"].equals(sem["beta_semantic"])
    assert gmeta["beta_stats"]["mean"] == POLICIES.beta0 and gmeta["beta_stats"]["global_beta"] == POLICIES.beta0
    # A point of a global-β sweep: another β, the same pairs.
    _, sweep, sweep_meta = _build_global(sample, "c-global-0.01", 0.01)
    assert pc.all(pc.equal(sweep["beta"].filter(kept), 0.01)).as_py() and sweep["dropped"].equals(sem["dropped"])
    assert sweep_meta["beta_stats"]["mean"] == pytest.approx(0.01) and sweep_meta["beta_stats"]["global_beta"] == 0.01
    with pytest.raises(ValueError, match="only for control=global"):
        build_artifact(sample["pairs"], sample["ann"], str(sample["root"] / "x.parquet"), POLICIES, global_beta=0.01)
    # shuffled: the semantic β values permuted over the same trained pairs.
    assert smeta["control"] == "shuffled" and smeta["shuffle_seed"] == POLICIES.shuffle_seed
    assert shuf["dropped"].equals(sem["dropped"]) and shuf["flipped"].equals(sem["flipped"])
    trained = ~sem["dropped"].to_numpy(zero_copy_only=False)
    b_sem = sem["beta"].to_numpy(zero_copy_only=False)[trained]
    b_shuf = shuf["beta"].to_numpy(zero_copy_only=False)[trained]
    assert np.array_equal(np.sort(b_sem), np.sort(b_shuf))
    assert (b_sem != b_shuf).mean() > 0.5
    # Under the shuffle, β no longer tracks the category.
    category = np.asarray(sem["category"].to_pylist())[trained]
    style = category == "style"
    assert abs(b_shuf[style].mean() - b_shuf.mean()) < abs(b_sem[style].mean() - b_sem.mean())
    # Same seed → same permutation; another seed → another.
    _, again, _ = _build(sample, "c-shuffled-2", control="shuffled")
    seed_1 = POLICIES.model_copy(update={"shuffle_seed": 1})
    _, other, _ = _build(sample, "c-shuffled-3", control="shuffled", config=seed_1)
    assert again["beta"].equals(shuf["beta"]) and not other["beta"].equals(shuf["beta"])
    with pytest.raises(ValueError, match="unknown control"):
        _build(sample, "c-bad", control="random")


def test_pairs_without_annotations_get_beta0(sample, tmp_path):
    ann = sample["annotations"]
    some = pa.array(read_parquet(sample["pairs"])["pair_id"].to_pylist()[:100])
    write_parquet(ann.filter(pc.is_in(ann["pair_id"], value_set=some)), str(tmp_path / "few" / "a.parquet"))
    summary, table, _ = _build(sample, "partial", annotations=str(tmp_path / "few"), config=ScheduleConfig())
    unannotated = np.asarray(table["category"].to_pylist()) == "unannotated"
    assert unannotated.sum() == summary["unannotated"] >= sample["n"] - 100
    assert np.all(table["beta"].to_numpy(zero_copy_only=False)[unannotated] == 0.1)
    assert summary["trained"] == sample["n"]  # none silently dropped


def _write_annotations(sample, tmp_path, rows):
    """One teacher's annotations of the first pairs of the sample: (category, magnitude, confidence) each."""
    n = len(rows)
    table = annotation_table(pair_id=read_parquet(sample["pairs"])["pair_id"].to_pylist()[:n], teacher=["t"] * n,
                             prompt_version=["v"] * n, status=["ok"] * n, category=[r[0] for r in rows],
                             magnitude=[r[1] for r in rows], confidence=[r[2] for r in rows])
    path = tmp_path / "ann"
    write_parquet(table, str(path / "a.parquet"))
    return str(path)


def test_zero_confidence_with_floor_zero_writes_a_finite_artifact(sample, tmp_path):
    ann = _write_annotations(sample, tmp_path, [("style", 1, 0.0), ("helpfulness", 2, 0.9), ("factuality", 3, 1.0)])
    cfg = ScheduleConfig(confidence_floor=0.0)
    _, table, meta = _build(sample, "zero-conf", config=cfg, annotations=ann)
    beta = table["beta"].to_numpy(zero_copy_only=False)
    assert np.all(np.isfinite(beta)) and np.all(beta > 0)
    assert beta[0] == cfg.beta_min and meta["beta_stats"]["zero_strength_pairs"] == 1
    assert meta["beta_stats"]["max"] < cfg.beta_max  # the other pairs were not pinned at beta_max
    verify_artifact(table, read_parquet(sample["pairs"]), meta)


def test_build_artifact_never_writes_a_non_finite_beta(sample, tmp_path, monkeypatch):
    # The last guard, below the schedule's own checks: a schedule that hands back a NaN (as one
    # did before zero strengths were handled) must not reach the disk. The pure schedule cannot
    # produce one any more, so a wrapper plants it.
    from sp2dpo.schedule import artifact

    real = artifact.schedule_beta

    def planted(*args, **kwargs):
        sched = real(*args, **kwargs)
        sched.beta[np.flatnonzero(~sched.dropped)[0]] = np.nan
        return sched

    monkeypatch.setattr(artifact, "schedule_beta", planted)
    out = tmp_path / "nan.parquet"
    for control in ("semantic", "shuffled"):
        with pytest.raises(ArtifactError, match="non-finite or non-positive"):
            build_artifact(sample["pairs"], sample["ann"], str(out), POLICIES, control=control)
    assert not out.exists()


def test_unreachable_mean_is_recorded_and_warns_or_refuses(sample, tmp_path):
    # Mostly noise pinned at beta_min: the mean cannot reach beta0 = 0.1.
    rows = [("no_real_difference", 0, 1.0)] * 12 + [("style", 1, 0.8), ("helpfulness", 2, 0.9)]
    ann = _write_annotations(sample, tmp_path, rows)
    ids = read_parquet(sample["pairs"])["pair_id"].to_pylist()
    pairs = read_parquet(sample["pairs"]).filter(pc.is_in(pc.field("pair_id"), value_set=pa.array(ids[:14])))
    pairs_path = str(tmp_path / "pairs.parquet")
    write_parquet(pairs, pairs_path)
    cfg = ScheduleConfig()
    with pytest.warns(UserWarning, match="mean beta is 0.0"):
        summary = build_artifact(pairs_path, ann, str(tmp_path / "warn.parquet"), cfg)
    meta = read_artifact(str(tmp_path / "warn.parquet"))[1]
    stats = meta["beta_stats"]
    assert stats["semantic_mean_reached"] is False and stats["target_mean"] == 0.1
    assert stats["mean"] == pytest.approx((12 * 0.025 + 2 * 0.4) / 14) and stats["semantic_mean"] == stats["mean"]
    assert summary["semantic_mean_reached"] is False and "on_mean_miss" in summary["warnings"][0]
    refuse = cfg.model_copy(update={"on_mean_miss": "refuse"})
    with pytest.raises(ValueError, match="raise beta_max, lower beta_min, set noise_policy=drop"):
        build_artifact(pairs_path, ann, str(tmp_path / "refused.parquet"), refuse)
    assert not (tmp_path / "refused.parquet").exists()
    # Dropping the noise leaves a reachable target: no warning, recorded as reached.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dropping = refuse.model_copy(update={"noise_policy": "drop"})
        build_artifact(pairs_path, ann, str(tmp_path / "dropped.parquet"), dropping)
    assert read_artifact(str(tmp_path / "dropped.parquet"))[1]["beta_stats"]["semantic_mean_reached"] is True


# ----------------------------------------------------------------------------- the verifier


def _refuses(artifact, pairs, match, meta=None):
    with pytest.raises(ArtifactError, match=match):
        verify_artifact(artifact, pairs, meta)


def _set_beta(table, index, value):
    beta = table["beta"].to_pylist()
    beta[index] = value
    return table.set_column(table.column_names.index("beta"), "beta", pa.array(beta, pa.float64()))


def test_verifier_refuses_every_mismatch(sample):
    _, art, meta = _build(sample, "verify")
    pairs = read_parquet(sample["pairs"])
    verify_artifact(art, pairs, meta)
    trained = int(np.flatnonzero(~art["dropped"].to_numpy(zero_copy_only=False))[0])
    dropped = int(np.flatnonzero(art["dropped"].to_numpy(zero_copy_only=False))[0])

    _refuses(art.slice(1), pairs, "missing 1 pairs")
    _refuses(art, pairs.slice(1), "1 pairs not in the pairs table")
    _refuses(pa.concat_tables([art, art.slice(5, 1)]), pairs, "artifact has 1 duplicated")
    _refuses(art, pa.concat_tables([pairs, pairs.slice(5, 1)]), "pairs table has 1 duplicated")
    for bad in (float("nan"), float("inf"), 0.0, -0.1, None):
        _refuses(_set_beta(art, trained, bad), pairs, "non-positive beta")
    verify_artifact(_set_beta(art, dropped, None), pairs, meta)  # a dropped pair needs no β
    both = art.set_column(art.column_names.index("flipped"), "flipped", art["dropped"])
    _refuses(both, pairs, "both dropped and flipped")
    edited = pairs.set_column(pairs.column_names.index("chosen"), "chosen",
                              pa.array(["edited"] + pairs["chosen"].to_pylist()[1:]))
    _refuses(art, edited, "does not hash to its pair_ids for 1 pairs")
    # A coherent subset of both tables is still not the set the artifact was built for.
    _refuses(art.slice(1), pairs.slice(1), "pair_ids_digest", meta)
    verify_artifact(art.slice(1), pairs.slice(1))  # without metadata only the tables are compared
    _refuses(art, pairs, "version", {**meta, "artifact_version": "0"})
    _refuses(art.drop_columns(["beta"]), pairs, "missing columns")


def test_training_pairs_drop_flip_and_ref_logps(sample, tmp_path):
    _, art, meta = _build(sample, "train")
    pairs = read_parquet(sample["pairs"])
    rows = training_pairs(str(sample["root"] / "train.parquet"), sample["pairs"])
    assert rows.column_names == ["pair_id", "prompt", "prompt_messages", "chosen", "rejected", "beta", "category"]
    keep = ~art["dropped"].to_numpy(zero_copy_only=False)
    assert rows.num_rows == keep.sum()
    by_id = {r["pair_id"]: r for r in pairs.to_pylist()}
    flipped = set(np.asarray(art["pair_id"].to_pylist())[art["flipped"].to_numpy(zero_copy_only=False)])
    assert flipped
    for r in rows.to_pylist():
        src = by_id[r["pair_id"]]
        if r["pair_id"] in flipped:
            assert (r["chosen"], r["rejected"]) == (src["rejected"], src["chosen"])
            assert r["category"] == "reversed"
        else:
            assert (r["chosen"], r["rejected"]) == (src["chosen"], src["rejected"])
        assert r["beta"] > 0
    # The training stage adds reference log-probs to the artifact: they come through.
    ref = art.append_column("ref_chosen_logps", pa.array(np.arange(art.num_rows, dtype=float))) \
             .append_column("ref_rejected_logps", pa.array(-np.arange(art.num_rows, dtype=float)))
    write_parquet(ref, str(tmp_path / "ref.parquet"), meta)
    with_ref = training_pairs(str(tmp_path / "ref.parquet"), sample["pairs"])
    assert with_ref.column_names[-2:] == ["ref_chosen_logps", "ref_rejected_logps"]
    assert with_ref["ref_chosen_logps"].to_pylist() == [float(i) for i in np.flatnonzero(keep)]
    # Training refuses a pairs table that is not the artifact's.
    pq.write_table(pairs.slice(1), tmp_path / "fewer.parquet")
    with pytest.raises(ArtifactError, match="not in the pairs table"):
        training_pairs(str(sample["root"] / "train.parquet"), str(tmp_path / "fewer.parquet"))


# ----------------------------------------------------------------------------- CLI


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "sp2dpo.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_schedule_json_and_clear_errors(sample, tmp_path):
    out = str(tmp_path / "cli.parquet")
    res = _cli("schedule", "--pairs", sample["pairs"], "--annotations", sample["ann"], "--out", out,
               "--config", "schedule", "--set", "reversed_policy=flip", "--control", "shuffled", "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["control"] == "shuffled" and summary["pairs"] == sample["n"] and summary["flipped"] > 0
    _, meta = read_artifact(out)
    assert meta["schedule_config"]["reversed_policy"] == "flip" and meta["shuffle_seed"] == 0

    bad = _cli("schedule", "--pairs", sample["pairs"], "--annotations", str(tmp_path / "missing"), "--out",
               str(tmp_path / "x.parquet"), "--set", "beta0=2")
    assert bad.returncode == 2 and "beta_min <= beta0 <= beta_max" in bad.stderr and "Traceback" not in bad.stderr
    bad = _cli("schedule", "--pairs", sample["pairs"], "--annotations", str(tmp_path / "missing"), "--out",
               str(tmp_path / "x.parquet"))
    assert bad.returncode == 2 and "annotations not found" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "x.parquet").exists()
