"""Training on object storage, as on a cluster whose nodes share no disk: inputs, the student,
the reference pass's artifact, outputs and Ray Train checkpoints all on a real S3 API server
(tests/s3_server.py); what a test checks is read back from the server. The slow test kills a
DeepSpeed ZeRO-2 worker: the group resumes from the checkpoint on S3, each rank fetching only its
own shards, and ends where the uninterrupted run ends."""

from __future__ import annotations

import json
import os

import pytest
import torch

from sp2dpo import storage

pytestmark = pytest.mark.filterwarnings("ignore")


def _upload(local: str, uri: str) -> str:
    storage.write_bytes(uri, open(local, "rb").read())
    return uri


@pytest.fixture(scope="module")
def inputs_on_s3(s3, tmp_path_factory, tiny_model_dir):
    """Pairs, a β artifact without reference log-probs, and the tiny student, uploaded to S3."""
    from sp2dpo.train.sample import build_sample_inputs

    pairs, artifact = build_sample_inputs(tmp_path_factory.mktemp("s3in"), limit=8, max_chars=200)
    root = s3.new_prefix("train")
    model = storage.join_uri(root, "in", "tiny-model")
    storage.upload_dir(str(tiny_model_dir), model)
    return {"root": root, "model": model,
            "pairs": _upload(pairs, storage.join_uri(root, "in", "pairs.parquet")),
            "artifact": _upload(artifact, storage.join_uri(root, "in", "beta.parquet"))}


def test_reference_pass_and_training_read_and_write_object_storage(s3, inputs_on_s3, tiny_model_dir, ray_local):
    """Artifact, pairs and student on S3 → the reference pass writes OUTPUT_DIR/beta_ref.parquet
    on S3 → training writes the model, summary, metrics, curves, TensorBoard and its checkpoints
    (storage_path defaults to OUTPUT_DIR/ray) there; the model loads after `stage_model`."""
    from transformers import AutoModelForCausalLM

    from sp2dpo.schedule.artifact import read_artifact
    from sp2dpo.train.trainer import TrainConfig, train

    out = storage.join_uri(inputs_on_s3["root"], "run")
    cfg = TrainConfig(artifact=inputs_on_s3["artifact"], pairs=inputs_on_s3["pairs"], model=inputs_on_s3["model"],
                      out=out, strategy="torch", max_length=256, learning_rate=2e-3, micro_batch_size=2,
                      max_steps=4, checkpoint_every=2, compute_reference=True)
    summary = train(cfg, show_progress=False)
    assert summary["steps"] == 4 and summary["artifact"] == storage.join_uri(out, "beta_ref.parquet")
    keys = set(s3.keys(out))
    assert {"beta_ref.parquet", "training_summary.json", "metrics.jsonl", "training_curves.png",
            "model/config.json", "model/model.safetensors", "model/tokenizer.json"} <= keys
    assert any(k.startswith("tensorboard/events.out.tfevents.") for k in keys)
    assert {"ray/sp2dpo-train/step_0000004/torch_state.pt", "ray/sp2dpo-train/step_0000004/trainer_state.json"} <= keys
    assert summary["checkpoint"] == storage.join_uri(out, "ray/sp2dpo-train/step_0000004")
    assert summary["model_dir"] == storage.join_uri(out, "model")
    # The reference pass's artifact on S3: tagged with the student's URI, log-probs for every pair.
    ref, meta = read_artifact(summary["artifact"])
    assert meta["reference"]["model_id"] == inputs_on_s3["model"] and ref["ref_chosen_logps"].null_count < ref.num_rows
    history = [json.loads(line) for line in storage.read_text(storage.join_uri(out, "metrics.jsonl")).splitlines()]
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert storage.read_json(storage.join_uri(out, "training_summary.json"))["steps"] == 4
    # The trained model, staged from S3, is a plain HF directory with trained weights.
    model = AutoModelForCausalLM.from_pretrained(storage.stage_model(summary["model_dir"]))
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(start.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)


def test_ray_data_reference_pass_writes_its_artifact_to_s3(s3, inputs_on_s3, ray_local):
    """`ReferenceConfig.out` an s3:// URI, Ray Data scorer actors staging the student from S3
    themselves: the same log-probs as the local engine."""
    from sp2dpo.schedule.artifact import read_artifact
    from sp2dpo.train.reference import ReferenceConfig, compute_reference

    common = dict(artifact=inputs_on_s3["artifact"], pairs=inputs_on_s3["pairs"], model=inputs_on_s3["model"],
                  max_length=256)
    root = inputs_on_s3["root"]
    local = compute_reference(ReferenceConfig(out=storage.join_uri(root, "ref", "local.parquet"), **common), False)
    ray = compute_reference(ReferenceConfig(out=storage.join_uri(root, "ref", "ray.parquet"), engine="ray",
                                            num_workers=1, **common), False)
    assert s3.keys(storage.join_uri(root, "ref")) == ["local.parquet", "ray.parquet"]
    assert ray["artifact"] == storage.join_uri(root, "ref", "ray.parquet")
    assert ray["scored_pairs"] == local["scored_pairs"]
    (a, _), (b, meta) = read_artifact(local["artifact"]), read_artifact(ray["artifact"])
    assert meta["reference"] == local["reference"]
    for name in ("ref_chosen_logps", "ref_rejected_logps"):
        torch.testing.assert_close(torch.tensor([v or 0.0 for v in a[name].to_pylist()]),
                                   torch.tensor([v or 0.0 for v in b[name].to_pylist()]), rtol=0, atol=1e-4)


