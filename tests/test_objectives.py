"""Hand-checked tests for appo.rl.objectives (GRPO / DAPO / Dr. GRPO / APPO loss pieces).

Every expected number is written out (with its arithmetic in a comment) rather
than produced by the function under test.  Most tests run in float64 so that
ratios such as exp(log(1.28)) round-trip exactly and clip-boundary flags are
deterministic.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from appo.rl.objectives import (
    aggregate,
    aggregation_denominator,
    clipped_surrogate,
    group_advantages,
    groups_with_signal,
    k3_kl,
    overlong_penalty,
    policy_loss,
)

F64 = torch.float64


def t(x: object, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.tensor(x, dtype=dtype)


def close(a: torch.Tensor, b: object, tol: float = 1e-9) -> None:
    expected = b if isinstance(b, torch.Tensor) else torch.tensor(b, dtype=a.dtype)
    torch.testing.assert_close(a, expected.to(a.dtype), atol=tol, rtol=tol)


# --------------------------------------------------------------------------- advantages


def test_group_advantages_two_groups() -> None:
    rewards = t([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    adv = group_advantages(rewards, group_size=4)
    # group 0: mean 0.5, deviations +-0.5, unbiased var = 4 * 0.25 / 3 = 1/3,
    # std = sqrt(1/3) = 0.5773503; A = +-0.5 / (0.5773503 + 1e-4) = +-0.8658752
    a = 0.5 / (math.sqrt(1.0 / 3.0) + 1e-4)
    assert abs(a - 0.8658752) < 1e-6
    # group 1: all equal -> exactly 0
    close(adv, [a, -a, -a, a, 0.0, 0.0, 0.0, 0.0])
    assert torch.equal(adv[4:], torch.zeros(4, dtype=F64))


def test_group_advantages_pair_uses_unbiased_std() -> None:
    # G = 2, rewards [0, 1]: mean 0.5, unbiased var = (0.25 + 0.25) / 1 = 0.5,
    # std = 0.7071068 (the biased std would be 0.5 and give +-1)
    adv = group_advantages(t([0.0, 1.0, 3.0, 1.0]), group_size=2, eps=0.0)
    s = math.sqrt(0.5)
    # group 1: [3, 1], mean 2, deviations +-1, std = sqrt(2) -> +-0.7071068
    close(adv, [-0.5 / s, 0.5 / s, 1 / math.sqrt(2.0), -1 / math.sqrt(2.0)])


def test_group_advantages_all_equal_is_exact_zero_without_nan() -> None:
    # 0.1 * 3 / 3 != 0.1 in floating point; must still be exactly 0, for any eps
    for eps in (1e-4, 0.0):
        adv = group_advantages(t([0.1, 0.1, 0.1]), group_size=3, eps=eps)
        assert torch.equal(adv, torch.zeros(3, dtype=F64))
    adv32 = group_advantages(torch.full((6,), 0.7), group_size=3, eps=0.0)
    assert torch.equal(adv32, torch.zeros(6))
    assert adv32.dtype == torch.float32


def test_group_advantages_dr_grpo_no_std() -> None:
    rewards = t([1.0, 0.0, 0.0, 1.0, 2.0, 0.0, 0.0, 0.0])
    adv = group_advantages(rewards, group_size=4, scale_std=False)
    # group 0: mean 0.5 -> [0.5, -0.5, -0.5, 0.5]; group 1: mean 0.5 -> [1.5, -0.5, -0.5, -0.5]
    close(adv, [0.5, -0.5, -0.5, 0.5, 1.5, -0.5, -0.5, -0.5])


def test_group_advantages_int_rewards_become_float() -> None:
    adv = group_advantages(torch.tensor([1, 0]), group_size=2, scale_std=False)
    assert adv.is_floating_point()
    close(adv, [0.5, -0.5])


@pytest.mark.parametrize(("n", "g"), [(6, 4), (4, 1), (4, 0)])
def test_group_advantages_bad_group_size(n: int, g: int) -> None:
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(n), group_size=g)


# --------------------------------------------------------------------- clipped surrogate

RATIOS = [0.7, 0.8, 1.0, 1.2, 1.28, 1.5]


def _logps(ratios: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    new = torch.log(t([ratios]))
    return new, torch.zeros_like(new)


def test_clipped_surrogate_positive_advantage() -> None:
    new, old = _logps(RATIOS)
    loss, clipped = clipped_surrogate(new, old, t([1.0]), clip_low=0.2, clip_high=0.28)
    # A = +1: clip(r, 0.8, 1.28) = [0.8, 0.8, 1, 1.2, 1.28, 1.28]
    # min(r, clip(r)) = [0.7, 0.8, 1.0, 1.2, 1.28, 1.28]; loss = -that
    close(loss, [[-0.7, -0.8, -1.0, -1.2, -1.28, -1.28]])
    # only r = 1.5 > 1.28 is clipped; r = 1.28 sits on the bound (branches equal);
    # r < 0.8 with A > 0 keeps the (smaller) unclipped branch
    assert clipped.tolist() == [[False, False, False, False, False, True]]


def test_clipped_surrogate_negative_advantage() -> None:
    new, old = _logps(RATIOS)
    loss, clipped = clipped_surrogate(new, old, t([-2.0]), clip_low=0.2, clip_high=0.28)
    # A = -2: r*A = [-1.4, -1.6, -2, -2.4, -2.56, -3.0]
    # clip(r)*A = [-1.6, -1.6, -2, -2.4, -2.56, -2.56]
    # min = [-1.6, -1.6, -2, -2.4, -2.56, -3.0]; loss = -min
    close(loss, [[1.6, 1.6, 2.0, 2.4, 2.56, 3.0]])
    # only r = 0.7 < 0.8 is clipped; r = 0.8 is on the bound
    assert clipped.tolist() == [[True, False, False, False, False, False]]


def test_clipped_surrogate_symmetric_clip_and_per_token_advantages() -> None:
    new, old = _logps(RATIOS)
    loss, clipped = clipped_surrogate(new, old, t([1.0]), clip_low=0.2, clip_high=0.2)
    # clip_high 0.2: r = 1.28 and 1.5 are both clipped to 1.2
    close(loss, [[-0.7, -0.8, -1.0, -1.2, -1.2, -1.2]])
    assert clipped.tolist() == [[False, False, False, False, True, True]]
    # per-token advantages [B, N]; A = 0 never counts as clipped
    adv = t([[0.0, -1.0, 0.0, 0.0, 1.0, 0.0]])
    loss, clipped = clipped_surrogate(new, old, adv, clip_low=0.2, clip_high=0.2)
    # token 1: r=0.8, A=-1 -> 0.8 (bound); token 4: r=1.28, A=1 -> -1.2 (clipped)
    close(loss, [[0.0, 0.8, 0.0, 0.0, -1.2, 0.0]])
    assert clipped.tolist() == [[False, False, False, False, True, False]]


# ---------------------------------------------------------------------------------- k3


def test_k3_values() -> None:
    logp = t([0.0, 0.0, 0.0, -1.0])
    ref = t([math.log(2.0), -math.log(2.0), 0.0, -1.0])
    k = k3_kl(logp, ref)
    # d = log 2: 2 - log 2 - 1 = 0.3068528;  d = -log 2: 0.5 + log 2 - 1 = 0.1931472;  d = 0: 0
    close(k, [1.0 - math.log(2.0), math.log(2.0) - 0.5, 0.0, 0.0])
    assert abs(k[0].item() - 0.3068528) < 1e-7
    assert bool((k3_kl(torch.randn(64), torch.randn(64)) >= 0).all())


# ---------------------------------------------------------------------------- aggregate


def _ragged() -> tuple[torch.Tensor, torch.Tensor]:
    # seq 0 has 1 valid token (value 4), seq 1 has 3 (values 1, 2, 3); padding is garbage
    values = t([[4.0, float("nan"), float("inf")], [1.0, 2.0, 3.0]])
    mask = t([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    return values, mask


def test_aggregate_token_mean() -> None:
    v, m = _ragged()
    # (4 + 1 + 2 + 3) / 4 = 2.5
    close(aggregate(v, m, "token-mean"), 2.5)
    close(aggregate(v, m.bool(), "token-mean"), 2.5)


def test_aggregate_seq_mean_token_mean() -> None:
    v, m = _ragged()
    # (4/1 + 6/3) / 2 = 3
    close(aggregate(v, m, "seq-mean-token-mean"), 3.0)


def test_aggregate_seq_mean_token_sum_norm() -> None:
    v, m = _ragged()
    # max_len defaults to N = 3: (4/3 + 6/3) / 2 = 5/3
    close(aggregate(v, m, "seq-mean-token-sum-norm"), 5.0 / 3.0)
    # max_len = 5: (4/5 + 6/5) / 2 = 1
    close(aggregate(v, m, "seq-mean-token-sum-norm", max_len=5), 1.0)


def test_aggregate_empty_rows_no_nan() -> None:
    v, m = _ragged()
    v = torch.cat([v, t([[float("nan"), 7.0, 7.0]])])
    m = torch.cat([m, t([[0.0, 0.0, 0.0]])])
    close(aggregate(v, m, "token-mean"), 2.5)  # 10 / 4
    close(aggregate(v, m, "seq-mean-token-mean"), 2.0)  # (4 + 2 + 0) / 3
    close(aggregate(v, m, "seq-mean-token-sum-norm"), 10.0 / 9.0)  # (4/3 + 2 + 0) / 3
    zero_mask = torch.zeros_like(m)
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        close(aggregate(v, zero_mask, mode), 0.0)


def test_aggregate_unknown_mode_lists_valid() -> None:
    v, m = _ragged()
    with pytest.raises(
        ValueError, match="token-mean.*seq-mean-token-mean.*seq-mean-token-sum-norm"
    ):
        aggregate(v, m, "sum")


# --------------------------------------------------------------------- overlong penalty


def test_overlong_penalty_boundaries() -> None:
    lengths = torch.tensor([0, 15, 16, 17, 18, 19, 20, 21, 100])
    out = overlong_penalty(lengths, max_len=20, buffer=4, penalty=1.0)
    # expected length 20 - 4 = 16: L <= 16 -> 0; 16 < L <= 20 -> (16 - L) / 4; L > 20 -> -1
    close(out, [0.0, 0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0], tol=1e-6)
    assert out.is_floating_point()


def test_overlong_penalty_factor_and_disabled() -> None:
    lengths = torch.tensor([16, 18, 25])
    # penalty 0.5: 18 -> (16 - 18) / 4 * 0.5 = -0.25; 25 -> -0.5
    close(overlong_penalty(lengths, 20, 4, penalty=0.5), [0.0, -0.25, -0.5], tol=1e-6)
    assert torch.equal(overlong_penalty(lengths, 20, 0), torch.zeros(3))
    with pytest.raises(ValueError):
        overlong_penalty(lengths, 20, -1)


# ------------------------------------------------------------------- dynamic sampling


def test_groups_with_signal() -> None:
    rewards = t([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5 + 1e-8, 0.0, 0.0, 1e-3])
    # groups of 3: all 1 -> no signal; mixed -> signal; spread 1e-8 < 1e-6 -> none; 1e-3 -> signal
    assert groups_with_signal(rewards, 3).tolist() == [False, True, False, True]
    with pytest.raises(ValueError, match="multiple"):
        groups_with_signal(rewards, 5)


# -------------------------------------------------------------------------- policy_loss


def _random_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b, n = 4, 5
    old = -torch.rand(b, n, generator=g, dtype=F64) * 3
    new = old + 0.4 * torch.randn(b, n, generator=g, dtype=F64)
    mask = t([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]])
    adv = t([1.0, -0.5, 2.0, -1.5])
    return {"new": new, "old": old, "mask": mask, "adv": adv}


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_policy_loss_unit_weights_match_unweighted(agg: str) -> None:
    d = _random_batch()
    kw = {"clip_low": 0.2, "clip_high": 0.28, "agg_mode": agg}
    new_a = d["new"].clone().requires_grad_(True)
    new_b = d["new"].clone().requires_grad_(True)
    loss_a, _ = policy_loss(new_a, d["old"], d["adv"], d["mask"], **kw)
    loss_b, _ = policy_loss(
        new_b, d["old"], d["adv"], d["mask"], token_weights=torch.ones_like(d["new"]), **kw
    )
    (ga,) = torch.autograd.grad(loss_a, new_a)
    (gb,) = torch.autograd.grad(loss_b, new_b)
    torch.testing.assert_close(loss_a, loss_b, atol=0, rtol=0)
    torch.testing.assert_close(ga, gb, atol=0, rtol=0)
    # and the unweighted loss is the aggregated clipped surrogate
    per_tok, _ = clipped_surrogate(d["new"], d["old"], d["adv"], 0.2, 0.28)
    close(loss_a.detach(), aggregate(per_tok, d["mask"], agg))


def test_aggregation_denominator_counts_tokens_or_rows() -> None:
    masks = [t([[1, 0]]), t([[1, 1, 1, 0], [1, 1, 1, 1]]).bool()]
    assert aggregation_denominator(masks, "token-mean") == 8  # 1 + 3 + 4 valid tokens
    assert aggregation_denominator(masks, "seq-mean-token-mean") == 3  # rows
    assert aggregation_denominator(masks, "seq-mean-token-sum-norm") == 3
    assert aggregation_denominator([torch.zeros(2, 3)], "token-mean") == 0  # aggregate clamps
    close(aggregate(t([[5.0, 7.0]]), t([[0.0, 0.0]]), "token-mean", denominator=0), 0.0)
    with pytest.raises(ValueError, match="unknown aggregation mode"):
        aggregation_denominator(masks, "sum")


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_policy_loss_micro_batches_add_up_to_the_whole_batch(agg: str) -> None:
    """One step's batch split into micro-batches of different token counts (and paddings):
    with the step's denominator the micro-batch losses and gradients sum to the whole batch's.

    3 responses with 1, 3, 4 valid tokens, A = [1, -2, 0.5], logp_new = logp_old (ratio 1,
    nothing clipped): the per-token loss is -A_i, so d loss / d logp_new[i, n] = -A_i * c_i with
      token-mean:               c_i = 1 / 8          (8 valid tokens in the step)
      seq-mean-token-mean:      c_i = 1 / (3 n_i)    (3 sequences, n = [1, 3, 4])
      seq-mean-token-sum-norm:  c_i = 1 / (3 * 4)    (max_len 4)
    Per-micro-batch means weighted by row share gave 1/3 instead of 1/8 for the 1-token row.
    """
    adv = t([1.0, -2.0, 0.5])
    lengths = [1, 3, 4]
    coef = {"token-mean": [1 / 8] * 3,
            "seq-mean-token-mean": [1 / (3 * n) for n in lengths],
            "seq-mean-token-sum-norm": [1 / 12] * 3}[agg]
    kw = {"clip_low": 0.2, "clip_high": 0.28, "agg_mode": agg, "max_len": 4}

    def part(rows: list[int], width: int):
        mask = t([[1.0 if n < lengths[i] else 0.0 for n in range(width)] for i in rows])
        logp = -torch.rand(len(rows), width, dtype=F64)
        return logp.requires_grad_(True), mask

    whole, whole_mask = part([0, 1, 2], 5)  # extra padding column
    loss_whole, _ = policy_loss(whole, whole.detach(), adv, whole_mask, **kw)
    (g_whole,) = torch.autograd.grad(loss_whole, whole)

    micro = [([0], part([0], 2)), ([1, 2], part([1, 2], 4))]  # 1 token | 7 tokens
    denom = aggregation_denominator([m for _, (_, m) in micro], agg)
    assert denom == (8 if agg == "token-mean" else 3)
    total = 0.0
    for rows, (logp, mask) in micro:
        loss, _ = policy_loss(logp, logp.detach(), adv[rows], mask, denominator=denom, **kw)
        (g,) = torch.autograd.grad(loss, logp)
        total = total + loss.detach()
        for j, i in enumerate(rows):
            expected = torch.zeros(logp.shape[1], dtype=F64)
            expected[: lengths[i]] = -float(adv[i]) * coef[i]
            close(g[j], expected, tol=1e-12)
            close(g[j], g_whole[i, : logp.shape[1]], tol=1e-12)
    close(total, loss_whole.detach(), tol=1e-12)
    # the loss itself: sum_i (-A_i) * n_i * c_i
    close(total, sum(-float(adv[i]) * lengths[i] * coef[i] for i in range(3)), tol=1e-12)
    # one micro-batch holding everything: the same as no denominator at all
    loss_one, _ = policy_loss(whole, whole.detach(), adv, whole_mask,
                              denominator=aggregation_denominator([whole_mask], agg), **kw)
    torch.testing.assert_close(loss_one, loss_whole, atol=0, rtol=0)


def _two_by_two() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    log15 = math.log(1.5)
    new = t([[0.0, log15], [log15, 0.0]])  # ratios [[1, 1.5], [1.5, 1]]
    old = torch.zeros(2, 2, dtype=F64)
    adv = t([1.0, 1.0])
    mask = torch.ones(2, 2, dtype=F64)
    return new, old, adv, mask


def test_policy_loss_additive_by_hand() -> None:
    new, old, adv, mask = _two_by_two()
    w = t([[0.5, 0.5], [-2.0, 0.0]])
    loss, stats = policy_loss(
        new, old, adv, mask, clip_low=0.2, clip_high=0.2, agg_mode="token-mean",
        token_weights=w, weight_mode="additive",
    )  # fmt: skip
    # effective advantages A + w = [[1.5, 1.5], [-1, 1]]
    # (0,0): r=1,   A'=1.5 -> -1.5
    # (0,1): r=1.5, A'=1.5 -> -min(2.25, 1.2*1.5=1.8) = -1.8   (clipped high)
    # (1,0): r=1.5, A'=-1  -> -min(-1.5, -1.2) = 1.5           (not clipped)
    # (1,1): r=1,   A'=1   -> -1
    # token-mean: (-1.5 - 1.8 + 1.5 - 1) / 4 = -0.7
    close(loss, -0.7)
    close(stats["clip_frac"], 0.25)
    close(stats["clip_frac_high"], 0.25)
    close(stats["clip_frac_low"], 0.0)
    close(stats["ratio_mean"], 1.25)  # (1 + 1.5 + 1.5 + 1) / 4
    close(stats["ratio_max"], 1.5)
    close(stats["kl"], 0.0)


def test_policy_loss_multiply_by_hand() -> None:
    new, old, adv, mask = _two_by_two()
    w = t([[0.5, 0.5], [2.0, 0.0]])
    loss, stats = policy_loss(
        new, old, adv, mask, clip_low=0.2, clip_high=0.2, agg_mode="seq-mean-token-mean",
        token_weights=w,
    )  # fmt: skip
    # l_clip = [[-1, -1.2], [-1.2, -1]]; w * l_clip = [[-0.5, -0.6], [-2.4, 0]]
    # seq means: -0.55, -1.2; mean = -0.875
    close(loss, -0.875)
    close(stats["clip_frac"], 0.5)  # (0,1) and (1,0) clipped high


def test_policy_loss_kl_term() -> None:
    new = torch.zeros(1, 2, dtype=F64)
    old = torch.zeros(1, 2, dtype=F64)
    ref = t([[math.log(2.0), -math.log(2.0)]])
    mask = torch.ones(1, 2, dtype=F64)
    adv = t([1.0])
    kw = {"clip_low": 0.2, "clip_high": 0.2, "agg_mode": "token-mean"}
    loss, stats = policy_loss(new, old, adv, mask, logp_ref=ref, beta=0.1, **kw)
    # surrogate -1 per token; k3 = [2 - log2 - 1, 0.5 + log2 - 1], mean = 0.5 / 2 = 0.25
    # loss = -1 + 0.1 * 0.25 = -0.975
    close(loss, -0.975)
    close(stats["kl"], 0.25)
    loss0, stats0 = policy_loss(new, old, adv, mask, logp_ref=ref, beta=0.0, **kw)
    close(loss0, -1.0)
    close(stats0["kl"], 0.25)  # reported even when not in the loss
    with pytest.raises(ValueError, match="logp_ref"):
        policy_loss(new, old, adv, mask, beta=0.1, **kw)


def test_policy_loss_gradient_zero_on_clipped_tokens() -> None:
    # ratios 1.5 (A>0: clipped high), 1.0, 0.5 (A<0: clipped low), 1.1, pad
    new = torch.log(t([[1.5, 1.0, 0.5, 1.1, 9.0]])).requires_grad_(True)
    old = torch.zeros(1, 5, dtype=F64)
    adv = t([[1.0, 1.0, -1.0, -1.0, 1.0]])
    mask = t([[1.0, 1.0, 1.0, 1.0, 0.0]])
    loss, stats = policy_loss(
        new, old, adv, mask, clip_low=0.2, clip_high=0.2, agg_mode="token-mean"
    )
    (grad,) = torch.autograd.grad(loss, new)
    # unclipped tokens: d(-r*A/4)/d logp = -r*A/4 -> token 1: -0.25, token 3: +1.1/4 = 0.275
    close(grad, [[0.0, -0.25, 0.0, 0.275, 0.0]])
    close(stats["clip_frac"], 0.5)
    close(stats["clip_frac_low"], 0.25)
    close(stats["clip_frac_high"], 0.25)
    close(stats["ratio_max"], 1.5)  # padded ratio 9 is ignored
    assert all(not v.requires_grad for v in stats.values())


def test_policy_loss_bad_modes() -> None:
    d = _random_batch()
    with pytest.raises(ValueError, match="weight_mode"):
        policy_loss(d["new"], d["old"], d["adv"], d["mask"], clip_low=0.2, clip_high=0.2,
                    agg_mode="token-mean", weight_mode="exp")  # fmt: skip
    with pytest.raises(ValueError, match="token-mean"):
        policy_loss(d["new"], d["old"], d["adv"], d["mask"], clip_low=0.2, clip_high=0.2,
                    agg_mode="mean")  # fmt: skip


# ------------------------------------------------------------------ property tests

_reward = st.floats(min_value=-10.0, max_value=10.0, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(
    group_size=st.integers(2, 6),
    n_groups=st.integers(1, 3),
    data=st.data(),
    shift=st.floats(-50.0, 50.0),
    scale_std=st.booleans(),
)
def test_prop_group_shift_invariance(
    group_size: int, n_groups: int, data: st.DataObject, shift: float, scale_std: bool
) -> None:
    r = t(
        data.draw(st.lists(_reward, min_size=group_size * n_groups, max_size=group_size * n_groups))
    )
    shifts = t(data.draw(st.lists(st.floats(-50.0, 50.0), min_size=n_groups, max_size=n_groups)))
    shifted = r + shifts.repeat_interleave(group_size) + shift
    a = group_advantages(r, group_size, scale_std=scale_std)
    b = group_advantages(shifted, group_size, scale_std=scale_std)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    rewards=st.lists(_reward, min_size=4, max_size=4),
    c=st.floats(min_value=0.1, max_value=10.0),
)
def test_prop_group_scale_invariance(rewards: list[float], c: float) -> None:
    r = t(rewards)
    assume(r.std().item() > 0.1)
    a = group_advantages(r, 4)
    b = group_advantages(r * c, 4)
    # eps = 1e-4 breaks exact invariance by a relative ~eps/std * |1 - 1/c| <= 1e-2
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-2)
    # with eps = 0 it is exact up to rounding
    torch.testing.assert_close(
        group_advantages(r, 4, eps=0.0), group_advantages(r * c, 4, eps=0.0), atol=1e-9, rtol=1e-9
    )


@settings(max_examples=60, deadline=None)
@given(
    rewards=st.lists(st.floats(-1e3, 1e3), min_size=6, max_size=6),
    logratio=st.lists(st.floats(-5.0, 5.0), min_size=12, max_size=12),
    mask_bits=st.lists(st.booleans(), min_size=12, max_size=12),
    agg=st.sampled_from(["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]),
    weight_mode=st.sampled_from(["multiply", "additive"]),
)
def test_prop_outputs_finite(
    rewards: list[float], logratio: list[float], mask_bits: list[bool], agg: str, weight_mode: str
) -> None:
    adv = group_advantages(torch.tensor(rewards), 3)
    assert torch.isfinite(adv).all()
    adv_dr = group_advantages(torch.tensor(rewards), 3, scale_std=False)
    assert torch.isfinite(adv_dr).all()
    new = torch.tensor(logratio).view(6, 2).requires_grad_(True)
    old = torch.zeros(6, 2)
    mask = torch.tensor(mask_bits).view(6, 2)
    w = torch.rand(6, 2)
    loss, stats = policy_loss(
        new, old, adv, mask, clip_low=0.2, clip_high=0.28, agg_mode=agg,
        token_weights=w, weight_mode=weight_mode, logp_ref=torch.zeros(6, 2), beta=0.05,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(loss, new)
    assert torch.isfinite(loss)
    assert torch.isfinite(grad).all()
    assert all(torch.isfinite(v) for v in stats.values())
    assert 0.0 <= stats["clip_frac"].item() <= 1.0
