"""Per-pair β DPO losses: formulas, β reaching its own pair, and β ≠ loss weighting."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sp2dpo.train.loss import LOSS_TYPES, dpo_loss


def _logps(seed: int = 0, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    return [(-torch.rand(n, generator=g, dtype=torch.float64) * 20) for _ in range(4)]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_scalar_beta_is_the_constant_tensor_case(loss_type):
    pc, pr, rc, rr = _logps()
    scalar = dpo_loss(pc, pr, rc, rr, 0.3, loss_type)
    tensor = dpo_loss(pc, pr, rc, rr, torch.full((6,), 0.3, dtype=torch.float64), loss_type)
    torch.testing.assert_close(scalar.losses, tensor.losses, rtol=0, atol=0)
    torch.testing.assert_close(scalar.margins, tensor.margins, rtol=0, atol=0)


def test_sigmoid_matches_dpo_formula_per_pair():
    pc, pr, rc, rr = _logps(1)
    beta = torch.tensor([0.05, 0.1, 0.2, 0.5, 1.0, 2.0], dtype=torch.float64)
    out = dpo_loss(pc, pr, rc, rr, beta)
    h = (pc - rc) - (pr - rr)
    expected = -torch.log(torch.sigmoid(beta * h))
    torch.testing.assert_close(out.losses, expected)
    torch.testing.assert_close(out.chosen_rewards, beta * (pc - rc))
    torch.testing.assert_close(out.rejected_rewards, beta * (pr - rr))
    torch.testing.assert_close(out.margins, beta * h)
    assert out.accuracies.tolist() == [float(x > 0) for x in (beta * h).tolist()]


def test_label_smoothing_hinge_and_ipo():
    pc, pr, rc, rr = _logps(2)
    beta = torch.linspace(0.1, 1.0, 6, dtype=torch.float64)
    h = (pc - rc) - (pr - rr)
    cdpo = dpo_loss(pc, pr, rc, rr, beta, "sigmoid", label_smoothing=0.1).losses
    torch.testing.assert_close(cdpo, -0.9 * F.logsigmoid(beta * h) - 0.1 * F.logsigmoid(-beta * h))
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta, "hinge").losses, torch.relu(1 - beta * h))
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta, "ipo").losses, (h - 1 / (2 * beta)) ** 2)
    lc = torch.tensor([3.0, 5, 7, 2, 1, 9], dtype=torch.float64)
    lr = torch.tensor([4.0, 1, 2, 8, 6, 3], dtype=torch.float64)
    ipo_norm = dpo_loss(pc, pr, rc, rr, beta, "ipo", chosen_lengths=lc, rejected_lengths=lr).losses
    torch.testing.assert_close(ipo_norm, ((pc - rc) / lc - (pr - rr) / lr - 1 / (2 * beta)) ** 2)
    robust = dpo_loss(pc, pr, rc, rr, beta, "robust", label_smoothing=0.2).losses
    torch.testing.assert_close(robust, (-0.8 * F.logsigmoid(beta * h) + 0.2 * F.logsigmoid(-beta * h)) / 0.6)


def test_per_pair_beta_is_not_loss_weighting():
    """If per-pair β were implemented as weighting a global-β loss by β_i/β, this test fails."""
    pc, pr, rc, rr = _logps(3)
    pc = pc.clone().requires_grad_(True)
    beta = torch.tensor([0.05, 0.1, 0.2, 0.5, 1.0, 2.0], dtype=torch.float64)
    base = 0.1
    dpo_loss(pc, pr, rc, rr, beta).losses.sum().backward()
    grad_beta = pc.grad.clone()
    pc.grad = None
    weighted = (beta / base) * dpo_loss(pc, pr, rc, rr, base).losses
    weighted.sum().backward()
    grad_weighted = pc.grad.clone()
    h = ((pc - rc) - (pr - rr)).detach()
    # d/dh of −log σ(β h) is −β σ(−β h): the per-pair β sits inside the sigmoid.
    torch.testing.assert_close(grad_beta, -beta * torch.sigmoid(-beta * h))
    torch.testing.assert_close(grad_weighted, -beta * torch.sigmoid(-base * h))
    differs = (grad_beta - grad_weighted).abs() > 1e-6
    assert differs[beta != base].all()  # every pair whose β differs from the base β
    assert not differs[beta == base].any()


def test_each_beta_reaches_its_own_pair():
    pc, pr, rc, rr = _logps(4)
    beta = torch.tensor([0.05, 0.1, 0.2, 0.5, 1.0, 2.0], dtype=torch.float64)
    perm = torch.tensor([4, 0, 5, 2, 1, 3])
    out = dpo_loss(pc, pr, rc, rr, beta)
    permuted = dpo_loss(pc[perm], pr[perm], rc[perm], rr[perm], beta[perm])
    torch.testing.assert_close(permuted.losses, out.losses[perm], rtol=0, atol=0)
    torch.testing.assert_close(permuted.margins, out.margins[perm], rtol=0, atol=0)
    # Moving β without its pair changes the result: β is not interchangeable across pairs.
    shuffled_beta = dpo_loss(pc, pr, rc, rr, beta[perm])
    assert not torch.allclose(shuffled_beta.losses, out.losses)


def test_bad_beta_and_options_are_refused():
    pc, pr, rc, rr = _logps(5)
    with pytest.raises(ValueError, match="one per pair"):
        dpo_loss(pc, pr, rc, rr, torch.ones(3))
    with pytest.raises(ValueError, match="> 0"):
        dpo_loss(pc, pr, rc, rr, torch.tensor([0.1, 0.1, 0.0, 0.1, 0.1, 0.1]))
    with pytest.raises(ValueError, match="unknown loss_type"):
        dpo_loss(pc, pr, rc, rr, 0.1, "aot")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(pc, pr, rc, rr, 0.1, label_smoothing=0.5)
