"""DPO losses with a per-pair β: one β_i per pair, a tensor of shape [batch].

    out = dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta=torch.tensor([0.1, 0.5]))
    out.losses.mean().backward()

Every input is a [batch] tensor of summed completion log-probs (or a Python float for β: a scalar
β is the special case every pair shares). The function returns *per-pair* values — the caller
reduces — so β_i reaches exactly its own pair, as in torchtune's losses.

With h_i = (log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x)):

    sigmoid   −(1−ε)·log σ(β_i h_i) − ε·log σ(−β_i h_i)       DPO (Rafailov et al. 2023, eq. 7);
                                                               ε > 0 is conservative DPO (cDPO)
    robust    [−(1−ε)·log σ(β_i h_i) + ε·log σ(−β_i h_i)] / (1−2ε)   rDPO (Chowdhury et al. 2024)
    hinge     max(0, 1 − β_i h_i)                               SLiC-style hinge
    ipo       (h̄_i − 1/(2β_i))²                                 IPO (Azar et al. 2023, eq. 17)

For IPO, h̄ uses log-ratios averaged over completion tokens when the lengths are given (what TRL
1.16 computes, confirmed with the IPO authors); without lengths it is the summed h_i of the paper.

The per-pair β is *not* a loss weight: dL_i/dh_i = −β_i·σ(−β_i h_i), so a large β_i pushes harder
at first and saturates sooner. Weighting a global-β loss by β_i/β gives −β_i·σ(−β h_i) instead;
the two agree only at h_i = 0 (tests/test_loss.py shows they differ everywhere else).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sp2dpo.train.logps import batch_logps, completion_lengths

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")


@dataclass
class DPOLossOutput:
    """Per-pair values, each of shape [batch]. Rewards are detached (for logging)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor  # β_i · (log π(y_w|x) − log π_ref(y_w|x))
    rejected_rewards: torch.Tensor  # β_i · (log π(y_l|x) − log π_ref(y_l|x))
    margins: torch.Tensor  # chosen_rewards − rejected_rewards = β_i · h_i
    accuracies: torch.Tensor  # 1.0 where the implicit reward prefers the chosen answer


def as_beta_tensor(beta: float | torch.Tensor, like: torch.Tensor, check_positive: bool = True) -> torch.Tensor:
    """β as a [batch] tensor on `like`'s device; refuses shapes that would broadcast silently and,
    with `check_positive`, a β_i <= 0 (reading the values back is a device sync on a GPU)."""
    if not isinstance(beta, torch.Tensor):
        beta = torch.full_like(like, float(beta))
    if beta.dim() == 0:
        beta = beta.expand_as(like)
    if beta.shape != like.shape:
        raise ValueError(f"beta must be a scalar or have shape {tuple(like.shape)} (one per pair), "
                         f"got {tuple(beta.shape)}")
    if check_positive and not bool(torch.all(beta > 0)):
        raise ValueError("every beta must be > 0")
    return beta.to(device=like.device, dtype=like.dtype)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float | torch.Tensor,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    check_beta: bool = True,
) -> DPOLossOutput:
    """Per-pair DPO-family losses; see the module docstring for the formulas. `check_beta=False`
    skips the β_i > 0 check for callers that checked their β once already."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {list(LOSS_TYPES)}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    beta = as_beta_tensor(beta, policy_chosen_logps, check_beta)
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    eps = label_smoothing

    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:  # ipo
        if (chosen_lengths is None) != (rejected_lengths is None):
            raise ValueError("ipo: pass both chosen_lengths and rejected_lengths, or neither")
        if chosen_lengths is not None:
            h = chosen_logratios / chosen_lengths.clamp(min=1.0) - rejected_logratios / rejected_lengths.clamp(min=1.0)
        losses = (h - 1 / (2 * beta)) ** 2

    chosen_rewards = (beta * chosen_logratios).detach()
    rejected_rewards = (beta * rejected_logratios).detach()
    margins = chosen_rewards - rejected_rewards
    return DPOLossOutput(losses, chosen_rewards, rejected_rewards, margins, (margins > 0).to(losses.dtype))


def batch_loss(model: Any, batch: dict[str, Any], loss_type: str = "sigmoid",
               label_smoothing: float = 0.0) -> DPOLossOutput:
    """Per-pair DPO outputs for one collated batch (either layout): the policy's log-probs from
    `model`, β_i and the offline reference log-probs from the batch's own [B] columns. β_i > 0 was
    checked once when the pairs were loaded (`tokens.check_beta`), not here at every step."""
    chosen, rejected = batch_logps(model, batch)
    lengths = (None, None)
    if loss_type == "ipo":
        lengths = tuple(n.to(chosen.dtype) for n in completion_lengths(batch))
    return dpo_loss(chosen, rejected, batch["ref_chosen_logps"].to(chosen.dtype),
                    batch["ref_rejected_logps"].to(chosen.dtype), batch["beta"], loss_type, label_smoothing,
                    lengths[0], lengths[1], check_beta=False)
