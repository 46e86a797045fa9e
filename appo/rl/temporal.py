"""Video-R1's T-GRPO reward terms: the temporal contrast bonus and the length bonus.

T-GRPO (Feng et al., Video-R1, 2025) samples, besides the G responses on frames in temporal
order, G' responses on the same frames in shuffled order. If the ordered group answers better
than the shuffled one, every correct ordered response earns a bonus: the policy is rewarded for
answers that depend on temporal order. Only the ordered responses are optimised.
"""

from __future__ import annotations

import torch

from appo.config import TEMPORAL_CONDITIONS

CONDITIONS = TEMPORAL_CONDITIONS


def temporal_bonus(acc_ordered: torch.Tensor, acc_shuffled: torch.Tensor, group_size: int,
                   shuffled_size: int, bonus: float = 0.3, condition: str = "ratio",
                   ratio: float = 0.8) -> torch.Tensor:
    """b_i = bonus * 1[acc_i > 0] * 1[p >= ratio * p~ ("ratio") or p > p~ ("greater")].

    ``acc_ordered`` [B*G] and ``acc_shuffled`` [B*G'] are accuracy rewards, group-major; p and p~
    are their per-group means. "ratio" (0.8) is the published code's test, "greater" the paper's.
    """
    if condition not in CONDITIONS:
        raise ValueError(f"condition must be one of {', '.join(CONDITIONS)}, got {condition!r}")
    p = acc_ordered.float().view(-1, group_size).mean(1)
    p_shuffled = acc_shuffled.float().view(-1, shuffled_size).mean(1)
    if p.shape != p_shuffled.shape:
        raise ValueError(f"{p.numel()} ordered groups but {p_shuffled.numel()} shuffled groups")
    holds = p >= ratio * p_shuffled if condition == "ratio" else p > p_shuffled
    earned = (acc_ordered > 0) & holds.repeat_interleave(group_size)
    return earned.float() * bonus


def length_bonus(lengths: torch.Tensor, acc: torch.Tensor, min_len: int, max_len: int,
                 bonus: float = 0.2) -> torch.Tensor:
    """b_i = bonus * 1[acc_i > 0] * 1[min_len <= L_i <= max_len] (Video-R1's length reward)."""
    inside = (lengths >= min_len) & (lengths <= max_len)
    return ((acc > 0) & inside).float() * bonus
