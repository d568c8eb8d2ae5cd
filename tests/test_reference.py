"""Offline reference log-probs: the Ray Data pass, the artifact it writes, and equality with the
reference log-probs TRL computes in the loop."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from sp2dpo.train.sample import build_sample_inputs

    out = tmp_path_factory.mktemp("ref")
    pairs, artifact = build_sample_inputs(out, limit=8, max_chars=200)
    return out, pairs, artifact


@pytest.fixture(scope="module")
def local_ref(sample, tiny_model_dir):
    from sp2dpo.train.reference import ReferenceConfig, compute_reference

    out, pairs, artifact = sample
    cfg = ReferenceConfig(artifact=artifact, pairs=pairs, model=str(tiny_model_dir), max_length=512, batch_size=3,
                          out=str(out / "beta_ref_local.parquet"))
    return cfg, compute_reference(cfg, show_progress=False)


def test_reference_pass_writes_tagged_artifact_keeping_metadata(sample, local_ref, tiny_model_dir):
    from transformers import AutoTokenizer

    from sp2dpo.schedule.artifact import read_artifact, training_pairs
    from sp2dpo.train.data import reference_tag

    _, pairs, artifact = sample
    cfg, summary = local_ref
    before, meta_before = read_artifact(artifact)
    after, meta_after = read_artifact(summary["artifact"])
    assert after.num_rows == before.num_rows
    assert after["pair_id"].to_pylist() == before["pair_id"].to_pylist()
    assert {k: v for k, v in meta_after.items() if k != "reference"} == meta_before
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert meta_after["reference"] == reference_tag(str(tiny_model_dir), tokenizer, 512)
    trained = training_pairs(summary["artifact"], pairs)
    assert summary["scored_pairs"] == trained.num_rows
    assert trained["ref_chosen_logps"].null_count == 0
    assert all(v < 0 for v in trained["ref_chosen_logps"].to_pylist() + trained["ref_rejected_logps"].to_pylist())
    dropped = after.filter(after["dropped"])
    assert dropped["ref_chosen_logps"].null_count == dropped.num_rows


def test_offline_reference_equals_trl_in_loop_reference(sample, local_ref, tiny_model_dir, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from sp2dpo.schedule.artifact import training_pairs
    from sp2dpo.train.data import conversation

    _, pairs, _ = sample
    _, summary = local_ref
    rows = training_pairs(summary["artifact"], pairs).to_pylist()
    dataset = Dataset.from_list([conversation(r["prompt"], r["prompt_messages"], r["chosen"], r["rejected"])
                                 for r in rows])
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
        ref_model=AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
        args=DPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], gradient_checkpointing=False,
                       max_length=512),
        train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    # Another batching and layout than the offline pass (TRL's two rows per pair, 5 pairs, vs one row
    # per pair, 3 pairs): neither may matter. Sums of up to ~800 nats agree to float32 rounding.
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(5)])
    with torch.no_grad():
        in_loop_chosen, in_loop_rejected = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    offline_chosen = torch.tensor([r["ref_chosen_logps"] for r in rows[:5]], dtype=torch.float32)
    offline_rejected = torch.tensor([r["ref_rejected_logps"] for r in rows[:5]], dtype=torch.float32)
    torch.testing.assert_close(offline_chosen, in_loop_chosen, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(offline_rejected, in_loop_rejected, rtol=1e-6, atol=1e-4)


def test_ray_data_pass_matches_local(sample, local_ref, ray_local, tiny_model_dir):
    from sp2dpo.schedule.artifact import read_artifact
    from sp2dpo.train.reference import compute_reference

    out, _, _ = sample
    cfg, local_summary = local_ref
    ray_cfg = cfg.model_copy(update={"engine": "ray", "num_workers": 1, "out": str(out / "beta_ref_ray.parquet")})
    summary = compute_reference(ray_cfg, show_progress=False)
    assert summary["scored_pairs"] == local_summary["scored_pairs"]
    local, _ = read_artifact(local_summary["artifact"])
    remote, meta = read_artifact(summary["artifact"])
    assert meta["reference"] == local_summary["reference"]
    for name in ("ref_chosen_logps", "ref_rejected_logps"):
        a = torch.tensor([v if v is not None else 0.0 for v in local[name].to_pylist()])
        b = torch.tensor([v if v is not None else 0.0 for v in remote[name].to_pylist()])
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_reference_pass_refuses_mismatched_artifact(sample, tmp_path, tiny_model_dir):
    import pyarrow.parquet as pq

    from sp2dpo.schedule.artifact import ArtifactError
    from sp2dpo.storage import read_parquet, write_parquet
    from sp2dpo.train.reference import ReferenceConfig, compute_reference

    _, pairs, artifact = sample
    fewer = str(tmp_path / "fewer_pairs.parquet")
    write_parquet(read_parquet(pairs).slice(0, 5), fewer)
    with pytest.raises(ArtifactError, match="pairs"):
        compute_reference(ReferenceConfig(artifact=artifact, pairs=fewer, model=str(tiny_model_dir),
                                          out=str(tmp_path / "x.parquet")), show_progress=False)
    assert not (tmp_path / "x.parquet").exists()
    assert pq.read_table(artifact).num_rows == 8  # input untouched


def test_cli_reference_json_and_train_clear_errors(sample, tiny_model_dir, tmp_path):
    import json
    import subprocess
    import sys

    _, pairs, artifact = sample
    out = tmp_path / "cli_ref.parquet"
    cli = [sys.executable, "-m", "sp2dpo.cli"]
    proc = subprocess.run([*cli, "train", "reference", "--artifact", artifact, "--pairs", pairs, "--model",
                           str(tiny_model_dir), "--out", str(out), "--max-length", "512", "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["artifact"] == str(out) and summary["scored_pairs"] == 8 and out.exists()
    # Training on log-probs made with max_length=512 but asking for 256: refused, one line, no traceback.
    proc = subprocess.run([*cli, "train", "--artifact", str(out), "--pairs", pairs, "--model", str(tiny_model_dir),
                           "-o", str(tmp_path / "t"), "--set", "max_length=256", "--set", "strategy=torch", "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "another reference" in proc.stderr and "max_length" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "t" / "model").exists()
