"""A small pairs table and β artifact from the bundled UltraFeedback slice, for tests and benchmarks.

The annotations are the schedule stage's score-derived stand-ins (`schedule/synthetic.py`), so no
teacher runs; the pairs, the schedule and the artifact are the real ones.
"""

from __future__ import annotations

from pathlib import Path


def build_sample_inputs(out_dir: str | Path, limit: int = 32, seed: int = 0, max_chars: int | None = 600,
                        control: str = "semantic") -> tuple[str, str]:
    """Write OUT/data/pairs.parquet and OUT/beta.parquet; return (pairs_path, artifact_path).

    `max_chars` keeps pairs whose prompt and answers are short, so CPU tests stay fast."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from sp2dpo.data.prepare import DataConfig, prepare
    from sp2dpo.schedule.artifact import build_artifact
    from sp2dpo.schedule.synthetic import synthetic_annotations
    from sp2dpo.storage import read_parquet, write_parquet

    out = Path(out_dir)
    prepare(DataConfig(inputs=["ultrafeedback-sample"], out=str(out / "data")), show_progress=False)
    pairs_path = str(out / "data" / "pairs.parquet")
    pairs = read_parquet(pairs_path)
    if max_chars is not None:
        lengths = [pc.utf8_length(pairs[c]) for c in ("prompt", "chosen", "rejected")]
        short = pc.and_(pc.and_(pc.less_equal(lengths[0], max_chars), pc.less_equal(lengths[1], max_chars)),
                        pc.less_equal(lengths[2], max_chars))
        pairs = pairs.filter(short)
    pairs = pairs.slice(0, limit)
    write_parquet(pairs, pairs_path)
    annotations = synthetic_annotations(pairs, teachers=2, seed=seed)
    write_parquet(annotations, str(out / "annotations" / "part-0.parquet"))
    artifact_path = str(out / "beta.parquet")
    build_artifact(pairs_path, str(out / "annotations"), artifact_path, control=control)
    assert isinstance(pairs, pa.Table)
    return pairs_path, artifact_path
