"""Pure, vectorised loss pieces shared by GRPO, DAPO, Dr. GRPO and APPO.

Conventions (all functions):

* ``B`` responses are laid out group-major: the ``G`` responses of prompt 0 come
  first, then the ``G`` responses of prompt 1, and so on.
* ``N`` is the padded response length; ``mask`` ``[B, N]`` (bool or 0/1 float)
  marks valid response tokens.  Values at padded positions are never read into
  a result (they may hold garbage, even NaN/inf, without affecting outputs).

References: GRPO = Shao et al., DeepSeekMath (2024); DAPO = Yu et al. (2025);
Dr. GRPO = Liu et al., "Understanding R1-Zero-Like Training" (2025);
k3 estimator = Schulman, "Approximating KL divergence" (2020).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from appo.config import AGG_MODES, WEIGHT_MODES

__all__ = [
    "AGG_MODES",
    "WEIGHT_MODES",
    "aggregate",
    "aggregation_denominator",
    "clipped_surrogate",
    "group_advantages",
    "groups_with_signal",
    "k3_kl",
    "overlong_penalty",
    "policy_loss",
]


_SIGNAL_TOL = 1e-6


def _as_float(x: Tensor) -> Tensor:
    return x if torch.is_floating_point(x) else x.to(torch.get_default_dtype())


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    """Reshape ``[B]`` group-major rewards to ``[B // G, G]`` after validating the layout."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (group-relative baselines), got {group_size}")
    if rewards.shape[0] % group_size != 0:
        raise ValueError(
            f"batch size {rewards.shape[0]} is not a multiple of group_size {group_size}; "
            "rewards must hold G consecutive responses per prompt"
        )
    return _as_float(rewards).view(-1, group_size)


def _valid(mask: Tensor, like: Tensor) -> Tensor:
    if mask.shape != like.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != values shape {tuple(like.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def group_advantages(
    rewards: Tensor, group_size: int, scale_std: bool = True, eps: float = 1e-4
) -> Tensor:
    """A_i = (r_i - mean_g(r)) / (std_g(r) + eps), std unbiased; Dr. GRPO (scale_std=False): A_i = r_i - mean_g(r).

    ``rewards`` is ``[B]`` group-major with ``G = group_size`` responses per prompt.
    A group whose rewards are all equal gets advantages of exactly 0 (never NaN),
    even with ``eps=0``.  Returns ``[B]`` in the rewards' float dtype.
    """
    r = _grouped(rewards, group_size)
    mean = r.mean(dim=1, keepdim=True)
    flat = (r.amax(dim=1, keepdim=True) - r.amin(dim=1, keepdim=True)) == 0
    centered = torch.where(flat, torch.zeros_like(r), r - mean)
    if scale_std:
        std = r.std(dim=1, keepdim=True)  # unbiased (Bessel), as in TRL / DAPO code
        denom = torch.where(flat, torch.ones_like(std), std + eps)
        centered = centered / denom
    return centered.reshape(-1)


def clipped_surrogate(
    logp_new: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    clip_low: float,
    clip_high: float,
) -> tuple[Tensor, Tensor]:
    """l = -min(rho * A, clip(rho, 1 - clip_low, 1 + clip_high) * A), rho = exp(logp_new - logp_old).

    ``advantages`` is ``[B]`` (broadcast over tokens) or per-token ``[B, N]``.
    Returns ``(per_token_loss [B, N], clipped [B, N] bool)`` where ``clipped`` marks
    tokens whose clipped branch is the active (strictly smaller) one, i.e.
    ``A > 0 and rho > 1 + clip_high`` or ``A < 0 and rho < 1 - clip_low``.  Clipped
    tokens carry no gradient w.r.t. ``logp_new``.
    """
    if logp_new.shape != logp_old.shape:
        raise ValueError(
            f"logp_new shape {tuple(logp_new.shape)} != logp_old shape {tuple(logp_old.shape)}"
        )
    adv = advantages.unsqueeze(-1) if advantages.dim() == logp_new.dim() - 1 else advantages
    ratio = torch.exp(logp_new - logp_old)
    clipped = _clip_flags(ratio, adv, clip_low, clip_high)
    unclipped_obj = ratio * adv
    clipped_obj = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    # Equal to -min(unclipped_obj, clipped_obj); `where` keeps the gradient of the
    # active branch only (zero on clipped tokens, since clamp is flat there).
    loss = -torch.where(clipped, clipped_obj, unclipped_obj)
    return loss, clipped


def _clip_flags(ratio: Tensor, adv: Tensor, clip_low: float, clip_high: float) -> Tensor:
    low, high = _clip_flags_split(ratio, adv, clip_low, clip_high)
    return low | high


def _clip_flags_split(
    ratio: Tensor, adv: Tensor, clip_low: float, clip_high: float
) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        low = (adv < 0) & (ratio < 1.0 - clip_low)
        high = (adv > 0) & (ratio > 1.0 + clip_high)
    return low, high


def k3_kl(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """k3 = exp(logp_ref - logp) - (logp_ref - logp) - 1  (Schulman's unbiased, non-negative KL(pi||ref) estimator).

    Computed as ``expm1(d) - d`` for accuracy near 0; clamped at 0 against rounding.
    """
    if logp.shape != logp_ref.shape:
        raise ValueError(
            f"logp shape {tuple(logp.shape)} != logp_ref shape {tuple(logp_ref.shape)}"
        )
    d = logp_ref - logp
    return (torch.expm1(d) - d).clamp_min(0.0)


def _check_agg_mode(mode: str) -> None:
    if mode not in AGG_MODES:
        raise ValueError(f"unknown aggregation mode {mode!r}; valid modes: {', '.join(AGG_MODES)}")


def aggregation_denominator(masks: Sequence[Tensor], mode: str) -> int:
    """D = sum over all batches of the valid tokens (token-mean) or of the rows (seq-mean modes).

    The one normaliser of a step whose batch is split into micro-batches (and processes):
    ``sum_b aggregate(values_b, masks[b], mode, denominator=D)`` equals ``aggregate`` of the
    whole batch at once, whatever the split and each part's padding.  A plain count (0 for
    nothing; :func:`aggregate` clamps it to >= 1), so per-process counts add up exactly.
    """
    _check_agg_mode(mode)
    if mode == "token-mean":
        return sum(int((m if m.dtype == torch.bool else m != 0).sum()) for m in masks)
    return sum(int(m.shape[0]) for m in masks)


def aggregate(
    values: Tensor,
    mask: Tensor,
    mode: str,
    max_len: int | None = None,
    denominator: float | None = None,
) -> Tensor:
    """token-mean: sum(v*m)/sum(m); seq-mean-token-mean: mean_i[sum_n(v*m)/sum_n(m)]; seq-mean-token-sum-norm: mean_i[sum_n(v*m)/max_len].

    * ``"token-mean"`` - DAPO: every valid token in the batch weighs the same.
    * ``"seq-mean-token-mean"`` - GRPO: average per sequence, then over sequences.
    * ``"seq-mean-token-sum-norm"`` - Dr. GRPO: per-sequence sum divided by a
      constant ``max_len`` (defaults to ``N``), then averaged over sequences.

    The outer mean divides a sum (over tokens, or over per-sequence terms) by the
    batch's count (valid tokens, or rows).  ``denominator`` replaces that count by a
    given one, e.g. the whole step's :func:`aggregation_denominator` when this batch
    is one micro-batch of it: the micro-batch results then add up to the step's mean.

    Denominators are clamped to >= 1, so rows (or batches) with no valid token
    contribute 0 instead of NaN.  Returns a 0-dim tensor.
    """
    _check_agg_mode(mode)
    if values.dim() != 2:
        raise ValueError(f"values must be 2-D [B, N], got shape {tuple(values.shape)}")
    valid = _valid(mask, values)
    m = valid.to(values.dtype)
    vm = torch.where(valid, values, torch.zeros_like(values))
    if mode == "token-mean":
        total = vm.sum()
    elif mode == "seq-mean-token-mean":
        total = (vm.sum(dim=-1) / m.sum(dim=-1).clamp_min(1.0)).sum()
    else:
        norm = values.shape[-1] if max_len is None else max_len
        if norm < 1:
            raise ValueError(f"max_len must be >= 1, got {norm}")
        total = (vm.sum(dim=-1) / norm).sum()
    if denominator is None:
        if mode == "token-mean":
            return total / m.sum().clamp_min(1.0)
        return total / max(values.shape[0], 1)
    if denominator < 0:
        raise ValueError(f"denominator must be >= 0, got {denominator}")
    return total / max(denominator, 1)


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, penalty: float = 1.0) -> Tensor:
    """R_len(L) = 0 if L <= max_len - buffer; (max_len - buffer - L) / buffer * penalty if max_len - buffer < L <= max_len; -penalty if L > max_len.

    DAPO's soft overlong punishment, added to the task reward.  ``buffer == 0``
    disables it (all zeros).  Returns ``[B]`` float (default dtype).
    """
    if buffer < 0:
        raise ValueError(f"overlong buffer must be >= 0, got {buffer}")
    if buffer > max_len:
        raise ValueError(f"overlong buffer ({buffer}) must not exceed max_len ({max_len})")
    length = lengths.to(torch.get_default_dtype())
    if buffer == 0:
        return torch.zeros_like(length)
    expected = float(max_len - buffer)
    ramp = (expected - length) / buffer * penalty
    out = torch.where(length > max_len, torch.full_like(length, -penalty), ramp)
    return torch.where(length <= expected, torch.zeros_like(length), out)


def groups_with_signal(rewards: Tensor, group_size: int) -> Tensor:
    """keep_g = max_g(r) - min_g(r) > 1e-6  (DAPO dynamic sampling: drop groups with identical rewards).

    Returns ``[B // group_size]`` bool.
    """
    r = _grouped(rewards, group_size)
    return (r.amax(dim=1) - r.amin(dim=1)) > _SIGNAL_TOL


def _masked_mean(x: Tensor, valid: Tensor, count: Tensor) -> Tensor:
    return torch.where(valid, x, torch.zeros_like(x)).sum() / count


def policy_loss(
    logp_new: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    agg_mode: str,
    token_weights: Tensor | None = None,
    weight_mode: str = "multiply",
    logp_ref: Tensor | None = None,
    beta: float = 0.0,
    max_len: int | None = None,
    denominator: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """L = agg( w * l_clip(A) + beta * k3 ) (multiply) or agg( l_clip(A + w) + beta * k3 ) (additive).

    * ``l_clip`` is :func:`clipped_surrogate`; ``w`` ``[B, N]`` are APPO token
      weights (``None`` = ones), used as given (the caller decides whether they
      carry gradient).  ``"multiply"`` scales the per-token clipped loss (APPO's
      default "arpo_kl" objective); ``"additive"`` uses the per-token advantage
      ``A + w`` inside the clipped surrogate.
    * The k3 term is added when ``beta > 0`` (``logp_ref`` required then).
    * ``agg`` is :func:`aggregate` with ``agg_mode`` / ``max_len`` / ``denominator``:
      ``None`` normalises by this batch's own count; a micro-batch of a larger step
      passes the step's :func:`aggregation_denominator` so the parts add up exactly.

    Returns ``(loss, stats)``; stats are detached 0-dim tensors: ``clip_frac``,
    ``clip_frac_low``, ``clip_frac_high`` (fractions of valid tokens), ``kl``
    (mean k3 over valid tokens, 0 without ``logp_ref``), ``ratio_mean`` and
    ``ratio_max`` (over valid tokens; 0 when there are none).
    """
    if weight_mode not in WEIGHT_MODES:
        raise ValueError(
            f"unknown weight_mode {weight_mode!r}; valid modes: {', '.join(WEIGHT_MODES)}"
        )
    if agg_mode not in AGG_MODES:
        raise ValueError(
            f"unknown aggregation mode {agg_mode!r}; valid modes: {', '.join(AGG_MODES)}"
        )
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and logp_ref is None:
        raise ValueError("beta > 0 requires logp_ref (reference-policy log-probs)")

    adv = advantages.unsqueeze(-1) if advantages.dim() == logp_new.dim() - 1 else advantages
    if token_weights is not None and weight_mode == "additive":
        eff_adv = adv + token_weights
        per_token, _ = clipped_surrogate(logp_new, logp_old, eff_adv, clip_low, clip_high)
    else:
        eff_adv = adv
        per_token, _ = clipped_surrogate(logp_new, logp_old, adv, clip_low, clip_high)
        if token_weights is not None:
            per_token = token_weights * per_token

    kl_tok: Tensor | None = None
    if logp_ref is not None:
        kl_tok = k3_kl(logp_new, logp_ref)
        if beta > 0:
            per_token = per_token + beta * kl_tok

    loss = aggregate(per_token, mask, agg_mode, max_len, denominator)

    with torch.no_grad():
        valid = _valid(mask, logp_new)
        dtype = per_token.dtype
        count = valid.sum().to(dtype).clamp_min(1.0)
        ratio = torch.exp(logp_new.detach() - logp_old.detach())
        low, high = _clip_flags_split(ratio, eff_adv.detach(), clip_low, clip_high)
        low = low.expand_as(valid) & valid
        high = high.expand_as(valid) & valid
        zero = torch.zeros((), dtype=dtype, device=logp_new.device)
        ratio_max = (
            torch.where(valid, ratio, torch.zeros_like(ratio)).amax().to(dtype)
            if ratio.numel() > 0
            else zero
        )
        stats = {
            "clip_frac": (low | high).sum().to(dtype) / count,
            "clip_frac_low": low.sum().to(dtype) / count,
            "clip_frac_high": high.sum().to(dtype) / count,
            "kl": _masked_mean(kl_tok.detach(), valid, count).to(dtype)
            if kl_tok is not None
            else zero,
            "ratio_mean": _masked_mean(ratio, valid, count).to(dtype),
            "ratio_max": ratio_max,
        }
    return loss, stats
