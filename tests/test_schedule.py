"""The annotation schema, the β schedule (pure) and the consensus of several annotations."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from annotation_rows import annotation_table
from pydantic import ValidationError

from sp2dpo.annotate.schema import ANNOTATIONS_SCHEMA, CATEGORIES, Annotation, annotation_json_schema
from sp2dpo.annotate.store import read_shards
from sp2dpo.config import load_config, packaged_config_path
from sp2dpo.schedule.beta import schedule_beta
from sp2dpo.schedule.config import SEMANTIC_CATEGORIES, ScheduleConfig
from sp2dpo.schedule.consensus import consensus

NAN = float("nan")


# ----------------------------------------------------------------------------- annotation schema


def test_annotation_json_schema_is_valid_and_matches_the_model():
    schema = annotation_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    good = {"category": "factuality", "magnitude": 2, "confidence": 0.8, "rationale": "wrong capital city"}
    validator.validate(good)
    assert Annotation.model_validate(good).category == "factuality"
    assert set(schema["properties"]["category"]["enum"]) == set(CATEGORIES)
    bad = [
        {**good, "category": "vibes"},
        {**good, "magnitude": 4},
        {**good, "magnitude": 1.5},
        {**good, "confidence": 1.2},
        {**good, "rationale": "x" * 201},
        {**good, "extra": 1},
        {k: v for k, v in good.items() if k != "confidence"},
    ]
    for doc in bad:
        assert not validator.is_valid(doc), doc
    # The pydantic model refuses what the schema refuses (extra keys aside: the model ignores them).
    for doc in bad[:5] + bad[6:]:
        with pytest.raises(ValidationError):
            Annotation.model_validate(doc)


def test_categories_cover_the_issue():
    for name in ("safety", "factuality", "instruction_following", "reasoning", "helpfulness", "style",
                 "no_real_difference", "reversed"):
        assert name in CATEGORIES


# ----------------------------------------------------------------------------- config


def test_packaged_yaml_equals_the_defaults():
    # docs/schedule.md documents the YAML; the code's defaults must be the same schedule.
    cfg = load_config(ScheduleConfig, packaged_config_path("schedule"))
    assert cfg == ScheduleConfig()
    assert cfg.config_hash() == ScheduleConfig().config_hash()
    assert set(yaml.safe_load(packaged_config_path("schedule").read_text())) == set(ScheduleConfig.model_fields)


@pytest.mark.parametrize("bad", [
    {"beta0": 0.5, "beta_max": 0.4},
    {"beta_min": 0.2},
    {"beta0": -0.1},
    {"category_weights": {**ScheduleConfig().category_weights, "vibes": 1.0}},
    {"category_weights": {"safety": 1.0}},
    {"category_weights": {**ScheduleConfig().category_weights, "style": 0.0}},
    {"magnitude_factors": [1, 2, 3]},
    {"magnitude_factors": [0.5, -1, 1, 2]},
    {"noise_policy": "flip"},
    {"typo_key": 1},
])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValidationError):
        ScheduleConfig(**bad)


def test_reversed_weight_only_required_for_flip():
    weights = {k: v for k, v in ScheduleConfig().category_weights.items() if k != "reversed"}
    ScheduleConfig(category_weights=weights)  # min_beta: not needed
    with pytest.raises(ValidationError, match="reversed"):
        ScheduleConfig(category_weights=weights, reversed_policy="flip")


# ----------------------------------------------------------------------------- the schedule


def _beta(categories, magnitude, confidence, **cfg):
    return schedule_beta(categories, np.asarray(magnitude, float), np.asarray(confidence, float), ScheduleConfig(**cfg))


@pytest.mark.parametrize("rescale", [False, True])
def test_beta_monotone_in_magnitude_and_confidence_within_each_category(rescale):
    mags = np.repeat(np.linspace(0, 3, 13), 11)
    confs = np.tile(np.linspace(0, 1, 11), 13)
    for category in SEMANTIC_CATEGORIES:
        s = _beta([category] * len(mags), mags, confs, rescale_mean=rescale, beta_max=10.0, beta_min=1e-4)
        grid = s.beta.reshape(13, 11)
        assert np.all(np.diff(grid, axis=0) > 0), category  # strictly up in magnitude
        assert np.all(np.diff(grid, axis=1) > 0), category  # strictly up in confidence
    # Categories are ordered by weight at equal magnitude and confidence.
    s = _beta(list(SEMANTIC_CATEGORIES), [2] * 6, [0.8] * 6, rescale_mean=False)
    weights = [ScheduleConfig().category_weights[c] for c in SEMANTIC_CATEGORIES]
    assert np.array_equal(np.argsort(s.beta, kind="stable"), np.argsort(weights, kind="stable"))


def test_beta_formula_without_rescale():
    s = _beta(["safety", "style", "helpfulness"], [3, 0, 1.5], [1.0, 0.0, 0.5], rescale_mean=False)
    # beta0 · w · g(m) · h(c) with g = [.5,.75,1,1.25] interpolated, h(c) = .5 + .5c
    expected = [0.1 * 2.0 * 1.25 * 1.0, 0.1 * 0.5 * 0.5 * 0.5, 0.1 * 1.0 * 0.875 * 0.75]
    expected = np.clip(expected, 0.025, 0.4)
    np.testing.assert_allclose(s.beta, expected)
    assert expected[1] == 0.025  # 0.0125 clipped up


def test_clipping():
    s = _beta(["safety", "style"], [3, 0], [1, 0], rescale_mean=False, category_weights={
        **ScheduleConfig().category_weights, "safety": 50.0, "style": 0.01})
    assert s.beta.tolist() == [0.4, 0.025]


def test_mean_rescaling_hits_beta0_and_respects_clip():
    rng = np.random.default_rng(0)
    n = 5000
    cats = rng.choice(list(SEMANTIC_CATEGORIES) + ["no_real_difference", "unannotated"], n)
    mags = np.where(cats == "unannotated", NAN, rng.integers(0, 4, n))
    confs = np.where(cats == "unannotated", NAN, rng.random(n))
    s = _beta(cats.tolist(), mags, confs)
    assert s.mean_beta == pytest.approx(0.1, abs=1e-12)
    assert s.beta.min() >= 0.025 and s.beta.max() <= 0.4
    assert s.rescale_factor != 1.0
    # Pinned pairs keep their values: noise at beta_min, unannotated at beta0.
    assert np.all(s.beta[cats == "no_real_difference"] == 0.025)
    assert np.all(s.beta[cats == "unannotated"] == 0.1)
    off = _beta(cats.tolist(), mags, confs, rescale_mean=False)
    assert off.rescale_factor == 1.0 and off.mean_beta != pytest.approx(0.1, abs=1e-4)
    # Rescaling is one positive factor then a clip: it never reverses the order of two pairs.
    semantic = np.isin(cats, SEMANTIC_CATEGORIES)
    order = np.lexsort((s.beta[semantic], off.beta[semantic]))  # by unscaled β, ties by scaled β
    assert np.all(np.diff(s.beta[semantic][order]) >= 0)


def test_mean_rescaling_saturates_when_unreachable():
    # Every pair is noise (pinned at beta_min) but one: the mean cannot reach beta0; the one
    # semantic β goes to beta_max and the schedule says so through mean_beta.
    s = _beta(["no_real_difference"] * 9 + ["style"], [0] * 9 + [1], [1] * 10)
    assert s.beta[-1] == 0.4
    assert s.mean_beta == pytest.approx((9 * 0.025 + 0.4) / 10)


@pytest.mark.parametrize("rescale", [True, False])
def test_zero_raw_strength_gets_beta_min_and_never_a_nan(rescale):
    # confidence 0 with confidence_floor 0 makes h = 0: a raw β of 0, which no rescale factor moves.
    cats, mags, confs = ["style", "helpfulness", "factuality", "reasoning"], [1, 2, 3, 2], [0.0, 0.5, 1.0, 0.8]
    s = _beta(cats, mags, confs, confidence_floor=0.0, rescale_mean=rescale)
    assert np.all(np.isfinite(s.beta)) and np.all(s.beta > 0), s.beta
    assert s.beta[0] == 0.025 and s.zero_strength == 1
    # The other pairs are not all pinned at beta_max: the mean still matches beta0 when asked to.
    assert np.all(s.beta[1:] < 0.4)
    if rescale:
        assert s.mean_beta == pytest.approx(0.1, abs=1e-12) and s.mean_reached is True
    else:
        assert s.mean_reached is None
    # Every pair at zero strength: all at beta_min, the mean cannot reach beta0, and that is said.
    s = _beta(["style", "safety"], [1, 3], [0.0, 0.0], confidence_floor=0.0)
    assert s.beta.tolist() == [0.025, 0.025] and s.mean_reached is False and np.isfinite(s.rescale_factor)


def test_mean_reached_says_when_pinned_pairs_make_beta0_unreachable():
    s = _beta(["no_real_difference"] * 9 + ["style"], [0] * 9 + [1], [1] * 10)
    assert s.mean_beta == pytest.approx(0.0625) and s.mean_reached is False
    reachable = _beta(["no_real_difference", "style", "helpfulness"], [0, 1, 2], [1, 1, 1])
    assert reachable.mean_reached is True


@pytest.mark.parametrize("policy,beta,dropped", [("min_beta", 0.025, False), ("drop", None, True)])
def test_noise_policy(policy, beta, dropped):
    s = _beta(["no_real_difference", "helpfulness"], [0, 2], [0.9, 0.9], noise_policy=policy, rescale_mean=False)
    assert s.dropped.tolist() == [dropped, False]
    assert not s.flipped.any()
    if beta is None:
        assert np.isnan(s.beta[0])
    else:
        assert s.beta[0] == beta


def test_reversed_policies():
    args = (["reversed", "helpfulness"], [3, 2], [0.9, 0.9])
    s = _beta(*args, reversed_policy="min_beta", rescale_mean=False)
    assert s.beta[0] == 0.025 and not s.dropped.any() and not s.flipped.any()
    s = _beta(*args, reversed_policy="drop", rescale_mean=False)
    assert s.dropped.tolist() == [True, False] and np.isnan(s.beta[0]) and not s.flipped.any()
    s = _beta(*args, reversed_policy="flip", rescale_mean=False,
              category_weights={**ScheduleConfig().category_weights, "reversed": 1.2})
    assert s.flipped.tolist() == [True, False] and not s.dropped.any()
    assert s.beta[0] == pytest.approx(0.1 * 1.2 * 1.25 * 0.95)  # the formula with w["reversed"]


def test_unannotated_policy():
    s = _beta(["unannotated", "style"], [NAN, 1], [NAN, 0.5], rescale_mean=False)
    assert s.beta[0] == 0.1 and not s.dropped[0]
    s = _beta(["unannotated", "style"], [NAN, 1], [NAN, 0.5], unannotated_policy="drop")
    assert s.dropped.tolist() == [True, False]
    # With the only unpinned pair left, rescaling makes it beta0 exactly.
    assert s.beta[1] == pytest.approx(0.1)


def test_schedule_is_deterministic_to_the_byte():
    rng = np.random.default_rng(1)
    n = 20_000
    cats = rng.choice(list(CATEGORIES), n).tolist()
    mags, confs = rng.integers(0, 4, n).astype(float), rng.random(n)
    a = _beta(cats, mags, confs, reversed_policy="flip").beta
    b = _beta(list(cats), mags.copy(), confs.copy(), reversed_policy="flip").beta
    assert a.tobytes() == b.tobytes()


def test_schedule_refuses_bad_inputs():
    with pytest.raises(ValueError, match="unknown categories"):
        _beta(["vibes"], [1], [0.5])
    with pytest.raises(ValueError, match="magnitude"):
        _beta(["style"], [4], [0.5])
    with pytest.raises(ValueError, match="confidence"):
        _beta(["style"], [1], [1.5])
    with pytest.raises(ValueError, match="finite"):
        _beta(["style"], [NAN], [0.5])


# ----------------------------------------------------------------------------- consensus


def _ann(rows):
    names = ("pair_id", "teacher", "prompt_version", "category", "magnitude", "confidence", "status")
    return annotation_table(**{name: [row[i] for row in rows] for i, name in enumerate(names)})


DISAGREEING = [
    # p1: two of three teachers say factuality → factuality, agreement 2/3, median of the voters' magnitudes.
    ("p1", "t1", "v1", "factuality", 3, 0.9, "ok"),
    ("p1", "t2", "v1", "factuality", 1, 0.6, "repaired"),
    ("p1", "t3", "v1", "style", 0, 1.0, "ok"),
    # p2: one-one tie; style has the larger summed confidence.
    ("p2", "t1", "v1", "safety", 2, 0.4, "ok"),
    ("p2", "t2", "v1", "style", 1, 0.8, "ok"),
    # p3: exact tie in votes and confidence → no consensus (unannotated), whatever the labels.
    ("p3", "t1", "v1", "style", 1, 0.5, "ok"),
    ("p3", "t2", "v1", "safety", 3, 0.5, "ok"),
    # p4: unanimous, two prompt versions, plus one failure that is counted, not voted.
    ("p4", "t1", "v1", "reasoning", 2, 0.8, "ok"),
    ("p4", "t1", "v2", "reasoning", 3, 0.6, "ok"),
    ("p4", "t2", "v1", None, None, None, "failed"),
    # p5: only failures → unannotated.
    ("p5", "t1", "v1", None, None, None, "failed"),
    # not in the pairs table
    ("zz", "t1", "v1", "style", 1, 0.5, "ok"),
]


def test_consensus_on_disagreeing_teachers():
    pair_ids = pa.array(["p1", "p2", "p3", "p4", "p5", "p6"])
    table, prov = consensus(_ann(DISAGREEING), pair_ids)
    rows = {r["pair_id"]: r for r in table.to_pylist()}
    assert table["pair_id"].to_pylist() == pair_ids.to_pylist()
    p1 = rows["p1"]
    assert (p1["category"], p1["n_annotations"], p1["n_failed"]) == ("factuality", 3, 0)
    assert p1["agreement"] == pytest.approx(2 / 3)
    assert p1["magnitude"] == 2.0  # median of 3 and 1 (the style vote's 0 is not about this gap)
    assert p1["confidence"] == pytest.approx((0.9 + 0.6) / 2 * 2 / 3)  # lowered by the disagreement
    assert rows["p2"]["category"] == "style" and rows["p2"]["agreement"] == 0.5
    assert rows["p2"]["confidence"] == pytest.approx(0.8 * 0.5)
    p3 = rows["p3"]
    assert (p3["category"], p3["magnitude"], p3["confidence"], p3["agreement"], p3["n_annotations"]) == (
        "unannotated", None, None, 0.5, 2)
    assert prov["unresolved_ties"] == 1
    p4 = rows["p4"]
    assert (p4["category"], p4["agreement"], p4["magnitude"], p4["n_annotations"], p4["n_failed"]) == (
        "reasoning", 1.0, 2.5, 2, 1)
    assert p4["confidence"] == pytest.approx(0.7)
    for pid, failed in (("p5", 1), ("p6", 0)):
        r = rows[pid]
        assert r["category"] == "unannotated" and r["n_failed"] == failed and r["n_annotations"] == 0
        assert r["magnitude"] is None and r["confidence"] is None and r["agreement"] is None
    assert prov["orphan_rows"] == 1
    assert prov["status_counts"] == {"failed": 2, "ok": 8, "repaired": 1}
    assert prov["teachers"] == {"t1": 6, "t2": 4, "t3": 1}


def test_consensus_ignores_row_order_and_dedupes_resumed_rows():
    pair_ids = pa.array(["p1", "p2", "p3", "p4", "p5"])
    base, _ = consensus(_ann(DISAGREEING), pair_ids)
    shuffled = _ann(DISAGREEING).take(np.random.default_rng(3).permutation(len(DISAGREEING)))
    again, _ = consensus(shuffled, pair_ids)
    assert again.equals(base)
    # A resumed run wrote p1/t3 twice and p4/t2 again, this time successfully: the valid row wins.
    dup = _ann(DISAGREEING + [("p1", "t3", "v1", "style", 0, 1.0, "ok"), ("p4", "t2", "v1", "reasoning", 2, 1.0, "ok")])
    table, prov = consensus(dup, pair_ids)
    rows = {r["pair_id"]: r for r in table.to_pylist()}
    assert prov["duplicate_rows"] == 2
    assert rows["p1"]["n_annotations"] == 3
    assert (rows["p4"]["n_annotations"], rows["p4"]["n_failed"]) == (3, 0)


def test_a_level_tie_is_symmetric_in_the_labels():
    # Swapping which teacher said what, or which category comes first in CATEGORIES, changes nothing.
    ids = pa.array(["p"])
    for a, b in (("safety", "style"), ("style", "safety"), ("factuality", "helpfulness"),
                 ("reversed", "no_real_difference")):
        table, prov = consensus(_ann([("p", "t1", "v1", a, 2, 0.7, "ok"), ("p", "t2", "v1", b, 1, 0.7, "ok")]), ids)
        assert table["category"].to_pylist() == ["unannotated"] and prov["unresolved_ties"] == 1, (a, b)
        # Confidences that differ only by float rounding are level too.
        table, _ = consensus(_ann([("p", "t1", "v1", a, 2, 0.3, "ok"), ("p", "t2", "v1", b, 1, 0.1, "ok"),
                                   ("p", "t3", "v1", b, 1, 0.2, "ok"), ("p", "t4", "v1", a, 1, 0.0, "ok")]), ids)
        assert table["category"].to_pylist() == ["unannotated"], (a, b)
    # A tie in votes with unequal confidence still has a winner, the more confident side, both ways.
    for a, b in (("safety", "style"), ("style", "safety")):
        table, _ = consensus(_ann([("p", "t1", "v1", a, 2, 0.9, "ok"), ("p", "t2", "v1", b, 1, 0.6, "ok")]), ids)
        assert table["category"].to_pylist() == [a]


def test_duplicate_rows_with_different_content_resolve_the_same_in_any_order():
    # A resumed run wrote p1/t1/v1 twice with different answers (and once failed): the kept row
    # is chosen by content, so every read order gives the same consensus.
    rows = [("p1", "t1", "v1", "factuality", 3, 0.9, "ok"), ("p1", "t1", "v1", "style", 1, 0.6, "ok"),
            ("p1", "t1", "v1", None, None, None, "failed"), ("p1", "t2", "v1", "reasoning", 2, 0.8, "ok"),
            ("p2", "t1", "v1", "helpfulness", 2, 0.5, "repaired"), ("p2", "t1", "v1", "helpfulness", 2, 0.7, "ok")]
    ids = pa.array(["p1", "p2"])
    results = set()
    for seed in range(12):
        table, prov = consensus(_ann(rows).take(np.random.default_rng(seed).permutation(len(rows))), ids)
        assert prov["duplicate_rows"] == 3
        results.add(json.dumps(table.to_pylist(), sort_keys=True))
    assert len(results) == 1, results


def test_consensus_refuses_bad_annotations():
    ids = pa.array(["p1"])
    with pytest.raises(ValueError, match="unknown categories"):
        consensus(_ann([("p1", "t", "v", "vibes", 1, 0.5, "ok")]), ids)
    with pytest.raises(ValueError, match="status"):
        consensus(_ann([("p1", "t", "v", "style", 1, 0.5, "done")]), ids)
    with pytest.raises(ValueError, match="null category"):
        consensus(_ann([("p1", "t", "v", None, 1, 0.5, "ok")]), ids)
    with pytest.raises(ValueError, match="magnitude"):
        consensus(_ann([("p1", "t", "v", "style", 7, 0.5, "ok")]), ids)
    with pytest.raises(ValueError, match="confidence"):
        consensus(_ann([("p1", "t", "v", "style", 1, 2.0, "ok")]), ids)
    with pytest.raises(ValueError, match="not an annotation category"):
        consensus(_ann([("p1", "t", "v", "unannotated", 1, 0.5, "ok")]), ids)


def test_read_shards_reads_every_shard_recursively(tmp_path):
    table = _ann(DISAGREEING)
    (tmp_path / "teacher_a" / "v1").mkdir(parents=True)
    (tmp_path / "teacher_b").mkdir()
    pq.write_table(table.slice(0, 5), tmp_path / "teacher_a" / "v1" / "shard-0.parquet")
    pq.write_table(table.slice(5), tmp_path / "teacher_b" / "shard-0.parquet")
    (tmp_path / "teacher_b" / "shard-1.parquet.tmp-123").write_bytes(b"partial write")
    (tmp_path / "README.txt").write_text("not a shard")
    read = read_shards(str(tmp_path), required=True)
    assert read.schema.equals(ANNOTATIONS_SCHEMA)
    assert sorted(read["pair_id"].to_pylist()) == sorted(table["pair_id"].to_pylist())
    single = read_shards(str(tmp_path / "teacher_b" / "shard-0.parquet"), required=True)
    assert single.num_rows == table.num_rows - 5
    with pytest.raises(FileNotFoundError):
        read_shards(str(tmp_path / "nope"), required=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no \\*.parquet"):
        read_shards(str(tmp_path / "empty"), required=True)
    pq.write_table(pa.table({"pair_id": ["p1"]}), tmp_path / "empty" / "x.parquet")
    with pytest.raises(ValueError, match="missing columns"):
        read_shards(str(tmp_path / "empty"), required=True)


def test_annotation_schema_roundtrip_json():
    # The JSON a teacher returns under the schema validates into the model and back.
    doc = json.loads('{"category": "reversed", "magnitude": 0, "confidence": 0.0, "rationale": ""}')
    jsonschema.validate(doc, annotation_json_schema())
    assert Annotation.model_validate(doc).model_dump() == doc
