"""The shared-prompt layout (one row per pair, the prompt forwarded once) gives the same log-probs,
losses and gradients as TRL's two-row layout, on both attention implementations and both heads."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore")


def test_collator_lays_out_one_row_per_pair():
    from sp2dpo.train.data import PerPairCollator
    from sp2dpo.train.shared_prompt import SharedPromptCollator

    examples = [
        {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6], "beta": 0.5, "index": 7},
        {"prompt_ids": [7, 8], "chosen_ids": [9, 10, 11, 12], "rejected_ids": [13, 14], "beta": 0.1, "index": 2},
    ]
    batch = SharedPromptCollator(pad_token_id=0, max_length=5)(examples)
    # pair 0: prompt[:-1] | p chosen | p rejected, nothing cut (3 + 2 <= 5)
    # pair 1: answers cut to 5 - 2 = 3 tokens (keep_start on prompt + answer, as TRL)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 3, 6, 0], [7, 8, 9, 10, 11, 8, 13, 14]]
    assert batch["segments"].tolist() == [[0, 0, 1, 1, 1, 2, 2, -1], [0, 1, 1, 1, 1, 2, 2, 2]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3, 0], [0, 1, 2, 3, 4, 1, 2, 3]]
    assert batch["completion_mask"].tolist() == [[0, 0, 0, 1, 1, 0, 1, 0], [0, 0, 1, 1, 1, 0, 1, 1]]
    # each scored token is predicted by the position before it; slots: chosen b → b, rejected b → 2 + b
    width = batch["input_ids"].shape[1]
    assert batch["score_index"].tolist() == [2, 3, 5, width + 1, width + 2, width + 3, width + 5, width + 6]
    assert batch["score_targets"].tolist() == [4, 5, 6, 9, 10, 11, 13, 14]
    assert batch["score_slot"].tolist() == [0, 0, 2, 1, 1, 1, 3, 3]
    assert batch["beta"].tolist() == [0.5, pytest.approx(0.1)] and batch["index"].tolist() == [7, 2]
    # tokens are counted as the two-row batch holds them
    two_rows = PerPairCollator(pad_token_id=0, max_length=5)(examples)
    assert int(batch["num_tokens"]) == int(two_rows["attention_mask"].sum()) == 5 + 4 + 5 + 4


def test_collator_refuses_a_prompt_that_fills_max_length():
    from sp2dpo.train.shared_prompt import SharedPromptCollator

    with pytest.raises(ValueError, match="no room for an answer"):
        SharedPromptCollator(0, max_length=3)([{"prompt_ids": [1, 2, 3], "chosen_ids": [4], "rejected_ids": [5]}])


def test_mask_keeps_the_answers_apart():
    from sp2dpo.train.shared_prompt import attention_mask_4d

    segments = torch.tensor([[0, 0, 1, 1, 2, 2, -1]])
    mask = attention_mask_4d(segments, "sdpa", torch.float32)[0, 0]
    assert mask[3].tolist() == [True, True, True, True, False, False, False]  # chosen: prompt + chosen
    assert mask[5].tolist() == [True, True, False, False, True, True, False]  # rejected: prompt + rejected
    assert mask[1].tolist() == [True, True, False, False, False, False, False]  # prompt: causal
    assert mask[6].tolist() == [False] * 6 + [True]  # padding sees only itself: no empty softmax row
    additive = attention_mask_4d(segments, "eager", torch.float32)[0, 0]
    assert torch.equal(additive == 0, mask)
    with pytest.raises(ValueError, match="shared_prompt=false"):
        attention_mask_4d(segments, "flash_attention_2", torch.float32)


@pytest.fixture(scope="module")
def examples(tmp_path_factory, tiny_model_dir):
    from transformers import AutoTokenizer

    from sp2dpo.schedule.artifact import training_pairs
    from sp2dpo.train.data import tokenize_table
    from sp2dpo.train.sample import build_sample_inputs

    pairs, artifact = build_sample_inputs(tmp_path_factory.mktemp("shared"), limit=6, max_chars=300)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = tokenize_table(training_pairs(artifact, pairs), tok, None)
    for i, ex in enumerate(examples):  # made-up reference log-probs: only the equality of the two layouts matters
        ex["ref_chosen_logps"], ex["ref_rejected_logps"] = -40.0 - i, -45.0 + i
    return examples, tok.pad_token_id


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("answer_scorer", [True, False])
def test_same_logps_and_gradients_as_two_rows(examples, tiny_model_dir, attention, answer_scorer):
    from sp2dpo.train.data import PerPairCollator
    from sp2dpo.train.logps import load_causal_lm, sequence_logps
    from sp2dpo.train.shared_prompt import SharedPromptCollator, shared_prompt_logps

    examples, pad = examples
    longest_prompt = max(len(ex["prompt_ids"]) for ex in examples)
    model, _ = load_causal_lm(str(tiny_model_dir))
    model.config._attn_implementation = attention
    for max_length in (None, longest_prompt + 8):  # the second cuts answers
        two_rows = PerPairCollator(pad, max_length)(examples)
        one_row = SharedPromptCollator(pad, max_length)(examples)
        assert one_row["input_ids"].numel() < two_rows["input_ids"].numel()
        model.zero_grad()
        chosen, rejected = sequence_logps(model, two_rows)
        (chosen.sum() - 2 * rejected.sum()).backward()
        expected = _grads(model)
        model.zero_grad()
        shared_chosen, shared_rejected = shared_prompt_logps(model, one_row, answer_scorer=answer_scorer)
        (shared_chosen.sum() - 2 * shared_rejected.sum()).backward()
        torch.testing.assert_close(shared_chosen, chosen, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(shared_rejected, rejected, rtol=1e-5, atol=1e-4)
        got = _grads(model)
        assert got.keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_batch_loss_same_on_both_layouts_and_follows_a_permutation(examples, tiny_model_dir, tmp_path, loss_type):
    from sp2dpo.train.logps import load_causal_lm, make_collator
    from sp2dpo.train.loss import batch_loss

    examples, pad = examples
    model, _ = load_causal_lm(str(tiny_model_dir))
    model.gradient_checkpointing_enable()
    model.train()
    betas = [0.05, 0.5, 0.1, 1.0, 0.2, 0.3]
    examples = [{**ex, "beta": b} for ex, b in zip(examples, betas)]
    two_rows = batch_loss(model, make_collator(False, pad, 160)(examples), loss_type)
    shared = batch_loss(model, make_collator(True, pad, 160)(examples), loss_type)
    torch.testing.assert_close(shared.losses, two_rows.losses, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared.margins, two_rows.margins, rtol=1e-5, atol=1e-5)
    perm = [3, 0, 5, 1, 4, 2]
    permuted = batch_loss(model, make_collator(True, pad, 160)([examples[i] for i in perm]), loss_type)
    torch.testing.assert_close(permuted.losses, shared.losses[perm], rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("answer_scorer", [True, False])
def test_same_logps_and_gradients_on_cuda(examples, tiny_model_dir, answer_scorer):
    """On a GPU SDPA takes another kernel for a custom mask and TRL's fused head scores only
    labelled positions (Triton): the one-row layout still equals the two-row one."""
    from sp2dpo.train.data import PerPairCollator
    from sp2dpo.train.logps import load_causal_lm, sequence_logps
    from sp2dpo.train.shared_prompt import SharedPromptCollator, shared_prompt_logps

    examples, pad = examples
    model, _ = load_causal_lm(str(tiny_model_dir), device="cuda")

    def on_cuda(batch):
        return {k: v.cuda() for k, v in batch.items()}

    chosen, rejected = sequence_logps(model, on_cuda(PerPairCollator(pad, None)(examples)))
    (chosen.sum() - 2 * rejected.sum()).backward()
    expected = _grads(model)
    model.zero_grad()
    shared_chosen, shared_rejected = shared_prompt_logps(model, on_cuda(SharedPromptCollator(pad, None)(examples)),
                                                         answer_scorer=answer_scorer)
    (shared_chosen.sum() - 2 * shared_rejected.sum()).backward()
    torch.testing.assert_close(shared_chosen, chosen, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(shared_rejected, rejected, rtol=1e-4, atol=1e-3)
    got = _grads(model)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-3, atol=1e-4, msg=name)
