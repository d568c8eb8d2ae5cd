"""Two Ray Train workers with DeepSpeed ZeRO-2 over gloo on CPU: the loss decreases, a worker
killed mid-run is replaced and the run resumes from the last checkpoint, and the final HF
directory reloads and generates. GPU variants (NCCL, bf16, ZeRO-3) run where CUDA exists."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def sample_with_ref(tmp_path_factory, tiny_model_dir):
    from sp2dpo.train.reference import ReferenceConfig, compute_reference
    from sp2dpo.train.sample import build_sample_inputs

    out = tmp_path_factory.mktemp("dist")
    pairs, artifact = build_sample_inputs(out, limit=16, max_chars=200)
    summary = compute_reference(ReferenceConfig(artifact=artifact, pairs=pairs, model=str(tiny_model_dir),
                                                max_length=256), show_progress=False)
    return pairs, summary["artifact"]


def _generates(model_dir) -> bool:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt")
    return model.generate(**ids, max_new_tokens=4, do_sample=False).shape[1] == ids["input_ids"].shape[1] + 4


@pytest.mark.slow
def test_two_workers_deepspeed_zero2_killed_worker_resumes(sample_with_ref, tiny_model_dir, ray_local, tmp_path):
    from sp2dpo.train.trainer import TrainConfig, train

    pairs, artifact = sample_with_ref
    marker = tmp_path / "killed_once"
    cfg = TrainConfig(
        artifact=artifact, pairs=pairs, model=str(tiny_model_dir), out=str(tmp_path / "run"),
        num_workers=2, strategy="deepspeed", zero_stage=2, max_length=256, learning_rate=2e-3,
        micro_batch_size=2, epochs=3, checkpoint_every=3, max_failures=2, compute_reference=False,
        # Worker 1 dies abruptly before step 5: the last checkpoint is step 3.
        fault_injection={"step": 4, "rank": 1, "marker": str(marker)},
    )
    summary = train(cfg, show_progress=False)
    assert marker.exists()  # the fault really happened
    assert summary["resumed_from_steps"] == [3]
    assert summary["steps"] == 12 and summary["num_workers"] == 2 and summary["strategy"] == "deepspeed-zero2"
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == list(range(1, 13))  # steps 4.. redone once, not duplicated
    assert history[-1]["pairs"] == 4  # 2 pairs on each of 2 workers, all-reduced
    assert sum(h["loss"] for h in history[-4:]) < sum(h["loss"] for h in history[:4])
    assert _generates(tmp_path / "run" / "model")


@pytest.mark.slow
def test_resumed_run_matches_uninterrupted_run(sample_with_ref, tiny_model_dir, ray_local, tmp_path):
    """Resume restores weights, optimizer, scheduler and data order: the same losses either way."""
    from sp2dpo.train.trainer import TrainConfig, train

    pairs, artifact = sample_with_ref
    common = dict(artifact=artifact, pairs=pairs, model=str(tiny_model_dir), num_workers=1, strategy="torch",
                  max_length=256, learning_rate=2e-3, micro_batch_size=2, max_steps=6, checkpoint_every=2,
                  compute_reference=False)
    train(TrainConfig(out=str(tmp_path / "clean"), **common), show_progress=False)
    killed = train(TrainConfig(out=str(tmp_path / "killed"),
                               fault_injection={"step": 3, "marker": str(tmp_path / "m")}, **common),
                   show_progress=False)
    assert killed["resumed_from_steps"] == [2]
    losses = [[json.loads(line)["loss"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("clean", "killed")]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


@pytest.mark.gpu
def test_gpu_deepspeed_zero3_bf16_saves_gathered_model(sample_with_ref, tiny_model_dir, ray_local, tmp_path):
    from sp2dpo.train.trainer import TrainConfig, train

    pairs, artifact = sample_with_ref
    n_gpus = torch.cuda.device_count()
    cfg = TrainConfig(artifact=artifact, pairs=pairs, model=str(tiny_model_dir), out=str(tmp_path / "run"),
                      num_workers=n_gpus, use_gpu=True, strategy="deepspeed", zero_stage=3, dtype="bfloat16",
                      max_length=256, learning_rate=2e-3, micro_batch_size=2, max_steps=4, compute_reference=False)
    summary = train(cfg, show_progress=False)
    assert summary["steps"] == 4
    assert _generates(tmp_path / "run" / "model")
