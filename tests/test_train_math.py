"""Advantages, the clipped surrogate, KL and aggregation against hand-computed values."""
import math

import pytest
import torch

from rpt_train.advantages import group_advantages, group_std
from rpt_train.config import TrainConfig
from rpt_train.loss import aggregate, clipped_surrogate, normalizer
from rpt_train.trainer import lr_factor

S3 = math.sqrt(1 / 3)  # sample std of [1, 0, 0, 1] and of [1, 1, 0]


def test_group_zscore_grpo():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    adv = group_advantages(r, 4)
    a = 0.5 / (S3 + 1e-4)
    assert adv.tolist() == pytest.approx([a, -a, -a, a, 0, 0, 0, 0], abs=1e-6)
    assert group_std(r, 4).tolist() == pytest.approx([S3, 0.0])


def test_no_std_dr_grpo():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert group_advantages(r, 4, scale=False).tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])


def test_anchor_gives_all_correct_groups_signal():
    r = torch.tensor([1.0, 1.0, 0.0, 0.0])
    adv = group_advantages(r, 2, anchor=0.0)
    a = (1 - 2 / 3) / (S3 + 1e-4)
    assert adv.tolist() == pytest.approx([a, a, 0.0, 0.0], abs=1e-6)
    assert group_advantages(r, 2, scale=False, anchor=0.0).tolist() == pytest.approx([1 / 3, 1 / 3, 0, 0])


def test_clipped_surrogate_clip_higher():
    logp = torch.log(torch.tensor([[0.5, 0.25], [0.5, 0.125]]))
    old = torch.log(torch.tensor([[0.25, 0.25], [0.25, 0.25]]))
    adv = torch.tensor([1.0, -1.0])
    per_token, clipped, kl = clipped_surrogate(logp, old, adv, clip_low=0.2, clip_high=0.28)
    # row 0, A=+1: ratios 2 -> clipped at 1.28; 1 -> 1.  row 1, A=-1: ratio 2 unclipped (pessimistic); 0.5 -> 0.8
    assert per_token.flatten().tolist() == pytest.approx([-1.28, -1.0, 2.0, 0.8])
    assert clipped.tolist() == [[True, False], [False, True]]
    assert kl is None


def test_k3_kl_only_with_beta():
    logp = torch.log(torch.tensor([[0.25]]))
    ref = torch.log(torch.tensor([[0.5]]))
    per_token, _, kl = clipped_surrogate(logp, logp, torch.tensor([0.0]), clip_low=0.2, clip_high=0.2, beta=0.5,
                                         ref_logp=ref)
    k3 = 2 - math.log(2) - 1
    assert kl.item() == pytest.approx(k3)
    assert per_token.item() == pytest.approx(0.5 * k3)


def test_ratio_one_gradient_is_policy_gradient():
    logp = torch.log(torch.tensor([[0.5, 0.25]])).requires_grad_()
    per_token, _, _ = clipped_surrogate(logp, logp.detach(), torch.tensor([2.0]), clip_low=0.2, clip_high=0.2)
    aggregate(per_token, torch.ones(1, 2), "token", 2.0).backward()
    assert logp.grad.flatten().tolist() == pytest.approx([-1.0, -1.0])  # d/dlogp of -A * ratio / 2 tokens


PER_TOKEN = torch.tensor([[1.0, 2.0, 7.0], [3.0, 9.0, 9.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


@pytest.mark.parametrize("mode,expected", [("token", 6 / 3), ("sequence", (1.5 + 3) / 2), ("constant", 6 / (2 * 4))])
def test_aggregations(mode, expected):
    norm = normalizer(mode, MASK, max_new_tokens=4)
    assert aggregate(PER_TOKEN, MASK, mode, norm).item() == pytest.approx(expected)
    # micro-batches with the mini-batch normalizer add up to the full-batch loss
    parts = sum(aggregate(PER_TOKEN[i:i + 1], MASK[i:i + 1], mode, norm) for i in range(2))
    assert parts.item() == pytest.approx(expected)


def test_lr_schedule():
    f = lr_factor(TrainConfig(shards="x", steps=6, warmup_steps=2, lr_schedule="linear"))
    assert [f(i) for i in range(6)] == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
    f = lr_factor(TrainConfig(shards="x", steps=6, warmup_steps=2, lr_schedule="cosine"))
    assert f(4) == pytest.approx(0.5)
    assert lr_factor(TrainConfig(shards="x", steps=6))(5) == 1.0


def test_loss_defaults_follow_the_variant():
    assert TrainConfig(shards="x", loss="dapo").resolved_clip_high() == 0.28
    assert TrainConfig(shards="x", loss="grpo").resolved_clip_high() == 0.2
    assert TrainConfig(shards="x", loss="dr_grpo").resolved_scale_rewards() is False
    assert TrainConfig(shards="x", loss="grpo", scale_rewards=False).resolved_scale_rewards() is False
