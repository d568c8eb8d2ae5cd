"""The audit report renders on the bundled sample: Markdown with the right numbers, real PNGs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from sp2dpo.schedule.artifact import ARTIFACT_SCHEMA, build_artifact, read_artifact
from sp2dpo.schedule.audit import LISTED_PAIRS, audit_stats, render_report, write_audit
from sp2dpo.schedule.config import ScheduleConfig
from sp2dpo.schedule.synthetic import synthetic_annotations
from sp2dpo.storage import read_parquet, write_parquet

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, sample_pairs_dir):
    root = tmp_path_factory.mktemp("audit")
    pairs_path = str(sample_pairs_dir / "pairs.parquet")
    pairs = read_parquet(pairs_path)
    write_parquet(synthetic_annotations(pairs, teachers=2, seed=3, failed_rate=0.05), str(root / "ann" / "a.parquet"))
    path = str(root / "beta.parquet")
    build_artifact(pairs_path, str(root / "ann"), path, ScheduleConfig(noise_policy="drop", reversed_policy="flip"))
    return pairs_path, path


def test_audit_report_on_the_sample(artifact, tmp_path):
    _, path = artifact
    summary = write_audit(path, str(tmp_path / "audit"))
    table, meta = read_artifact(path)
    report = (tmp_path / "audit" / "report.md").read_text()
    for name in ("beta_hist.png", "beta_by_category.png", "category_magnitude_heatmap.png"):
        data = (tmp_path / "audit" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
        assert f"]({name})" in report
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(str(tmp_path / "audit" / "category_magnitude_heatmap.png")).shape
    assert width > 600 and height > 300

    category = np.asarray(table["category"].to_pylist())
    dropped = table["dropped"].to_numpy(zero_copy_only=False)
    flipped = table["flipped"].to_numpy(zero_copy_only=False)
    beta = table["beta"].to_numpy(zero_copy_only=False)
    assert (summary["pairs"], summary["dropped"], summary["flipped"]) == (table.num_rows, dropped.sum(), flipped.sum())
    assert summary["mean_beta"] == pytest.approx(beta[~dropped].mean())
    # One row per category with its count and its β mean, as the artifact says.
    for c in set(category):
        row = next(line for line in report.splitlines() if line.startswith(f"| {c} |"))
        cells = [x.strip() for x in row.strip("|").split("|")]
        assert int(cells[1].replace(",", "")) == (category == c).sum()
        trained = (category == c) & ~dropped
        if trained.any():
            assert float(cells[5]) == pytest.approx(beta[trained].mean(), rel=1e-3)
        else:
            assert cells[5] == "–"
    assert f"## Flipped pairs ({flipped.sum()})" in report and f"## Dropped pairs ({dropped.sum()})" in report
    first_flipped = table["pair_id"].to_pylist()[int(np.flatnonzero(flipped)[0])]
    assert f"`{first_flipped}`" in report
    assert meta["schedule_hash"] in report and meta["beta_digest"] in report
    assert "reversed_policy: flip" in report and "synthetic-1" in report
    assert "unanimous (1.0)" in report


def test_audit_cli_and_refusal(artifact, tmp_path):
    pairs_path, path = artifact
    res = subprocess.run([sys.executable, "-m", "sp2dpo.cli", "audit", path, "--out", str(tmp_path / "a"), "--json"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["report"].endswith("report.md") and len(summary["plots"]) == 3
    # The pairs table is not an artifact: a clear error, no traceback.
    res = subprocess.run([sys.executable, "-m", "sp2dpo.cli", "audit", pairs_path,
                          "--out", str(tmp_path / "b")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "not a β artifact" in res.stderr and "Traceback" not in res.stderr


def _artifact_rows(rows: list[tuple]) -> pa.Table:
    """(category, beta, magnitude, agreement, n_annotations, dropped, flipped) per pair."""
    cols = {name: [] for name in ARTIFACT_SCHEMA.names}
    for i, (category, beta, magnitude, agreement, n_annotations, dropped, flipped) in enumerate(rows):
        for name, value in (("pair_id", f"p{i}"), ("beta", beta), ("beta_semantic", beta), ("category", category),
                            ("magnitude", magnitude), ("confidence", None if magnitude is None else 0.5),
                            ("agreement", agreement), ("n_annotations", n_annotations), ("n_failed", 0),
                            ("flipped", flipped), ("dropped", dropped)):
            cols[name].append(value)
    return pa.table(cols, schema=ARTIFACT_SCHEMA)


def test_audit_stats_are_the_numbers_alone():
    table = _artifact_rows([
        ("style", 0.05, 1.0, 1.0, 2, False, False),
        ("style", 0.15, 2.0, 0.5, 2, False, False),
        ("safety", 0.3, 3.0, 1.0, 1, False, False),
        ("reversed", 0.1, 2.0, 2 / 3, 3, False, True),
        ("no_real_difference", None, 0.0, 1.0, 1, True, False),
        ("unannotated", 0.1, None, None, 0, False, False),
    ])
    stats = audit_stats(table, {"control": "semantic", "beta_stats": {"rescale_factor": 1.25}})
    counts = tuple(stats[k] for k in ("pairs", "trained", "dropped", "flipped", "unannotated"))
    assert counts == (6, 5, 1, 1, 1)
    assert stats["beta"]["mean"] == pytest.approx(0.7 / 5) and stats["beta"]["max"] == 0.3
    assert stats["rescale_factor"] == 1.25 and stats["control"] == "semantic"
    style = stats["per_category"]["style"]
    assert (style["pairs"], style["share"], style["dropped"]) == (2, pytest.approx(2 / 6), 0)
    assert style["beta"]["mean"] == pytest.approx(0.1) and style["magnitude_mean"] == pytest.approx(1.5)
    assert style["agreement_mean"] == pytest.approx(0.75)
    noise = stats["per_category"]["no_real_difference"]
    assert noise["dropped"] == 1 and noise["beta"]["mean"] is None  # nothing trained: no β statistics
    assert stats["per_category"]["unannotated"]["magnitude_mean"] is None
    assert list(stats["per_category"])[0] == "safety"  # the categories in their fixed order
    assert stats["agreement"]["bins"] == {"unanimous (1.0)": 3, "≥ 2/3": 1, "≥ 1/2": 1, "< 1/2": 0}
    assert stats["agreement"]["annotations_per_pair"] == {0: 1, 1: 2, 2: 2, 3: 1}
    assert stats["agreement"]["valid_annotations"] == 9 and stats["agreement"]["annotated_pairs"] == 5
    assert stats["flipped_pairs"]["count"] == 1 and stats["flipped_pairs"]["listed"][0]["pair_id"] == "p3"
    assert stats["dropped_pairs"]["listed"][0]["beta"] is None
    json.dumps(stats)  # plain values only

    report = render_report(stats, {}, ScheduleConfig().model_dump(), "beta.parquet")
    assert "| style | 2 | 33.3% | 0 | 0 | 0.1 |" in report and "## Flipped pairs (1)" in report


def test_pair_lists_stop_at_listed_pairs():
    table = _artifact_rows([("style", 0.1, 1.0, 1.0, 1, False, True)] * (LISTED_PAIRS + 3))
    stats = audit_stats(table, {})
    assert stats["flipped_pairs"]["count"] == LISTED_PAIRS + 3 and len(stats["flipped_pairs"]["listed"]) == LISTED_PAIRS
    report = render_report(stats, {}, ScheduleConfig().model_dump(), "beta.parquet")
    assert "(3 more not listed" in report
