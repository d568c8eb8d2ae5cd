"""Numbers training can be trusted with: the reference tag (dtype, weights, tokenizer pipeline),
margins of exactly 0 at step 0 (reference pass in training's dtype, dropout off), the learning-rate
schedule against transformers' and TRL's, and label smoothing only where TRL 1.16 agrees."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from sp2dpo.train.sample import build_sample_inputs

    out = tmp_path_factory.mktemp("fidelity")
    pairs, artifact = build_sample_inputs(out, limit=8, max_chars=200)
    return out, pairs, artifact


def _cfg(model, pairs, artifact, out, **kw):
    from sp2dpo.train.config import TrainConfig

    base = {"artifact": artifact, "pairs": pairs, "model": str(model), "out": str(out), "strategy": "torch",
            "max_length": 256, "micro_batch_size": 2, "compute_reference": False}
    return TrainConfig(**{**base, **kw})


def _reference(ref_cfg, out, **update):
    """The reference pass of `ref_cfg`, run here in-process on CPU (this machine has no GPU)."""
    from sp2dpo.train.reference import compute_reference

    cfg = ref_cfg.model_copy(update={"engine": "local", "num_gpus": 0.0, "batch_size": 2, "out": str(out), **update})
    return compute_reference(cfg, show_progress=False)["artifact"]


def _step0_margins(cfg, ref_artifact):
    """Margins β_i·h_i of every trained pair from the policy as the loop builds it (train mode),
    in micro-batches of 2 in table order."""
    from sp2dpo.train.data import load_training_table, tokenize_table
    from sp2dpo.train.logps import make_collator
    from sp2dpo.train.loss import batch_loss
    from sp2dpo.train.trainer import load_student

    model, tok = load_student(cfg)
    model.train()
    table, _ = load_training_table(ref_artifact, cfg.pairs, require_ref=True)
    examples = tokenize_table(table, tok, cfg.max_length)
    collate = make_collator(cfg.shared_prompt, tok.pad_token_id, cfg.max_length)
    with torch.no_grad():
        return torch.cat([batch_loss(model, collate(examples[i: i + 2]), cfg.loss_type).margins.float()
                          for i in range(0, len(examples), 2)])


def margins_differ(margins: torch.Tensor) -> bool:
    return bool(margins.abs().max() > 1e-3)


# ----------------------------------------------------------------------------- the reference tag


def test_reference_tag_names_dtype_weights_and_tokenizer_pipeline(tiny_model_dir, tmp_path):
    from tokenizers import Tokenizer, normalizers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sp2dpo.train.data import reference_tag, tokenizer_hash, weights_digest

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tag = reference_tag(str(tiny_model_dir), tok, 256, "bfloat16")
    assert tag["dtype"] == "bfloat16" and tag["weights_digest"] == weights_digest(str(tiny_model_dir))

    # Weights: a byte-identical copy has the same digest; one weight matrix moved by 1e-3 (an
    # adapter merged into one layer) does not.
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert weights_digest(str(copy)) == tag["weights_digest"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.add_(1e-3)
    model.save_pretrained(tmp_path / "moved")
    assert weights_digest(str(tmp_path / "moved")) != tag["weights_digest"]

    # Tokenizer: the same vocabulary with another normalizer, or one merge fewer, is another tokenizer.
    base = tokenizer_hash(tok)
    lower = AutoTokenizer.from_pretrained(tiny_model_dir)
    lower.backend_tokenizer.normalizer = normalizers.Lowercase()
    assert lower.get_vocab() == tok.get_vocab() and lower("Hi")["input_ids"] != tok("Hi")["input_ids"]
    assert tokenizer_hash(lower) != base
    fewer = json.loads(tok.backend_tokenizer.to_str())
    fewer["model"]["merges"] = fewer["model"]["merges"][:-1]
    fewer_merges = AutoTokenizer.from_pretrained(tiny_model_dir)
    fewer_merges._tokenizer = Tokenizer.from_str(json.dumps(fewer))
    assert fewer_merges.get_vocab() == tok.get_vocab()
    assert tokenizer_hash(fewer_merges) != base
    assert tokenizer_hash(AutoTokenizer.from_pretrained(tiny_model_dir)) == base  # stable across loads


def test_bf16_student_gets_bf16_reference_and_zero_margin_at_step_0(sample, tiny_model_dir, tmp_path):
    """`sp2dpo train`'s own reference pass for a bf16 student runs in bf16, so the policy at step 0
    reproduces the stored log-probs exactly. An fp32 reference (what the pass used to compute)
    gives non-zero margins before any update, and training refuses it naming `dtype`."""
    from sp2dpo.schedule.artifact import ArtifactError
    from sp2dpo.storage import read_sp2dpo_metadata
    from sp2dpo.train.trainer import prepare_artifact, reference_config

    _, pairs, artifact = sample
    # bf16 needs use_gpu; the pass and the policy run on CPU here (no GPU on this machine).
    cfg = _cfg(tiny_model_dir, pairs, artifact, tmp_path, dtype="bfloat16", use_gpu=True)
    ref_cfg = reference_config(cfg)
    assert ref_cfg.dtype == "bfloat16"
    bf16_ref = _reference(ref_cfg, tmp_path / "ref_bf16.parquet")
    assert read_sp2dpo_metadata(bf16_ref)["reference"]["dtype"] == "bfloat16"
    student = cfg.model_copy(update={"artifact": bf16_ref})
    margins = _step0_margins(student, bf16_ref)
    assert margins.numel() == 8 and torch.equal(margins, torch.zeros_like(margins))
    prepare_artifact(student, show_progress=False)  # the tag matches: accepted

    fp32_ref = _reference(ref_cfg, tmp_path / "ref_fp32.parquet", dtype="float32")
    assert margins_differ(_step0_margins(student, fp32_ref))
    with pytest.raises(ArtifactError, match=r"dtype: artifact 'float32' vs training 'bfloat16' \(set dtype"):
        prepare_artifact(cfg.model_copy(update={"artifact": fp32_ref}), show_progress=False)


def test_changed_reference_weights_are_refused(sample, tiny_model_dir, tmp_path):
    """Same path, new weights (a model directory overwritten after the pass): refused."""
    from transformers import AutoModelForCausalLM

    from sp2dpo.schedule.artifact import ArtifactError
    from sp2dpo.train.trainer import prepare_artifact, reference_config

    _, pairs, artifact = sample
    model_dir = tmp_path / "student"
    shutil.copytree(tiny_model_dir, model_dir)
    cfg = _cfg(model_dir, pairs, artifact, tmp_path)
    ref = _reference(reference_config(cfg), tmp_path / "ref.parquet")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.01)
    model.save_pretrained(model_dir)
    with pytest.raises(ArtifactError, match="weights_digest"):
        prepare_artifact(cfg.model_copy(update={"artifact": ref}), show_progress=False)


# ----------------------------------------------------------------------------- dropout


@pytest.fixture(scope="module")
def dropout_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model with attention dropout 0.5 (Llama applies it functionally in train mode)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("dropout") / "model"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.attention_dropout = 0.5
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def test_dropout_is_off_by_default_so_step0_margins_are_zero(sample, dropout_model_dir, tmp_path):
    from sp2dpo.train.trainer import reference_config

    _, pairs, artifact = sample
    cfg = _cfg(dropout_model_dir, pairs, artifact, tmp_path)
    assert cfg.disable_dropout  # TRL's default
    ref = _reference(reference_config(cfg), tmp_path / "ref.parquet")
    off = _step0_margins(cfg, ref)
    torch.testing.assert_close(off, torch.zeros_like(off), rtol=0, atol=1e-6)
    torch.manual_seed(0)
    on = _step0_margins(cfg.model_copy(update={"disable_dropout": False}), ref)
    assert margins_differ(on)  # dropout really is active when left on


def test_trl_route_gets_the_same_dropout_setting(sample, dropout_model_dir, tmp_path):
    """`dpo_config` passes disable_dropout through, and the TRL route zeroes the functional
    attention dropout too (TRL's own helper only reaches nn.Dropout modules)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.trainer.utils import disable_dropout_in_model

    from sp2dpo.schedule.artifact import training_pairs
    from sp2dpo.train.data import conversation
    from sp2dpo.train.trl_trainer import PerPairBetaDPOTrainer, dpo_config

    _, pairs, artifact = sample
    rows = training_pairs(artifact, pairs).to_pylist()
    dataset = Dataset.from_list([dict(conversation(r["prompt"], r["prompt_messages"], r["chosen"], r["rejected"]),
                                      beta=r["beta"]) for r in rows])

    def attention_rates(model):
        return {m.attention_dropout for m in model.modules() if hasattr(m, "attention_dropout")}

    stock = AutoModelForCausalLM.from_pretrained(dropout_model_dir)
    disable_dropout_in_model(stock)
    assert attention_rates(stock) == {0.5}  # what TRL's helper leaves on
    for disable, rates in ((True, {0.0}), (False, {0.5})):
        cfg = _cfg(dropout_model_dir, pairs, artifact, tmp_path, disable_dropout=disable)
        args = dpo_config(cfg, str(tmp_path / "trl"))
        assert args.disable_dropout is disable
        trainer = PerPairBetaDPOTrainer(model=AutoModelForCausalLM.from_pretrained(dropout_model_dir),
                                        ref_model=AutoModelForCausalLM.from_pretrained(dropout_model_dir), args=args,
                                        train_dataset=dataset,
                                        processing_class=AutoTokenizer.from_pretrained(dropout_model_dir))
        assert attention_rates(trainer.model) == rates and attention_rates(trainer.ref_model) == rates


# ----------------------------------------------------------------------------- learning-rate schedule


def _own_lrs(cfg, model_dir, total, in_backward=False):
    from transformers import AutoModelForCausalLM

    from sp2dpo.train.strategy import TorchStrategy

    strategy = TorchStrategy(cfg, 1, 0, torch.device("cpu"))
    strategy.prepare(AutoModelForCausalLM.from_pretrained(model_dir), total)
    lrs = []
    for _ in range(total):
        lrs.append(strategy.optimizer.param_groups[0]["lr"])  # the rate this step's update uses
        strategy.step()
    return lrs


@pytest.mark.parametrize("schedule, warmup", [("cosine", {"warmup_ratio": 0.1}), ("linear", {"warmup_steps": 3}),
                                              ("constant_with_warmup", {"warmup_ratio": 0.25}),
                                              ("constant", {})])
def test_lr_schedule_equals_transformers_and_trl(sample, tiny_model_dir, tmp_path, schedule, warmup):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

    from sp2dpo.train.trl_trainer import PerPairBetaDPOTrainer, dpo_config

    _, pairs, artifact = sample
    total = 12
    cfg = _cfg(tiny_model_dir, pairs, artifact, tmp_path, learning_rate=1e-3, lr_scheduler_type=schedule, **warmup)
    n_warmup = warmup.get("warmup_steps") or math.ceil(total * warmup.get("warmup_ratio", 0))  # HF Trainer's rule
    clock = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    reference = get_scheduler(schedule, clock, num_warmup_steps=n_warmup, num_training_steps=total)
    expected = []
    for _ in range(total):
        expected.append(clock.param_groups[0]["lr"])
        clock.step()
        reference.step()
    assert len(set(expected)) > 1 or schedule == "constant"

    assert _own_lrs(cfg, tiny_model_dir, total) == expected
    in_backward = cfg.model_copy(update={"optimizer_in_backward": True, "max_grad_norm": 0.0})
    assert _own_lrs(in_backward, tiny_model_dir, total) == expected

    dataset = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c", "beta": 0.1}])
    trainer = PerPairBetaDPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                    args=dpo_config(cfg, str(tmp_path)), train_dataset=dataset,
                                    processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
    trainer.create_optimizer_and_scheduler(num_training_steps=total)
    trl_lrs = []
    for _ in range(total):
        trl_lrs.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert trl_lrs == pytest.approx(expected, rel=1e-12, abs=0)


def test_schedule_settings_that_would_be_ignored_are_refused():
    from pydantic import ValidationError

    from sp2dpo.train.config import TrainConfig

    with pytest.raises(ValidationError, match="warmup_steps or warmup_ratio"):
        TrainConfig(warmup_steps=10, warmup_ratio=0.1)
    with pytest.raises(ValidationError, match="constant_with_warmup"):
        TrainConfig(lr_scheduler_type="constant", warmup_ratio=0.1)
    assert TrainConfig().lr_scheduler_type == "linear"  # TRL's and HF Trainer's default


# ----------------------------------------------------------------------------- label smoothing


def test_label_smoothing_only_where_trl_applies_it():
    from pydantic import ValidationError

    from sp2dpo.train.config import TrainConfig

    for loss in ("sigmoid", "hinge", "ipo"):
        with pytest.raises(ValidationError, match="loss_type=robust"):
            TrainConfig(loss_type=loss, label_smoothing=0.1)
    assert TrainConfig(loss_type="robust", label_smoothing=0.1).label_smoothing == 0.1
