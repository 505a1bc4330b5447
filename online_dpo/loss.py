"""DPO-family losses on tensors of sequence log-probs. Imports torch only.

Every loss takes the policy's and the frozen reference's log-probs of the
chosen and rejected responses (shape [B]) and returns per-pair losses plus the
implicit rewards beta * (log pi - log pi_ref) used for logging.

With h = (pi_c - ref_c) - (pi_r - ref_r), the log-ratio margin:
- sigmoid (DPO, Rafailov et al. 2023): -log sigmoid(beta h); with
  label_smoothing eps it is conservative DPO (cDPO):
  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
- robust (rDPO, Chowdhury et al. 2024), unbiased under label-flip rate eps:
  (-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)) / (1 - 2 eps).
- ipo (Azar et al. 2023): (h - 1 / (2 beta))^2. The paper uses length-averaged
  log-probs; the caller passes them (see sequences.sequence_logprobs).
- hinge (SLiC, Zhao et al. 2023): max(0, 1 - beta h).
- sigmoid_norm (length-normalised DPO): the sigmoid loss on length-averaged
  log-probs (the caller passes them), so a longer response earns no larger
  log-ratio by its length alone.
- simpo (SimPO, Meng et al. 2024), reference-free: with length-averaged
  log-probs, -log sigmoid(beta (pi_c - pi_r) - gamma); gamma is the target
  reward margin. The reference log-probs are ignored; the implicit rewards
  are beta * pi.

`length_margin` (R-DPO, Park et al. 2024) is alpha * (|y_c| - |y_r|), added to
the logit of the sigmoid-family losses: the part of a preference that length
explains is not credited to the policy, so a judge that rewards length itself
does not teach the policy to write longer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge", "sigmoid_norm", "simpo")
LENGTH_AVERAGED = ("ipo", "sigmoid_norm", "simpo")   # these take per-token mean log-probs


@dataclass
class DPOOutput:
    losses: torch.Tensor            # [B]
    chosen_rewards: torch.Tensor    # [B], beta * (pi_c - ref_c), detached
    rejected_rewards: torch.Tensor  # [B], beta * (pi_r - ref_r), detached


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, *,
             beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             gamma: float = 0.0, length_margin: torch.Tensor | float = 0.0) -> DPOOutput:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    eps = label_smoothing
    if loss_type == "simpo":
        z = beta * (policy_chosen - policy_rejected) - gamma + length_margin
        return DPOOutput(losses=-(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z),
                         chosen_rewards=(beta * policy_chosen).detach(),
                         rejected_rewards=(beta * policy_rejected).detach())
    z = beta * h + length_margin
    if loss_type in ("sigmoid", "sigmoid_norm"):
        losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * h)
    return DPOOutput(
        losses=losses,
        chosen_rewards=(beta * (policy_chosen - ref_chosen)).detach(),
        rejected_rewards=(beta * (policy_rejected - ref_rejected)).detach(),
    )


def reward_tensors(out: DPOOutput) -> dict[str, torch.Tensor]:
    """Implicit-reward figures for logging (means, accuracy and margin) as 0-d tensors on the
    rewards' device, so reading them costs no device-to-host sync until the caller chooses."""
    c, r = out.chosen_rewards.float(), out.rejected_rewards.float()
    return {
        "rewards/chosen": c.mean(),
        "rewards/rejected": r.mean(),
        "rewards/accuracy": (c > r).float().mean(),
        "rewards/margin": (c - r).mean(),
    }

