"""Our own loop (offline reference log-probs, no reference model): equivalence with the TRL route,
refusals before training starts, and a single-worker Ray Train run end to end."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def sample_with_ref(tmp_path_factory, tiny_model_dir):
    from sp2dpo.train.reference import ReferenceConfig, compute_reference
    from sp2dpo.train.sample import build_sample_inputs

    out = tmp_path_factory.mktemp("loop")
    pairs, artifact = build_sample_inputs(out, limit=8, max_chars=200)
    summary = compute_reference(ReferenceConfig(artifact=artifact, pairs=pairs, model=str(tiny_model_dir),
                                                max_length=256), show_progress=False)
    return out, pairs, artifact, summary["artifact"]


def _cfg(tiny_model_dir, pairs, artifact, out, **kw):
    from sp2dpo.train.config import TrainConfig

    base = dict(artifact=artifact, pairs=pairs, model=str(tiny_model_dir), out=str(out), strategy="torch",
                max_length=256, learning_rate=2e-3, micro_batch_size=2, checkpoint_every=4, compute_reference=False)
    return TrainConfig(**{**base, **kw})


def test_own_loop_equals_trl_route_on_the_same_batch(sample_with_ref, tiny_model_dir, tmp_path):
    """Same batch, same weights: our loss (offline reference log-probs, no reference model held)
    and PerPairBetaDPOTrainer (reference model run in the loop) agree on loss and gradients."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig

    from sp2dpo.train.data import PerPairCollator, conversation, load_training_table, tokenize_table
    from sp2dpo.train.logps import load_causal_lm
    from sp2dpo.train.loss import batch_loss
    from sp2dpo.train.trl_trainer import PerPairBetaDPOTrainer

    out, pairs, _, ref_artifact = sample_with_ref
    table, _ = load_training_table(ref_artifact, pairs, require_ref=True)
    cfg = _cfg(tiny_model_dir, pairs, ref_artifact, tmp_path)

    ours, tok = load_causal_lm(str(tiny_model_dir))
    examples = tokenize_table(table, tok, 256)
    batch = PerPairCollator(tok.pad_token_id, max_length=256)(examples[:6])
    assert "ref_chosen_logps" in batch and len(set(batch["beta"].tolist())) > 1  # per-pair β, offline refs
    loss = batch_loss(ours, batch, cfg.loss_type).losses.mean()
    loss.backward()

    rows = [dict(conversation(r["prompt"], r["prompt_messages"], r["chosen"], r["rejected"]), beta=r["beta"])
            for r in table.to_pylist()]
    trl = PerPairBetaDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
        ref_model=AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
        args=DPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, report_to=[], max_length=256,
                       gradient_checkpointing=False),
        train_dataset=Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    trl_batch = trl.data_collator([trl.train_dataset[i] for i in range(6)])
    assert torch.equal(trl_batch["input_ids"], batch["input_ids"])
    trl.model.train()
    trl_loss = trl.compute_loss(trl.model, trl_batch)
    trl_loss.backward()
    torch.testing.assert_close(loss, trl_loss, rtol=0, atol=1e-5)
    trl_grads = dict(trl.model.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, trl_grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_train_refuses_foreign_reference_and_uncovered_pairs(sample_with_ref, tiny_model_dir, tmp_path):
    from sp2dpo.schedule.artifact import ArtifactError
    from sp2dpo.storage import read_parquet, read_sp2dpo_metadata, write_parquet
    from sp2dpo.train.trainer import prepare_artifact

    _, pairs, artifact, ref_artifact = sample_with_ref
    # Log-probs tagged for another reference model.
    with pytest.raises(ArtifactError, match="another reference.*model_id"):
        prepare_artifact(_cfg(tiny_model_dir, pairs, ref_artifact, tmp_path, reference_model="smollm2"), False)
    # ... or another max_length (other sequences were scored).
    with pytest.raises(ArtifactError, match="max_length"):
        prepare_artifact(_cfg(tiny_model_dir, pairs, ref_artifact, tmp_path, max_length=128), False)
    # Log-probs with no tag at all.
    table = read_parquet(ref_artifact)
    meta = {k: v for k, v in read_sp2dpo_metadata(ref_artifact).items() if k != "reference"}
    untagged = str(tmp_path / "untagged.parquet")
    write_parquet(table.replace_schema_metadata({}), untagged, meta)
    with pytest.raises(ArtifactError, match="no `reference` tag"):
        prepare_artifact(_cfg(tiny_model_dir, pairs, untagged, tmp_path), False)
    # An artifact that does not cover the pairs table exactly.
    fewer = str(tmp_path / "pairs_fewer.parquet")
    write_parquet(read_parquet(pairs).slice(0, 6), fewer)
    with pytest.raises(ArtifactError, match="not in the pairs table"):
        prepare_artifact(_cfg(tiny_model_dir, fewer, ref_artifact, tmp_path), False)
    # No reference log-probs and not allowed to compute them.
    with pytest.raises(ArtifactError, match="no reference log-probs"):
        prepare_artifact(_cfg(tiny_model_dir, pairs, artifact, tmp_path), False)
    # Fewer pairs than one global batch.
    with pytest.raises(ValueError, match="fewer than one global batch"):
        prepare_artifact(_cfg(tiny_model_dir, pairs, ref_artifact, tmp_path, micro_batch_size=16), False)


def test_config_refuses_bf16_on_cpu():
    from pydantic import ValidationError

    from sp2dpo.train.config import TrainConfig

    with pytest.raises(ValidationError, match="use_gpu"):
        TrainConfig(dtype="bfloat16")
    assert TrainConfig(dtype="bfloat16", use_gpu=True).dtype == "bfloat16"


def test_config_fields_are_described_and_output_dir_is_read_as_out():
    from typer.testing import CliRunner

    from sp2dpo.cli import app
    from sp2dpo.train.config import TrainConfig

    assert [name for name, f in TrainConfig.model_fields.items() if not f.description] == []
    with pytest.warns(DeprecationWarning, match="use `out`"):
        old = TrainConfig.model_validate({"output_dir": "runs/old"})
    assert old.out == "runs/old" and "output_dir" not in old.model_dump()
    assert TrainConfig.model_validate(old.model_dump()).out == "runs/old"
    help_text = CliRunner().invoke(app, ["train", "--help"]).output
    assert "--out" in help_text and "--output-dir" not in help_text  # a hidden alias


def _strategy_steps(tiny_model_dir, ref_artifact, pairs, cfg, steps, start=0, checkpoint_in=None, checkpoint_out=None):
    """Plain-torch strategy over `steps` fixed batches (no Ray): the weights it ends with."""
    from sp2dpo.train.data import PerPairCollator, load_training_table, tokenize_table
    from sp2dpo.train.logps import load_causal_lm
    from sp2dpo.train.loss import batch_loss
    from sp2dpo.train.strategy import TorchStrategy

    model, tok = load_causal_lm(str(tiny_model_dir))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.train()
    table, _ = load_training_table(ref_artifact, pairs, require_ref=True)
    examples = tokenize_table(table, tok, 256)
    collate = PerPairCollator(tok.pad_token_id, max_length=256)
    strategy = TorchStrategy(cfg, 1, 0, torch.device("cpu"))
    strategy.prepare(model, total_steps=4)  # one schedule over 4 steps, so split and straight runs agree
    if checkpoint_in:
        strategy.load_checkpoint(checkpoint_in)
    grads_after_backward = []
    for i in range(start, start + steps):
        batch = collate(examples[(2 * i) % 8: (2 * i) % 8 + 2])
        strategy.backward(batch_loss(strategy.model, batch, cfg.loss_type).losses.mean())
        grads_after_backward.append(sum(p.grad is not None for p in model.parameters()))
        strategy.step()
    if checkpoint_out:
        strategy.save_checkpoint(checkpoint_out)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, grads_after_backward, strategy


@pytest.mark.parametrize("checkpointing", [False, True])
def test_optimizer_in_backward_equals_plain_adamw_and_holds_no_gradients(sample_with_ref, tiny_model_dir, tmp_path,
                                                                         checkpointing):
    """AdamW fused into backward takes the same steps as plain AdamW (clipping off in both), the
    warmup schedule included, yet after each backward no parameter holds a gradient. With
    gradient checkpointing too: a recomputed layer runs before any of its weights is updated."""
    _, pairs, _, ref_artifact = sample_with_ref
    common = dict(max_grad_norm=0.0, warmup_steps=2, weight_decay=0.01, gradient_checkpointing=checkpointing)
    plain_cfg = _cfg(tiny_model_dir, pairs, ref_artifact, tmp_path, **common)
    fused_cfg = _cfg(tiny_model_dir, pairs, ref_artifact, tmp_path, optimizer_in_backward=True, **common)
    plain, plain_grads, plain_strategy = _strategy_steps(tiny_model_dir, ref_artifact, pairs, plain_cfg, 4)
    fused, fused_grads, fused_strategy = _strategy_steps(tiny_model_dir, ref_artifact, pairs, fused_cfg, 4)
    start, _, _ = _strategy_steps(tiny_model_dir, ref_artifact, pairs, plain_cfg, 0)
    assert plain_grads[0] > 0 and fused_grads == [0, 0, 0, 0]
    assert fused_strategy.optimizer.param_groups[0]["lr"] == plain_strategy.optimizer.param_groups[0]["lr"]
    for name in plain:
        assert not torch.equal(plain[name], start[name]), name  # every tensor really moved
        torch.testing.assert_close(fused[name], plain[name], rtol=0, atol=1e-6, msg=name)


def test_optimizer_in_backward_resumes_from_its_checkpoint(sample_with_ref, tiny_model_dir, tmp_path):
    _, pairs, _, ref_artifact = sample_with_ref
    cfg = _cfg(tiny_model_dir, pairs, ref_artifact, tmp_path, optimizer_in_backward=True, max_grad_norm=0.0,
               warmup_steps=3)
    straight, _, _ = _strategy_steps(tiny_model_dir, ref_artifact, pairs, cfg, 4)
    _strategy_steps(tiny_model_dir, ref_artifact, pairs, cfg, 2, checkpoint_out=str(tmp_path))
    resumed, _, strategy = _strategy_steps(tiny_model_dir, ref_artifact, pairs, cfg, 2, start=2,
                                           checkpoint_in=str(tmp_path))
    assert strategy.optimizer.steps == 4
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("setting, needs", [
    ({"strategy": "deepspeed"}, "strategy=torch"),
    ({"num_workers": 2}, "num_workers=1"),
    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps=1"),
    ({"max_grad_norm": 1.0}, "max_grad_norm=0"),
])
def test_optimizer_in_backward_refuses_what_needs_every_gradient(setting, needs):
    from pydantic import ValidationError

    from sp2dpo.train.config import TrainConfig

    ok = {"strategy": "torch", "max_grad_norm": 0.0}
    assert TrainConfig(optimizer_in_backward=True, **ok).optimizer_in_backward
    with pytest.raises(ValidationError, match=needs):
        TrainConfig(optimizer_in_backward=True, **{**ok, **setting})


def test_deepspeed_config_from_yaml_values():
    from sp2dpo.train.config import TrainConfig
    from sp2dpo.train.strategy import deepspeed_config

    cfg = TrainConfig(zero_stage=3, micro_batch_size=4, gradient_accumulation_steps=2,
                      deepspeed_config={"zero_optimization": {"offload_optimizer": {"device": "cpu"}}})
    ds = deepspeed_config(cfg, world_size=8)
    assert ds["train_batch_size"] == 64
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert ds["bf16"]["enabled"] is False


def test_single_worker_ray_train_run(sample_with_ref, tiny_model_dir, ray_local, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sp2dpo.train.trainer import train

    _, pairs, _, ref_artifact = sample_with_ref
    out = tmp_path / "run"
    summary = train(_cfg(tiny_model_dir, pairs, ref_artifact, out, epochs=3), show_progress=False)
    assert summary["steps"] == 12 and summary["pairs_trained"] == 24
    assert summary["final_loss"] < summary["first_loss"]
    # The tokens trained on (a count, as tokens/s uses it) and the token cache are two keys.
    assert isinstance(summary["tokens"], int) and summary["tokens"] > 0
    assert summary["tokens_per_s"] == pytest.approx(summary["tokens"] / summary["train_seconds"], rel=0.01)
    assert summary["token_cache"].endswith(".parquet") and summary["token_cache_reused"] is False
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == list(range(1, 13))
    assert sum(h["loss"] for h in history[-4:]) < sum(h["loss"] for h in history[:4])
    # Per-category diagnostics: every category of the artifact is reported with its pair count.
    assert sum(c["pairs"] for c in summary["per_category"].values()) == 24
    assert all(0.0 <= c["accuracy"] <= 1.0 for c in summary["per_category"].values())
    assert any(k.startswith("margins/") for k in history[0])
    assert json.loads((out / "training_summary.json").read_text())["steps"] == 12
    assert (out / "training_curves.png").stat().st_size > 10_000
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    # The final model is a plain HF directory that reloads and generates.
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == ids["input_ids"].shape[1] + 5
    # The trained weights differ from the start; the reference model was never loaded by the loop.
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(start.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)


def _reduce_in_group(rank: int, world: int, backend: str, simulate_nccl: bool, init_file: str, results) -> None:
    """One process of a real process group: MetricSums.reduce on sums that differ by rank, with
    every all_reduce recorded (and, when `simulate_nccl`, checked the way NCCL checks it)."""
    import torch.distributed as dist

    from sp2dpo.train.metrics import MetricSums

    if backend == "nccl":
        torch.cuda.set_device(0)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        real_all_reduce, seen = dist.all_reduce, []

        def recorded(tensor, *args, **kwargs):
            seen.append(tensor.device.type)
            if not simulate_nccl:
                return real_all_reduce(tensor, *args, **kwargs)
            # NCCL's own check: a tensor not on a CUDA device has no backend to reduce it.
            if tensor.device.type != "cuda":
                raise RuntimeError(f"No backend type associated with device type {tensor.device.type}")
            host = tensor.cpu()
            real_all_reduce(host)  # the values really are summed across the processes, over gloo
            tensor.copy_(host)

        dist.all_reduce = recorded
        if simulate_nccl:
            dist.get_backend = lambda group=None: "nccl"
        sums = MetricSums(3)
        sums.total += rank + 1
        sums.by_category[rank % 3] += 1
        try:
            sums.reduce()
            results.put({"rank": rank, "seen": seen, "total": sums.total.tolist(),
                         "by_category": sums.by_category.tolist(), "device": sums.total.device.type})
        except Exception as e:  # reported to the test, which decides
            results.put({"rank": rank, "seen": seen, "error": f"{type(e).__name__}: {e}"})
    finally:
        dist.destroy_process_group()


def _run_group(tmp_path, world: int, backend: str, simulate_nccl: bool) -> list[dict]:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    init_file = str(tmp_path / f"pg-{backend}-{simulate_nccl}")
    procs = [ctx.Process(target=_reduce_in_group, args=(r, world, backend, simulate_nccl, init_file, results))
             for r in range(world)]
    for p in procs:
        p.start()
    out = sorted((results.get(timeout=240) for _ in procs), key=lambda r: r["rank"])
    for p in procs:
        p.join(timeout=60)
    return out


def test_metric_sums_reduce_on_the_backends_device_simulated_nccl(tmp_path):
    """There is no GPU here, so this SIMULATES NCCL's device check; it does not run NCCL.

    A real 2-process gloo group. First as gloo: reduce hands all_reduce a CPU tensor and gets the
    sums of both ranks back. Then the group presents itself as NCCL (`get_backend` says "nccl")
    and all_reduce refuses non-CUDA tensors as NCCL does ("No backend type associated with device
    type cpu", what every multi-GPU run hit at its first logged step): reduce must put the tensor
    on CUDA first. On a CPU-only torch that move itself fails ("Torch not compiled with CUDA"),
    which shows reduce asked for the backend's device; with CUDA present it completes. The real
    NCCL run is test_metric_sums_reduce_over_real_nccl (gpu)."""
    for rank in _run_group(tmp_path, 2, "gloo", simulate_nccl=False):
        assert rank["seen"] == ["cpu"]
        assert rank["total"] == [3.0] * 8  # 1 + 2: both ranks' sums
        assert rank["by_category"] == [[1.0] * 3, [1.0] * 3, [0.0] * 3]
        assert rank["device"] == "cpu"
    for rank in _run_group(tmp_path, 2, "gloo", simulate_nccl=True):
        assert "No backend type associated" not in rank.get("error", ""), rank
        if torch.cuda.is_available():
            assert rank["seen"] == ["cuda"] and rank["total"] == [3.0] * 8 and rank["device"] == "cpu"
        else:
            assert rank["seen"] == [] and "Torch not compiled with CUDA" in rank["error"], rank


@pytest.mark.gpu
def test_metric_sums_reduce_over_real_nccl(tmp_path):
    """A 1-process NCCL group on the GPU: reduce runs its collective (at world size 1 too) on a
    CUDA tensor and leaves the sums on the host."""
    (rank,) = _run_group(tmp_path, 1, "nccl", simulate_nccl=False)
    assert "error" not in rank, rank
    assert rank["seen"] == ["cuda"] and rank["total"] == [1.0] * 8 and rank["device"] == "cpu"
    assert rank["by_category"] == [[1.0] * 3, [0.0] * 3, [0.0] * 3]


def test_train_passes_hub_settings_through_and_never_forces_them(sample_with_ref, tiny_model_dir, ray_local,
                                                                 tmp_path, monkeypatch):
    """The Ray Train workers get HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE only when the driver has
    them set (a cluster that reaches the hub keeps reaching it)."""
    import ray.train.torch

    from sp2dpo.train.trainer import train

    worker_env = []

    class Stop(Exception):
        pass

    class CapturingTrainer:
        def __init__(self, *args, run_config, **kwargs):
            worker_env.append(run_config.worker_runtime_env["env_vars"])

        def fit(self):
            raise Stop

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", CapturingTrainer)
    _, pairs, _, ref_artifact = sample_with_ref
    cfg = _cfg(tiny_model_dir, pairs, ref_artifact, tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with pytest.raises(Stop):
        train(cfg, show_progress=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    with pytest.raises(Stop):
        train(cfg, show_progress=False)
    assert "HF_HUB_OFFLINE" not in worker_env[0] and "TRANSFORMERS_OFFLINE" not in worker_env[0]
    assert worker_env[1]["HF_HUB_OFFLINE"] == "0" and worker_env[1]["TRANSFORMERS_OFFLINE"] == "1"