def _files(directory: str) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), directory) for d, _, names in os.walk(directory) for f in names}


def test_a_rank_fetches_only_its_own_zero_shards(s3):
    """What `rank_checkpoint_dir` fetches from a ZeRO checkpoint on S3, for each rank of two."""
    from ray.train import Checkpoint

    from sp2dpo.train.strategy import DeepSpeedStrategy, TorchStrategy
    from sp2dpo.train.trainer import TrainConfig, rank_checkpoint_dir

    root = s3.new_prefix("ckpt")
    shared = ["latest", "trainer_state.json", "zero_to_fp32.py", "ckpt/mp_rank_00_model_states.pt"]
    shards = {r: [f"ckpt/zero_pp_rank_{r}_mp_rank_00_optim_states.pt",
                  f"ckpt/bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt",
                  f"ckpt/zero_pp_rank_{r}_mp_rank_00_model_states.pt"] for r in (0, 1)}
    for name in shared + shards[0] + shards[1]:
        storage.write_text(storage.join_uri(root, name), name)
    cfg = TrainConfig(strategy="deepspeed", num_workers=2)
    for rank in (0, 1):
        needs_file = DeepSpeedStrategy(cfg, 2, rank, torch.device("cpu")).needs_file
        with rank_checkpoint_dir(Checkpoint(root), needs_file) as d:
            assert _files(d) == set(shared + shards[rank])
            assert open(os.path.join(d, shards[rank][0])).read() == shards[rank][0]
    elastic = cfg.model_copy(update={"deepspeed_config": {"zero_optimization": {"elastic_checkpoint": True}}})
    with rank_checkpoint_dir(Checkpoint(root), DeepSpeedStrategy(elastic, 2, 1, torch.device("cpu")).needs_file) as d:
        assert _files(d) == set(shared + shards[0] + shards[1])  # re-partitioned on load: every shard
    with rank_checkpoint_dir(Checkpoint(root), TorchStrategy(cfg, 2, 1, torch.device("cpu")).needs_file) as d:
        assert _files(d) == set(shared + shards[0] + shards[1])


@pytest.mark.slow
def test_killed_zero2_worker_resumes_from_s3_fetching_only_its_shards(s3, tiny_model_dir, ray_local, tmp_path):
    """Two DeepSpeed ZeRO-2 workers, outputs and checkpoints on S3; worker 1 dies before step 4.
    The group resumes from step 2's checkpoint on S3 and ends with the uninterrupted run's losses;
    from that checkpoint layout each rank fetches its own ZeRO shard, not the other rank's."""
    from ray.train import Checkpoint

    from sp2dpo.train.reference import ReferenceConfig, compute_reference
    from sp2dpo.train.sample import build_sample_inputs
    from sp2dpo.train.strategy import DeepSpeedStrategy
    from sp2dpo.train.trainer import TrainConfig, rank_checkpoint_dir, train

    pairs, artifact = build_sample_inputs(tmp_path / "in", limit=16, max_chars=200)
    artifact = compute_reference(ReferenceConfig(artifact=artifact, pairs=pairs, model=str(tiny_model_dir),
                                                 max_length=256), show_progress=False)["artifact"]
    common = dict(artifact=artifact, pairs=pairs, model=str(tiny_model_dir), num_workers=2, strategy="deepspeed",
                  zero_stage=2, max_length=256, learning_rate=2e-3, micro_batch_size=2, max_steps=6,
                  checkpoint_every=2, max_failures=2, compute_reference=False)
    clean = train(TrainConfig(out=str(tmp_path / "clean"), **common), show_progress=False)
    root = s3.new_prefix("killed")
    out, checkpoints = storage.join_uri(root, "run"), storage.join_uri(root, "checkpoints")
    marker = tmp_path / "killed_once"
    killed = train(TrainConfig(out=out, storage_path=checkpoints,
                               fault_injection={"step": 3, "rank": 1, "marker": str(marker)}, **common),
                   show_progress=False)
    assert marker.exists() and killed["resumed_from_steps"] == [2] and clean["resumed_from_steps"] == []
    losses = [[json.loads(line)["loss"]
               for line in storage.read_text(storage.join_uri(d, "metrics.jsonl")).splitlines()]
              for d in (str(tmp_path / "clean"), out)]
    assert len(losses[1]) == 6 and losses[0] == pytest.approx(losses[1], abs=1e-5)
    assert {"model/model.safetensors", "training_summary.json"} <= set(s3.keys(out))

    # The checkpoint on S3 holds both ranks' shards; each rank fetches the shared files and its own.
    last = killed["checkpoint"]
    assert last == storage.join_uri(checkpoints, "sp2dpo-train", "step_0000006")
    on_s3 = set(s3.keys(last))
    shard = {r: f"ckpt/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)}
    assert {shard[0], shard[1], "ckpt/mp_rank_00_model_states.pt", "trainer_state.json"} <= on_s3
    cfg = TrainConfig(**common)
    for rank in (0, 1):
        needs_file = DeepSpeedStrategy(cfg, 2, rank, torch.device("cpu")).needs_file
        with rank_checkpoint_dir(Checkpoint(last), needs_file) as d:
            assert _files(d) == on_s3 - {shard[1 - rank]}
