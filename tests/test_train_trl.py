"""The TRL route: `PerPairBetaDPOTrainer` against stock TRL 1.16 `DPOTrainer` on a tiny model."""

from __future__ import annotations

import pyarrow.compute as pc
import pytest
import torch

from sp2dpo.train.loss import dpo_loss

pytestmark = pytest.mark.filterwarnings("ignore")
BASE_BETA = 0.1


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from sp2dpo.train.data import load_training_table
    from sp2dpo.train.sample import build_sample_inputs

    pairs, artifact = build_sample_inputs(tmp_path_factory.mktemp("trl"), limit=64, max_chars=200)
    table, _ = load_training_table(artifact, pairs)
    # The 8 shortest pairs: TRL's log-prob head costs per padded token on a CPU, and the longest
    # of the first 8 would pad every row to 246 tokens (here 109).
    chars = pc.add(pc.utf8_length(table["prompt"]),
                   pc.max_element_wise(pc.utf8_length(table["chosen"]), pc.utf8_length(table["rejected"])))
    shortest = sorted(pc.sort_indices(chars).to_pylist()[:8])
    assert len(shortest) == 8
    return table.take(shortest)


def _dataset(table, beta=None):
    from datasets import Dataset

    from sp2dpo.train.data import conversation

    rows = []
    for r in table.to_pylist():
        row = conversation(r["prompt"], r["prompt_messages"], r["chosen"], r["rejected"])
        if beta is not None:
            row["beta"] = beta(r) if callable(beta) else beta
        rows.append(row)
    return Dataset.from_list(rows)


