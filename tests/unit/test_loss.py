"""DPO losses against values worked out by hand.

One pair: policy log-probs chosen -1.0, rejected -2.0; reference -1.5 for both.
  h = (-1.0 - -1.5) - (-2.0 - -1.5) = 0.5 - (-0.5) = 1.0
With beta = 0.5, beta*h = 0.5:
  sigmoid:  -log sigmoid(0.5) = log(1 + e^-0.5) = 0.4740770
            -log sigmoid(-0.5) = log(1 + e^0.5) = 0.9740770
  cDPO eps 0.1:   0.9 * 0.4740770 + 0.1 * 0.9740770 = 0.5240770
  robust eps 0.1: (0.9 * 0.4740770 - 0.1 * 0.9740770) / 0.8 = 0.4115770
  hinge:    max(0, 1 - 0.5) = 0.5
  ipo (beta 0.25): (1.0 - 1 / (2 * 0.25))^2 = (1 - 2)^2 = 1.0
Implicit rewards (beta 0.5): chosen 0.5 * 0.5 = 0.25, rejected 0.5 * -0.5 = -0.25.
  sigmoid_norm: the sigmoid loss (the caller passes length-averaged log-probs): 0.4740770
  simpo (beta 2.0, gamma 0.5; the reference is ignored):
            z = 2.0 * (-1.0 - -2.0) - 0.5 = 1.5;  -log sigmoid(1.5) = log(1 + e^-1.5) = 0.2014133
            rewards: chosen 2.0 * -1.0 = -2.0, rejected 2.0 * -2.0 = -4.0
"""

import pytest
import torch

from online_dpo.loss import dpo_loss, reward_tensors

PC, PR, RC, RR = (torch.tensor([v]) for v in (-1.0, -2.0, -1.5, -1.5))


@pytest.mark.parametrize("loss_type,beta,eps,expected", [
    ("sigmoid", 0.5, 0.0, 0.4740770),
    ("sigmoid", 0.5, 0.1, 0.5240770),
    ("robust", 0.5, 0.1, 0.4115770),
    ("robust", 0.5, 0.0, 0.4740770),
    ("hinge", 0.5, 0.0, 0.5),
    ("ipo", 0.25, 0.0, 1.0),
    ("ipo", 0.5, 0.0, 0.0),
])
def test_loss_by_hand(loss_type, beta, eps, expected):
    out = dpo_loss(PC, PR, RC, RR, beta=beta, loss_type=loss_type, label_smoothing=eps)
    assert out.losses.item() == pytest.approx(expected, abs=1e-6)


def test_rewards_and_stats_by_hand():
    out = dpo_loss(PC, PR, RC, RR, beta=0.5)
    assert out.chosen_rewards.item() == pytest.approx(0.25)
    assert out.rejected_rewards.item() == pytest.approx(-0.25)
    stats = {k: v.item() for k, v in reward_tensors(out).items()}
    assert stats["rewards/accuracy"] == 1.0
    assert stats["rewards/margin"] == pytest.approx(0.5)


def test_equal_policy_and_reference_gives_log2():
    z = torch.zeros(4)
    out = dpo_loss(z, z, z, z, beta=0.1)
    assert torch.allclose(out.losses, torch.full((4,), 0.6931472))
    assert reward_tensors(out)["rewards/accuracy"].item() == 0.0


def test_gradient_pushes_chosen_up_and_rejected_down():
    pc = torch.tensor([-1.0], requires_grad=True)
    pr = torch.tensor([-1.0], requires_grad=True)
    dpo_loss(pc, pr, RC, RR, beta=0.1).losses.sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()


def test_bad_arguments():
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=0.5)


def test_length_normalised_and_simpo_by_hand():
    out = dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="sigmoid_norm")
    assert out.losses.item() == pytest.approx(0.4740770, abs=1e-6)
    out = dpo_loss(PC, PR, RC, RR, beta=2.0, loss_type="simpo", gamma=0.5)
    assert out.losses.item() == pytest.approx(0.2014133, abs=1e-6)
    assert out.chosen_rewards.item() == -2.0 and out.rejected_rewards.item() == -4.0
    other_reference = dpo_loss(PC, PR, RC + 3.0, RR - 1.0, beta=2.0, loss_type="simpo", gamma=0.5)
    assert other_reference.losses.item() == out.losses.item()   # reference-free


def test_length_margin_credits_length_not_the_policy():
    # R-DPO: alpha (|y_c| - |y_r|) = 0.1 * (12 - 7) = 0.5 joins the logit 0.5: -log sigmoid(1.0) = 0.3132617,
    # so a pair that length explains pushes the policy less (the gradient shrinks with the loss)
    out = dpo_loss(PC, PR, RC, RR, beta=0.5, length_margin=torch.tensor([0.5]))
    assert out.losses.item() == pytest.approx(0.3132617, abs=1e-6)
