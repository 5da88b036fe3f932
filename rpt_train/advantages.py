"""Group-relative advantages (GRPO family): rewards of the G rollouts of one context, centred on their
mean and, unless Dr. GRPO, divided by their std; an optional phantom rollout anchors the group."""
from __future__ import annotations

import torch

STD_EPS = 1e-4  # as TRL: all-equal groups give advantage 0, not 0/0


def group_std(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-group sample std (Bessel-corrected, as torch.std), [N / G]."""
    return rewards.view(-1, group_size).std(dim=1)


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: bool = True,
                     anchor: float | None = None) -> torch.Tensor:
    """A_i = (r_i - mean_g) / (std_g + 1e-4) (or without the std when scale=False), rows group-contiguous.
    With `anchor`, mean and std also count one phantom rollout of reward `anchor` (it gets no advantage itself),
    so all-correct groups still earn a positive advantage against a zero anchor."""
    r = rewards.view(-1, group_size).double()
    stats = r if anchor is None else torch.cat([r, torch.full_like(r[:, :1], anchor)], dim=1)
    adv = r - stats.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (stats.std(dim=1, keepdim=True) + STD_EPS)
    return adv.view(-1).to(rewards.dtype)
