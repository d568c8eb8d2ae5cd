"""Training ingest: the pairs are tokenized once into a cache beside the artifact, reused while the
tokenizer, max_length and rows match and rebuilt (or refused by a worker) when they do not, and
each worker reads only its own shard, disjoint from the others', all of them covering every pair."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    from sp2dpo.train.data import load_training_table
    from sp2dpo.train.sample import build_sample_inputs

    pairs, artifact = build_sample_inputs(tmp_path_factory.mktemp("tokens"), limit=10, max_chars=200)
    return load_training_table(artifact, pairs)[0], artifact


def test_cache_equals_tokenize_table_is_reused_on_a_match_and_refused_on_a_mismatch(table, tiny_model_dir,
                                                                                     monkeypatch):
    from tokenizers import normalizers

    import sp2dpo.train.tokens as tokens
    from sp2dpo.schedule.artifact import ArtifactError
    from sp2dpo.train.data import tokenize_table
    from sp2dpo.train.logps import load_tokenizer

    table, artifact = table
    tok = load_tokenizer(str(tiny_model_dir))
    built = tokens.tokenize_once(table, tok, 256, artifact)
    assert not built["reused"] and built["tag"]["rows"] == table.num_rows == 10
    everything = tokens.read_shard(built, range(table.num_rows), tok)
    expected = tokenize_table(table, tok, 256)
    assert [everything.example(i) for i in range(table.num_rows)] == expected  # the same ids, β, order

    # The same tokenizer, max_length and rows: the file is reused, nothing is tokenized again.
    monkeypatch.setattr(tokens, "tokenize_table", lambda *a, **k: pytest.fail("tokenized again"))
    again = tokens.tokenize_once(table, load_tokenizer(str(tiny_model_dir)), 256, artifact)
    assert again == {**built, "reused": True}
    monkeypatch.undo()

    # Another max_length: another cache (rebuilt, beside the first), and a worker handed the old
    # tag with the new file refuses it.
    shorter = tokens.tokenize_once(table, tok, 512, artifact)
    assert not shorter["reused"] and shorter["path"] != built["path"]
    with pytest.raises(ArtifactError, match="another tokenizer, max_length"):
        tokens.read_shard({"path": shorter["path"], "tag": built["tag"]}, range(4), tok)

    # Another tokenizer (same vocabulary, another normalizer): another tag, and a worker whose own
    # tokenizer is not the cache's refuses it.
    lower = load_tokenizer(str(tiny_model_dir))
    lower.backend_tokenizer.normalizer = normalizers.Lowercase()
    assert tokens.cache_tag(table, lower, 256)["tokenizer_hash"] != built["tag"]["tokenizer_hash"]
    with pytest.raises(ArtifactError, match="another tokenizer than this worker's"):
        tokens.read_shard(built, range(4), lower)

    # Other rows (one β changed): another rows_hash, so the cache is rebuilt, not reused.
    import pyarrow as pa

    beta = table["beta"].to_pylist()
    beta[0] *= 2
    changed = table.set_column(table.column_names.index("beta"), "beta", pa.array(beta, table["beta"].type))
    assert not tokens.tokenize_once(changed, tok, 256, artifact)["reused"]


def test_ray_tasks_write_the_same_cache_and_refuse_what_the_driver_refuses(table, tiny_model_dir, ray_local,
                                                                            monkeypatch, tmp_path):
    """Row groups tokenized by Ray tasks, several at once, make the file the driver makes alone."""
    import pyarrow.parquet as pq

    import sp2dpo.train.tokens as tokens
    from sp2dpo.train.logps import load_tokenizer

    table, _ = table
    tok = load_tokenizer(str(tiny_model_dir))
    monkeypatch.setattr(tokens, "ROW_GROUP", 3)  # 10 pairs: 4 row groups, 2 tasks in flight
    alone = tokens.tokenize_once(table, tok, 256, str(tmp_path / "alone.parquet"))
    parallel = tokens.tokenize_once(table, tok, 256, str(tmp_path / "parallel.parquet"), tasks=2)
    assert not parallel["reused"] and parallel["tag"] == alone["tag"]
    a, b = pq.ParquetFile(alone["path"]), pq.ParquetFile(parallel["path"])
    assert b.metadata.num_row_groups == a.metadata.num_row_groups == 4
    assert b.read().equals(a.read()) and b.schema_arrow.metadata == a.schema_arrow.metadata
    # A prompt that fills max_length is refused from inside a task as from the driver, and no
    # cache is left behind.
    with pytest.raises(ValueError, match="its prompt alone has"):
        tokens.tokenize_once(table, tok, 8, str(tmp_path / "short.parquet"), tasks=2)
    assert sorted(p.name.split(".")[0] for p in tmp_path.iterdir()) == ["alone", "parallel"]


def test_beta_is_checked_once_at_load(table, tiny_model_dir):
    import pyarrow as pa

    import sp2dpo.train.tokens as tokens
    from sp2dpo.schedule.artifact import ArtifactError
    from sp2dpo.train.logps import load_tokenizer

    table, artifact = table
    beta = table["beta"].to_pylist()
    beta[3] = 0.0
    bad = table.set_column(table.column_names.index("beta"), "beta", pa.array(beta, table["beta"].type))
    with pytest.raises(ArtifactError, match="1 trained pairs have a beta that is not > 0"):
        tokens.tokenize_once(bad, load_tokenizer(str(tiny_model_dir)), 256, artifact)


@pytest.mark.parametrize("n_pairs", [8, 13, 101])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_worker_shards_are_disjoint_cover_every_pair_and_keep_one_workers_order(n_pairs, world):
    import numpy as np

    from sp2dpo.train.config import TrainConfig
    from sp2dpo.train.trainer import StepPlan

    cfg = TrainConfig(micro_batch_size=2, gradient_accumulation_steps=1, seed=3)
    plan = StepPlan(n_pairs, cfg, world)
    shards = [plan.shard(rank) for rank in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n_pairs))  # disjoint, and every pair
    for epoch in range(2):
        for rank, shard in enumerate(shards):
            seen = [i for step in range(epoch * plan.steps_per_epoch, (epoch + 1) * plan.steps_per_epoch)
                    for i in plan.indices(step, 0, rank)]
            assert set(seen) <= set(shard) and len(seen) == len(set(seen)) == plan.steps_per_epoch * 2
    if world == 1:  # one worker: the whole table's seeded permutation, cut into batches, as before sharding
        order = np.random.default_rng(3 + 1).permutation(n_pairs)
        step = plan.steps_per_epoch + 1
        assert plan.indices(step, 0, 0) == order[2:4].tolist()


def test_each_worker_reads_only_its_shard(table, tiny_model_dir):
    import sp2dpo.train.tokens as tokens
    from sp2dpo.train.config import TrainConfig
    from sp2dpo.train.data import tokenize_table
    from sp2dpo.train.logps import load_tokenizer
    from sp2dpo.train.trainer import StepPlan

    table, artifact = table
    tok = load_tokenizer(str(tiny_model_dir))
    built = tokens.tokenize_once(table, tok, 256, artifact)
    expected = tokenize_table(table, tok, 256)
    plan = StepPlan(table.num_rows, TrainConfig(micro_batch_size=1), 3)
    for rank in range(3):
        shard = tokens.read_shard(built, plan.shard(rank), tok)
        assert len(shard) == len(plan.shard(rank)) and shard.start == plan.shard(rank).start
        assert [shard.example(i) for i in plan.shard(rank)] == [expected[i] for i in plan.shard(rank)]
        with pytest.raises(IndexError):
            shard.example(plan.shard(rank).stop)


def test_a_shard_reads_only_the_row_groups_it_needs(table, tiny_model_dir, monkeypatch):
    import pyarrow.parquet as pq

    import sp2dpo.train.tokens as tokens
    from sp2dpo.train.data import tokenize_table
    from sp2dpo.train.logps import load_tokenizer

    table, artifact = table
    monkeypatch.setattr(tokens, "ROW_GROUP", 3)  # 10 pairs in row groups of 3, 3, 3, 1
    tok = load_tokenizer(str(tiny_model_dir))
    built = tokens.tokenize_once(table, tok, 300, artifact)
    assert pq.ParquetFile(built["path"]).num_row_groups == 4
    read = []
    real = pq.ParquetFile.read_row_groups
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", lambda self, groups, **k: read.append(groups) or
                        real(self, groups, **k))
    shard = tokens.read_shard(built, range(4, 7), tok)
    assert read == [[1, 2]]
    assert [shard.example(i) for i in range(4, 7)] == tokenize_table(table, tok, 300)[4:7]