def _models(tiny_model_dir):
    """A reference and a policy that differs from it (so log-ratios h are not all zero)."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return policy, ref


def _args(tmp_path, **kw):
    from trl import DPOConfig

    return DPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, beta=BASE_BETA, per_device_train_batch_size=4,
                     gradient_checkpointing=False, report_to=[], seed=0, **{"max_length": 512, **kw})


def _trainer(cls, tiny_model_dir, tmp_path, dataset, **kw):
    from transformers import AutoTokenizer

    policy, ref = _models(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return cls(model=policy, ref_model=ref, args=_args(tmp_path, **kw), train_dataset=dataset, processing_class=tok)


def _loss_and_grads(trainer, batch):
    trainer.model.zero_grad()
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_constant_beta_equals_stock_trl_loss_and_gradients(sample, tiny_model_dir, tmp_path):
    from trl import DPOTrainer

    from sp2dpo.train.trl_trainer import PerPairBetaDPOTrainer

    stock = _trainer(DPOTrainer, tiny_model_dir, tmp_path / "a", _dataset(sample))
    ours = _trainer(PerPairBetaDPOTrainer, tiny_model_dir, tmp_path / "b", _dataset(sample, BASE_BETA))
    rows = list(range(8))
    stock_batch = stock.data_collator([stock.train_dataset[i] for i in rows])
    our_batch = ours.data_collator([ours.train_dataset[i] for i in rows])
    assert torch.equal(stock_batch["input_ids"], our_batch["input_ids"])
    assert our_batch["beta"].tolist() == [pytest.approx(BASE_BETA)] * len(rows)
    stock_loss, stock_grads = _loss_and_grads(stock, stock_batch)
    our_loss, our_grads = _loss_and_grads(ours, our_batch)
    assert abs(stock_loss.item() - torch.log(torch.tensor(2.0)).item()) > 1e-3  # h != 0: a real test
    torch.testing.assert_close(our_loss, stock_loss, rtol=0, atol=1e-6)
    assert stock_grads.keys() == our_grads.keys() and len(stock_grads) > 5
    for name in stock_grads:
        torch.testing.assert_close(our_grads[name], stock_grads[name], rtol=0, atol=1e-6, msg=name)
    # Reward metrics are TRL's own, computed with the per-pair tensor.
    margins = ours._metrics["train"]["rewards/margins"]
    assert margins == pytest.approx(stock._metrics["train"]["rewards/margins"], abs=1e-6)


def test_our_tokenization_matches_trl(sample, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from sp2dpo.train.data import tokenize_table
    from sp2dpo.train.trl_trainer import PerPairBetaDPOTrainer

    ours = _trainer(PerPairBetaDPOTrainer, tiny_model_dir, tmp_path, _dataset(sample, BASE_BETA))
    examples = tokenize_table(sample, AutoTokenizer.from_pretrained(tiny_model_dir), max_length=512)
    for ex, trl_row in zip(examples, ours.train_dataset):
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert ex[key] == trl_row[key]


def test_per_pair_beta_is_not_weighting_and_follows_its_pair(sample, tiny_model_dir, tmp_path):
    from sp2dpo.train.trl_trainer import PerPairBetaDPOTrainer

    betas = {r["pair_id"]: b for r, b in zip(sample.to_pylist(), [0.02, 0.05, 0.1, 0.3, 0.6, 1.0, 2.0, 0.04])}
    ours = _trainer(PerPairBetaDPOTrainer, tiny_model_dir, tmp_path, _dataset(sample, lambda r: betas[r["pair_id"]]))
    rows = [ours.train_dataset[i] for i in range(8)]
    batch = ours.data_collator(rows)
    loss, _ = _loss_and_grads(ours, batch)

    # The per-pair values from the policy and reference log-probs, via our own loss.
    with torch.no_grad():
        pc, pr = ours.compute_ref_log_probs(ours.model, batch)
        rc, rr = ours.compute_ref_log_probs(ours.ref_model, batch)
    expected = dpo_loss(pc, pr, rc, rr, batch["beta"]).losses.mean()
    as_weighting = ((batch["beta"] / BASE_BETA) * dpo_loss(pc, pr, rc, rr, BASE_BETA).losses).mean()
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)
    assert abs(loss.item() - as_weighting.item()) > 1e-3  # fails if β were implemented as a loss weight

    # Permute the pairs: each β travels with its pair, so the mean loss is unchanged ...
    perm = [5, 2, 7, 0, 3, 6, 1, 4]
    permuted_loss, _ = _loss_and_grads(ours, ours.data_collator([rows[i] for i in perm]))
    torch.testing.assert_close(permuted_loss, loss, rtol=0, atol=1e-6)
    # ... while detaching β from its pair changes it.
    misplaced = ours.data_collator([{**rows[i], "beta": rows[j]["beta"]} for i, j in zip(range(8), perm)])
    misplaced_loss, _ = _loss_and_grads(ours, misplaced)
    assert abs(misplaced_loss.item() - loss.item()) > 1e-4


def test_beta_survives_trl_dataset_pipeline_and_dataloader(sample, tiny_model_dir, tmp_path):
    """β is set to a function of the pair's own chosen length; every batch the Trainer's shuffling
    dataloader yields must still pair each β with the row that length belongs to."""
    from transformers import AutoTokenizer

    from sp2dpo.train.data import conversation, tokenize_pair
    from sp2dpo.train.trl_trainer import PerPairBetaDPOTrainer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)

    def beta_of(r):
        conv = conversation(r["prompt"], r["prompt_messages"], r["chosen"], r["rejected"])
        return 0.001 * len(tokenize_pair(tok, conv)["chosen_ids"])

    ours = _trainer(PerPairBetaDPOTrainer, tiny_model_dir, tmp_path, _dataset(sample, beta_of), max_length=None)
    seen = 0
    for batch in ours.get_train_dataloader():
        n = batch["beta"].shape[0]
        chosen_lengths = batch["completion_mask"][:n].sum(dim=1).float()
        torch.testing.assert_close(batch["beta"], 0.001 * chosen_lengths)
        seen += n
    assert seen == sample.num_rows


@pytest.mark.parametrize("kw, match", [({"use_liger_kernel": True}, "Liger"),
                                       ({"loss_type": ["aot"]}, "aot"),
                                       ({"loss_type": ["sigmoid", "aot_unpaired"]}, "aot_unpaired")])
def test_features_that_break_per_pair_beta_are_refused(sample, tiny_model_dir, tmp_path, kw, match):
    from sp2dpo.train.trl_trainer import PerPairBetaDPOTrainer

    with pytest.raises(ValueError, match=match):
        _trainer(PerPairBetaDPOTrainer, tiny_model_dir, tmp_path, _dataset(sample, BASE_BETA), **kw)


def test_dataset_without_beta_is_refused(sample, tiny_model_dir, tmp_path):
    from sp2dpo.train.trl_trainer import PerPairBetaDPOTrainer

    with pytest.raises(ValueError, match="no 'beta' column"):
        _trainer(PerPairBetaDPOTrainer, tiny_model_dir, tmp_path, _dataset(sample))


def test_trl_route_trains_a_step(sample, tiny_model_dir, tmp_path):
    from sp2dpo.train.trl_trainer import PerPairBetaDPOTrainer

    ours = _trainer(PerPairBetaDPOTrainer, tiny_model_dir, tmp_path, _dataset(sample, lambda r: r["beta"]),
                    max_steps=2, logging_steps=1, learning_rate=1e-3, save_strategy="no")
    result = ours.train()
    assert result.global_step == 2
    logged = [h for h in ours.state.log_history if "beta/mean" in h]
    assert logged and all(0 < h["beta/mean"] for h in logged)


def test_label_smoothing_equals_trl_robust_and_trl_sigmoid_ignores_it(sample, tiny_model_dir, tmp_path):
    """On the same log-probs: our robust loss with label smoothing is TRL 1.16's, and plain sigmoid
    is TRL's. TRL's sigmoid ignores label_smoothing (ours would add the conservative-DPO term),
    which is why TrainConfig and PerPairBetaDPOTrainer refuse that combination."""
    from trl import DPOTrainer

    from sp2dpo.train.trl_trainer import PerPairBetaDPOTrainer

    trl_losses, our_losses = {}, {}
    for loss_type, eps in (("robust", 0.2), ("sigmoid", 0.0), ("sigmoid", 0.2)):
        stock = _trainer(DPOTrainer, tiny_model_dir, tmp_path / f"{loss_type}-{eps}", _dataset(sample),
                         loss_type=[loss_type], label_smoothing=eps)
        batch = stock.data_collator([stock.train_dataset[i] for i in range(8)])
        trl_losses[loss_type, eps], _ = _loss_and_grads(stock, batch)
        with torch.no_grad():
            pc, pr = stock.compute_ref_log_probs(stock.model, batch)
            rc, rr = stock.compute_ref_log_probs(stock.ref_model, batch)
        our_losses[loss_type, eps] = dpo_loss(pc, pr, rc, rr, BASE_BETA, loss_type, eps).losses.mean()
    torch.testing.assert_close(our_losses["robust", 0.2], trl_losses["robust", 0.2], rtol=0, atol=1e-6)
    torch.testing.assert_close(our_losses["sigmoid", 0.0], trl_losses["sigmoid", 0.0], rtol=0, atol=1e-6)
    assert abs(trl_losses["robust", 0.2].item() - trl_losses["sigmoid", 0.0].item()) > 1e-3  # ε really acts
    torch.testing.assert_close(trl_losses["sigmoid", 0.2], trl_losses["sigmoid", 0.0], rtol=0, atol=0)
    assert abs(our_losses["sigmoid", 0.2].item() - trl_losses["sigmoid", 0.2].item()) > 1e-3
    with pytest.raises(ValueError, match="no effect on loss_type.*sigmoid"):
        _trainer(PerPairBetaDPOTrainer, tiny_model_dir, tmp_path / "refused", _dataset(sample, BASE_BETA),
                 label_smoothing=0.2)
