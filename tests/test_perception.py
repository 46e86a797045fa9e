"""Hand-computed tests for appo.rl.perception (docs/method.md, APPO token weights, steps 1-6)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from appo.rl.perception import (
    aligned_divergence,
    crucial_frames,
    frame_scores,
    minmax,
    perception_token_index,
    perception_weights,
    scatter_token_weights,
)

# Divergence of the pair A = [0.5, 0.5], B = [0.9, 0.1] (worked out in test_divergence_hand).
D_AB = (math.sqrt(1.8) + 1 / math.sqrt(1.8) + math.sqrt(5) + 1 / math.sqrt(5)) / 2 - 2  # 0.385139
# Divergence of the pair B = [0.9, 0.1], C = [0.1, 0.9]: (3 + 1/3) - 2 = 4/3.
D_BC = 4.0 / 3.0


def _t(x: list) -> Tensor:
    return torch.tensor(x, dtype=torch.float32)


def _b(x: list) -> Tensor:
    return torch.tensor(x, dtype=torch.bool)


def _frames_set(v: Tensor) -> set[int]:
    return {int(i) for i in v.nonzero().flatten()}


# --------------------------------------------------------------------------- frame_scores


def _scores_inputs() -> tuple[Tensor, Tensor]:
    # G=3, N=3, T=2; attn[i, n, t]
    attn = torch.zeros(3, 3, 2)
    # response 0: token 2 masked (its values 0.3 / 0.6 must be ignored)
    attn[0, :, 0] = _t([0.1, 0.5, 0.3])
    attn[0, :, 1] = _t([0.2, 0.2, 0.6])
    # response 1: no valid tokens at all
    attn[1, :, 0] = _t([0.7, 0.7, 0.7])
    attn[1, :, 1] = _t([0.9, 0.9, 0.9])
    # response 2: all valid
    attn[2, :, 0] = _t([0.4, 0.1, 0.7])
    attn[2, :, 1] = _t([0.0, 0.9, 0.3])
    mask = _b([[True, True, False], [False, False, False], [True, True, True]])
    return attn, mask


def test_frame_scores_k1() -> None:
    attn, mask = _scores_inputs()
    s = frame_scores(attn, mask, k_avg=1)
    # r0: max over valid tokens {0.1, 0.5} = 0.5 ; {0.2, 0.2} = 0.2
    # r1: no valid tokens -> 0, 0
    # r2: max {0.4,0.1,0.7} = 0.7 ; max {0.0,0.9,0.3} = 0.9
    torch.testing.assert_close(s, _t([[0.5, 0.2], [0.0, 0.0], [0.7, 0.9]]))


def test_frame_scores_k2() -> None:
    attn, mask = _scores_inputs()
    s = frame_scores(attn, mask, k_avg=2)
    # r0: (0.5 + 0.1)/2 = 0.3 ; (0.2 + 0.2)/2 = 0.2
    # r2: (0.7 + 0.4)/2 = 0.55 ; (0.9 + 0.3)/2 = 0.6
    torch.testing.assert_close(s, _t([[0.3, 0.2], [0.0, 0.0], [0.55, 0.6]]))


def test_frame_scores_k_larger_than_n() -> None:
    attn, mask = _scores_inputs()
    s = frame_scores(attn, mask, k_avg=15)
    # k_avg > N: mean over all valid tokens.
    # r0: 2 valid tokens: (0.1+0.5)/2 = 0.3 ; (0.2+0.2)/2 = 0.2
    # r2: 3 valid tokens: (0.4+0.1+0.7)/3 = 0.4 ; (0.0+0.9+0.3)/3 = 0.4
    torch.testing.assert_close(s, _t([[0.3, 0.2], [0.0, 0.0], [0.4, 0.4]]))


def test_frame_scores_k3_with_fewer_valid() -> None:
    attn, mask = _scores_inputs()
    s = frame_scores(attn, mask, k_avg=3)
    # k_avg == N but r0 has only 2 valid tokens -> average over those 2 (not divided by 3)
    torch.testing.assert_close(s[0], _t([0.3, 0.2]))


# -------------------------------------------------------------------------- crucial_frames

# G=3, T=5, k_f=2. Per-response top-2 frames (ties -> lower index):
#   r0: [0.9, 0.1, 0.8, 0.0, 0.0] -> {0, 2}
#   r1: [0.0, 0.5, 0.7, 0.1, 0.0] -> {2, 1}
#   r2: [0.3, 0.3, 0.3, 0.3, 0.9] -> {4, 0}  (0.3 tie between frames 0..3 -> frame 0)
SCORES = _t(
    [
        [0.9, 0.1, 0.8, 0.0, 0.0],
        [0.0, 0.5, 0.7, 0.1, 0.0],
        [0.3, 0.3, 0.3, 0.3, 0.9],
    ]
)
ALL_ROWS = _b([True, True, True])


@pytest.mark.parametrize(
    ("correct", "level", "expected"),
    [
        # correct = {r0}: psi(S1) = {0,2}; psi(S2) = {1,2} | {0,4} = {0,1,2,4}
        ([True, False, False], "all", {0, 1, 2, 4}),
        ([True, False, False], "soft", {0, 2}),
        ([True, False, False], "hard", set()),  # {0,2} - {0,1,2,4} = empty
        # correct = {r0, r2}: psi(S1) = {0,2,4}; psi(S2) = {1,2}
        ([True, False, True], "all", {0, 1, 2, 4}),
        ([True, False, True], "soft", {0, 2, 4}),
        ([True, False, True], "hard", {0, 4}),
        # all wrong: S1 empty -> soft falls back to psi(all) ; hard empty
        ([False, False, False], "all", {0, 1, 2, 4}),
        ([False, False, False], "soft", {0, 1, 2, 4}),
        ([False, False, False], "hard", set()),
        # all correct: S2 empty -> every level gives psi(all)
        ([True, True, True], "all", {0, 1, 2, 4}),
        ([True, True, True], "soft", {0, 1, 2, 4}),
        ([True, True, True], "hard", {0, 1, 2, 4}),
    ],
)
def test_crucial_frames_levels(correct: list[bool], level: str, expected: set[int]) -> None:
    v = crucial_frames(SCORES, _b(correct), ALL_ROWS, 2, level, "topk-union")
    assert v.dtype == torch.bool and v.shape == (5,)
    assert _frames_set(v) == expected


def test_crucial_frames_strategy_all() -> None:
    for level in ("all", "soft", "hard"):
        v = crucial_frames(SCORES, _b([False, False, False]), ALL_ROWS, 2, level, "all")
        assert v.tolist() == [True] * 5


def test_crucial_frames_invalid_rows_excluded() -> None:
    # r1 has no tokens: it is in neither S1 nor S2, even though marked correct.
    # S1 = {} -> soft falls back to psi(valid rows) = {0,2} | {4,0} = {0,2,4}
    v = crucial_frames(SCORES, _b([False, True, False]), _b([True, False, True]), 2, "soft")
    assert _frames_set(v) == {0, 2, 4}
    # all: psi(S2 = {r0, r2}) = {0,2,4}; r1's {1,2} does not count
    v = crucial_frames(SCORES, _b([False, True, False]), _b([True, False, True]), 2, "all")
    assert _frames_set(v) == {0, 2, 4}


def test_crucial_frames_ties_and_cap() -> None:
    scores = _t([[0.2, 0.2, 0.2, 0.2]])
    # all tied: top-2 = the two lowest indices
    v = crucial_frames(scores, _b([True]), _b([True]), 2, "all")
    assert v.tolist() == [True, True, False, False]
    # k_f > T is capped at T
    v = crucial_frames(SCORES, _b([True, False, False]), ALL_ROWS, 10, "soft")
    assert v.tolist() == [True] * 5
    # tie with a different top value: [0.5, 0.1, 0.5, 0.5], k_f = 2 -> {0, 2}
    v = crucial_frames(_t([[0.5, 0.1, 0.5, 0.5]]), _b([True]), _b([True]), 2, "all")
    assert _frames_set(v) == {0, 2}


def test_crucial_frames_never_pick_invalid_frames() -> None:
    # T = 4 but the group's video has 2 temporal patches: frames 2, 3 are padding of a
    # micro-batch with a longer video, here with large (garbage) scores.
    scores = _t([[0.1, 0.2, 9.0, 8.0], [0.3, 0.1, 7.0, 0.0]])
    fv = _b([True, True, False, False])
    correct, rows = _b([True, False]), _b([True, True])
    # k_f = 1: r0 -> frame 1 (0.2 > 0.1), r1 -> frame 0 (0.3 > 0.1); unmasked both would take 2
    assert _frames_set(crucial_frames(scores, correct, rows, 1, "all")) == {2}
    for frame_valid in (fv, fv.expand(2, 4)):  # [T] or [G, T]
        assert _frames_set(crucial_frames(scores, correct, rows, 1, "all",
                                          frame_valid=frame_valid)) == {0, 1}
        assert _frames_set(crucial_frames(scores, correct, rows, 1, "soft",
                                          frame_valid=frame_valid)) == {1}
        # hard: psi(S1) - psi(S2) = {1} - {0}
        assert _frames_set(crucial_frames(scores, correct, rows, 1, "hard",
                                          frame_valid=frame_valid)) == {1}
        # k_f = 3 > 2 valid frames: only the valid ones, never a padded one (nor "all" frames)
        assert _frames_set(crucial_frames(scores, correct, rows, 3, "all",
                                          frame_valid=frame_valid)) == {0, 1}
        assert _frames_set(crucial_frames(scores, correct, rows, 3, "all", "all",
                                          frame_valid=frame_valid)) == {0, 1}
    # per-response validity: r1's video has only frame 0
    per_row = _b([[True, True, False, False], [True, False, False, False]])
    scores = _t([[0.1, 0.2, 9.0, 8.0], [0.3, 0.9, 7.0, 0.0]])
    assert _frames_set(crucial_frames(scores, correct, rows, 1, "all",
                                      frame_valid=per_row)) == {0, 1}
    with pytest.raises(ValueError, match="frame_valid must be"):
        crucial_frames(scores, correct, rows, 1, frame_valid=_b([True, False]))


def test_crucial_frames_unknown_names() -> None:
    with pytest.raises(ValueError, match="all, soft, hard"):
        crucial_frames(SCORES, ALL_ROWS, ALL_ROWS, 2, "force-all", "topk-union")
    with pytest.raises(ValueError, match="topk-union"):
        crucial_frames(SCORES, ALL_ROWS, ALL_ROWS, 2, "all", "random")


# ------------------------------------------------------------------ perception_token_index


def _token_inputs() -> tuple[Tensor, Tensor, Tensor]:
    # G=2, N=5, T=3, crucial frames {1, 2} (frame 0 is not crucial)
    attn = torch.zeros(2, 5, 3)
    attn[0, :, 0] = _t([0.9, 0.9, 0.9, 0.9, 0.9])  # not crucial: ignored
    attn[0, :, 1] = _t([0.1, 0.9, 0.5, 0.2, 0.5])
    attn[0, :, 2] = _t([0.0, 0.0, 0.0, 0.6, 0.7])
    attn[1, :, 1] = _t([0.3, 0.1, 0.8, 0.0, 0.0])  # token 2 masked: 0.8 ignored
    attn[1, :, 2] = _t([0.2, 0.4, 0.0, 0.0, 0.0])
    mask = _b([[True] * 5, [True, True, False, False, False]])
    frames = _b([False, True, True])
    return attn, mask, frames


def test_perception_token_index_k2_ties() -> None:
    attn, mask, frames = _token_inputs()
    index, valid = perception_token_index(attn, mask, frames, K=2)
    assert index.shape == (2, 2, 2) and index.dtype == torch.long
    # frame 1, r0: 0.9 @1, then tie 0.5 @2 and @4 -> lower position 2 -> [1, 2]
    # frame 1, r1: valid {0.3 @0, 0.1 @1} -> [0, 1]
    # frame 2, r0: 0.7 @4, 0.6 @3 -> sorted by position [3, 4]
    # frame 2, r1: 0.4 @1, 0.2 @0 -> [0, 1]
    assert index.tolist() == [[[1, 2], [0, 1]], [[3, 4], [0, 1]]]
    assert valid.all()


def test_perception_token_index_k3_masked() -> None:
    attn, mask, frames = _token_inputs()
    index, valid = perception_token_index(attn, mask, frames, K=3)
    # frame 1, r0: 0.9 @1, 0.5 @2, 0.5 @4 -> [1, 2, 4]
    # frame 1, r1: only 2 valid tokens -> [0, 1] + one invalid slot
    # frame 2, r0: 0.7 @4, 0.6 @3, then tie 0.0 @0,@1,@2 -> @0 -> [0, 3, 4]
    # frame 2, r1: [0, 1] + invalid
    assert index[:, 0].tolist() == [[1, 2, 4], [0, 3, 4]]
    assert index[:, 1, :2].tolist() == [[0, 1], [0, 1]]
    assert valid.tolist() == [[[True] * 3, [True, True, False]], [[True] * 3, [True, True, False]]]
    assert int(index.min()) >= 0 and int(index.max()) < 5


def test_perception_token_index_n_less_than_k() -> None:
    attn, mask, frames = _token_inputs()
    index, valid = perception_token_index(attn, mask, frames, K=128)
    # Kc = min(K, N) = 5: r0 takes every token, in position order
    assert index.shape == (2, 2, 5)
    assert index[:, 0].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]
    assert index[:, 1, :2].tolist() == [[0, 1], [0, 1]]
    assert valid[:, 1].tolist() == [[True, True, False, False, False]] * 2
    assert valid[:, 0].all()


def test_perception_token_index_no_frames() -> None:
    attn, mask, _ = _token_inputs()
    index, valid = perception_token_index(attn, mask, _b([False, False, False]), K=2)
    assert index.shape == (0, 2, 2) and valid.shape == (0, 2, 2)


# ---------------------------------------------------------------------- aligned_divergence


def _logp(*probs: list[float]) -> Tensor:
    return torch.log(_t(list(probs)))


def test_divergence_hand() -> None:
    # p1 = [0.5, 0.5], p2 = [0.9, 0.1]  (F = 1, G = 2, Kc = 1, V = 2)
    # m = (log p1 + log p2)/2 ; with G = 2: m - log p1 = (log p2 - log p1)/2 = -(m - log p2)
    #   = [ln(0.9/0.5)/2, ln(0.1/0.5)/2] = [x, -y], x = ln(1.8)/2 = 0.293893, y = ln(5)/2 = 0.804719
    # f(z) = e^z - z - 1 : f(x) = 0.047747, f(-y) = 0.251933 -> response 1 sum = 0.299680
    #                      f(-x) = 0.039249, f(y) = 0.431349 -> response 2 sum = 0.470598
    # d = (0.299680 + 0.470598)/2 = 0.385139
    # (closed form: (sqrt1.8 + 1/sqrt1.8 + sqrt5 + 1/sqrt5)/2 - 2)
    logp = _logp([0.5, 0.5], [0.9, 0.1]).view(1, 2, 1, 2)
    d = aligned_divergence(logp, torch.ones(1, 2, 1, dtype=torch.bool))
    assert d.shape == (1, 1)
    assert d.item() == pytest.approx(0.385139, abs=1e-6)
    assert d.item() == pytest.approx(D_AB, rel=1e-6)


def test_divergence_identical_is_zero() -> None:
    logp = _logp([0.2, 0.3, 0.5], [0.2, 0.3, 0.5], [0.2, 0.3, 0.5]).view(1, 3, 1, 3)
    d = aligned_divergence(logp, torch.ones(1, 3, 1, dtype=torch.bool))
    assert d.item() == pytest.approx(0.0, abs=1e-7)


def test_divergence_masked_row_is_uniform() -> None:
    # Response 2 masked -> replaced by uniform [0.5, 0.5]; its garbage values do not matter.
    # So this is the pair ([0.9, 0.1], [0.5, 0.5]) = 0.385139 again (d is symmetric for G=2).
    logp = torch.stack([_logp([0.9, 0.1])[0], _t([-50.0, 3.0])]).view(1, 2, 1, 2)
    valid = _b([True, False]).view(1, 2, 1)
    d = aligned_divergence(logp, valid)
    assert d.item() == pytest.approx(D_AB, rel=1e-6)


def test_divergence_clamp_and_shape() -> None:
    # log p1 = [0, -100], log p2 = [-100, 0]: m = [-50, -50];
    # m - log p1 = [-50, 50] -> clamped to [-11, 11]; same (mirrored) for response 2.
    # each response: f(-11) + f(11) = e^-11 + 11 - 1 + e^11 - 11 - 1 = e^11 + e^-11 - 2
    logp = torch.zeros(2, 2, 3, 2)  # F=2, G=2, Kc=3
    logp[1, 0, 2] = _t([0.0, -100.0])
    logp[1, 1, 2] = _t([-100.0, 0.0])
    d = aligned_divergence(logp, torch.ones(2, 2, 3, dtype=torch.bool))
    assert d.shape == (2, 3)
    expected = torch.zeros(2, 3, dtype=torch.float64)
    expected[1, 2] = math.exp(11) + math.exp(-11) - 2  # 59872.1417
    torch.testing.assert_close(d.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("G", [3, 5, 8, 16])
@pytest.mark.parametrize("V", [640, 5000])
def test_divergence_identical_realistic_rows_is_exactly_zero(V: int, G: int) -> None:
    # float32 log-probs of a realistic vocabulary: the float32 mean over G of equal rows is
    # not always exact, and e^z - z - 1 then rounds to 2^-24 at some tokens (min-max stretched
    # that to u = 0.86); in float64 the mean of equal float32 rows is exact
    gen = torch.Generator().manual_seed(V)
    row = torch.log_softmax(3.0 * torch.randn(2, 24, V, generator=gen), dim=-1)  # [F, Kc, V]
    logp = row[:, None].expand(2, G, 24, V).contiguous()  # G identical responses
    d = aligned_divergence(logp, torch.ones(2, G, 24, dtype=torch.bool))
    assert (d == 0).all(), float(d.max())
    assert d.dtype == torch.float64


# --------------------------------------------------------------------------------- minmax


def test_minmax() -> None:
    d = _t([[1.0, 3.0, 2.0, 5.0], [2.0, 2.0, 2.0, 2.0], [4.0, 7.0, 9.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    valid_k = _b(
        [
            [True, True, True, False],  # min 1, max 3 over valid: [0, 1, 0.5], invalid 5 -> 0
            [True, True, True, True],  # constant -> 0 (eps in the denominator)
            [False, True, False, False],  # a single valid k -> 0
            [False, False, False, False],  # nothing valid -> 0
        ]
    )
    u = minmax(d, valid_k)
    expected = _t([[0.0, 1.0, 0.5, 0.0], [0.0] * 4, [0.0] * 4, [0.0] * 4])
    torch.testing.assert_close(u, expected, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(u).all()


def test_minmax_range_within_rounding_is_zero() -> None:
    # threshold: range <= 1e-6 * max(1, max d) -> u = 0 (float noise, not signal)
    d = torch.tensor([[1.0, 1.0 + 5e-7, 1.0],  # 5e-7 <= 1e-6 * 1: flat
                      [1.0, 1.0 + 4e-6, 1.0],  # 4e-6 > 1e-6: normalised (eps 1e-8 in the range)
                      [1e4, 1e4 + 5e-3, 1e4],  # 5e-3 <= 1e-6 * 1e4: flat (relative)
                      [1e-9, 3e-7, 0.0]],  # 3e-7 <= 1e-6 * max(1, 3e-7): flat (absolute)
                     dtype=torch.float64)
    u = minmax(d, torch.ones(4, 3, dtype=torch.bool))
    expected = torch.zeros(4, 3, dtype=torch.float64)
    expected[1, 1] = 4e-6 / (4e-6 + 1e-8)
    torch.testing.assert_close(u, expected, rtol=1e-9, atol=0)
    assert (u[[0, 2, 3]] == 0).all()


def test_minmax_no_nan_grad() -> None:
    d = _t([[2.0, 2.0], [1.0, 3.0], [5.0, 6.0]]).requires_grad_(True)
    u = minmax(d, _b([[True, True], [True, True], [False, False]]))
    u.sum().backward()
    assert d.grad is not None and torch.isfinite(d.grad).all()


# ------------------------------------------------------------------ scatter_token_weights


def test_scatter_token_weights_average() -> None:
    # F=2, G=2, N=4, Kc=2
    u = _t([[1.0, 0.5], [0.0, 0.6]])
    index = torch.tensor([[[0, 2], [1, 3]], [[2, 3], [0, 0]]])
    valid = _b([[[True, True], [True, True]], [[True, True], [True, False]]])
    w = scatter_token_weights(u, index, valid, N=4, w_max=1.7)
    # r0: tok0 <- f0k0 = 1.0 ; tok2 <- f0k1 = 0.5 and f1k0 = 0.0 -> average 0.25 ;
    #     tok3 <- f1k1 = 0.6 ; tok1 never -> 0
    #     w = 1 + 0.7 u = [1.7, 1.0, 1.175, 1.42]
    # r1: tok1 <- f0k0 = 1.0 ; tok3 <- f0k1 = 0.5 ; tok0 <- f1k0 = 0.0 (frame 1 slot 1 invalid)
    #     tok2 never -> [1.0, 1.7, 1.0, 1.35]
    expected = _t([[1.7, 1.0, 1.175, 1.42], [1.0, 1.7, 1.0, 1.35]])
    torch.testing.assert_close(w, expected)


def test_scatter_token_weights_average_over_selecting_frames() -> None:
    # r0 tok1 selected by frame 0 (u=1.0) and frame 1 (u=0.0): average 0.5 -> 1.35
    u = _t([[1.0], [0.0]])
    index = torch.tensor([[[1]], [[1]]])
    w = scatter_token_weights(u, index, torch.ones(2, 1, 1, dtype=torch.bool), N=3, w_max=1.7)
    torch.testing.assert_close(w, _t([[1.0, 1.35, 1.0]]))


# --------------------------------------------------------------------- perception_weights

A = [0.5, 0.5]
B = [0.9, 0.1]
C = [0.1, 0.9]


def _e2e_inputs() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # G=2, N=4, T=2, V=2 ; k_avg=2, k_f=1, K=2, select_level "all"
    attn = torch.zeros(2, 4, 2)
    attn[0, :, 0] = _t([0.5, 0.1, 0.4, 0.0])  # s = (0.5+0.4)/2 = 0.45
    attn[0, :, 1] = _t([0.0, 0.3, 0.4, 0.1])  # s = (0.4+0.3)/2 = 0.35 -> r0 top-1 = frame 0
    attn[1, :, 0] = _t([0.1, 0.2, 0.0, 0.0])  # s = (0.2+0.1)/2 = 0.15
    attn[1, :, 1] = _t([0.6, 0.0, 0.3, 0.0])  # s = (0.6+0.3)/2 = 0.45 -> r1 top-1 = frame 1
    mask = _b([[True] * 4, [True, True, True, False]])
    correct = _b([True, False])  # "all": {0} | {1} -> crucial frames {0, 1}
    # Perception tokens (K=2, position-sorted):
    #   frame 0: r0 [0.5@0, 0.4@2] -> [0, 2] ; r1 [0.2@1, 0.1@0] -> [0, 1]
    #   frame 1: r0 [0.4@2, 0.3@1] -> [1, 2] ; r1 [0.6@0, 0.3@2] -> [0, 2]
    # Full-vocab distributions per (response, position):
    #   r0: p0 = A, p1 = C, p2 = B, p3 = A ;  r1: p0 = B, p1 = C, p2 = B, p3 (pad) = A
    table = torch.log(_t([[A, C, B, A], [B, C, B, A]]))
    return attn, mask, correct, table


def _gather_fn(table: Tensor, calls: list[int] | None = None):
    G = table.shape[0]

    def fn(index: Tensor) -> Tensor:
        if calls is not None:
            calls.append(index.numel())
        return table[torch.arange(G)[None, :, None], index]

    return fn


def test_perception_weights_end_to_end() -> None:
    attn, mask, correct, table = _e2e_inputs()
    w, info = perception_weights(
        attn, mask, correct, _gather_fn(table), k_avg=2, k_f=1, K=2, w_max=1.7
    )
    # Aligned pairs (r0 token, r1 token) and their divergences:
    #   f0k0: (A, B) -> D_AB = 0.385 ; f0k1: (B, C) -> 4/3      -> u0 = [0, 1]
    #   f1k0: (C, B) -> 4/3          ; f1k1: (B, B) -> 0        -> u1 = [1, 0]
    # Token u (average over selecting frames):
    #   r0: p0 f0k0 -> 0 ; p1 f1k0 -> 1 ; p2 f0k1 (1) & f1k1 (0) -> 0.5 ; p3 never -> 0
    #   r1: p0 f0k0 (0) & f1k0 (1) -> 0.5 ; p1 f0k1 -> 1 ; p2 f1k1 -> 0 ; p3 padding -> 0
    # w = 1 + 0.7 u
    expected = _t([[1.0, 1.7, 1.35, 1.0], [1.35, 1.7, 1.0, 1.0]])
    torch.testing.assert_close(w, expected, rtol=1e-6, atol=1e-6)
    assert info["num_crucial_frames"] == 2.0
    assert info["crucial_frames"].tolist() == [0, 1]
    assert info["crucial_frames"].dtype == torch.long
    # selected valid tokens: r0 {0,1,2}, r1 {0,1,2} = 6 of 7 valid
    assert info["perception_token_frac"] == pytest.approx(6 / 7)
    # mean over the 7 valid tokens: (1 + 1.7 + 1.35 + 1 + 1.35 + 1.7 + 1)/7 = 9.1/7 = 1.3
    assert info["weight_mean"] == pytest.approx(1.3, abs=1e-6)
    assert info["weight_max"] == pytest.approx(1.7, abs=1e-6)
    for key in ("num_crucial_frames", "perception_token_frac", "weight_mean", "weight_max"):
        assert isinstance(info[key], float)


def test_perception_weights_ignore_invalid_frames() -> None:
    """The end-to-end group padded with a third, nonexistent frame (a micro-batch holding a
    longer video): large attention there must not make it crucial, nor change any weight."""
    attn, mask, correct, table = _e2e_inputs()
    expected = _t([[1.0, 1.7, 1.35, 1.0], [1.35, 1.7, 1.0, 1.0]])  # as in the unpadded group
    padded = torch.cat([attn, torch.full((2, 4, 1), 5.0) * mask[:, :, None]], dim=2)
    fv = _b([True, True, False])
    # unmasked, frame 2 (score 5 for both responses) would be the only crucial frame
    _, info = perception_weights(padded, mask, correct, _gather_fn(table), k_avg=2, k_f=1, K=2)
    assert info["crucial_frames"].tolist() == [2]
    for frame_valid in (fv, fv.expand(2, 3)):
        w, info = perception_weights(padded, mask, correct, _gather_fn(table), k_avg=2, k_f=1,
                                     K=2, frame_valid=frame_valid)
        assert info["crucial_frames"].tolist() == [0, 1]
        torch.testing.assert_close(w, expected, rtol=1e-6, atol=1e-6)
    # the realistic padding (zero attention) with k_f = 3 > 2 frames: the padded frame used to
    # fill the top-3 and select the first K positions; now the result equals the unpadded one
    zero_pad = torch.cat([attn, torch.zeros(2, 4, 1)], dim=2)
    w_ref, _ = perception_weights(attn, mask, correct, _gather_fn(table), k_avg=2, k_f=3, K=2)
    w, info = perception_weights(zero_pad, mask, correct, _gather_fn(table), k_avg=2, k_f=3, K=2,
                                 frame_valid=fv)
    assert info["crucial_frames"].tolist() == [0, 1]
    torch.testing.assert_close(w, w_ref, rtol=0, atol=0)


def test_perception_weights_logp_fn_positions_bounded() -> None:
    attn, mask, correct, table = _e2e_inputs()
    calls: list[int] = []
    w, info = perception_weights(attn, mask, correct, _gather_fn(table, calls), k_avg=2, k_f=1, K=2)
    F, G, Kc = 2, 2, 2
    assert sum(calls) <= F * G * Kc and len(calls) == 1
    # chunked over frames: same result, same total number of positions
    calls2: list[int] = []
    w2, _ = perception_weights(
        attn, mask, correct, _gather_fn(table, calls2), k_avg=2, k_f=1, K=2, frame_chunk=1
    )
    assert calls2 == [G * Kc, G * Kc]
    torch.testing.assert_close(w, w2)


def test_perception_weights_detached_by_default() -> None:
    attn, mask, correct, table = _e2e_inputs()
    table = table.clone().requires_grad_(True)
    w, _ = perception_weights(attn, mask, correct, _gather_fn(table), k_avg=2, k_f=1, K=2)
    assert not w.requires_grad and w.grad_fn is None

    w, _ = perception_weights(
        attn, mask, correct, _gather_fn(table), k_avg=2, k_f=1, K=2, weights_grad=True
    )
    assert w.requires_grad
    torch.testing.assert_close(
        w.detach(), _t([[1.0, 1.7, 1.35, 1.0], [1.35, 1.7, 1.0, 1.0]]), rtol=1e-6, atol=1e-6
    )
    # In this example every u is exactly 0 or 1 (an extreme of its frame), where the gradient
    # of the min-max normalisation vanishes (up to eps); use a random group to see it flow.
    gen = torch.Generator().manual_seed(0)
    attn = torch.rand(3, 8, 4, generator=gen)
    mask = torch.ones(3, 8, dtype=torch.bool)
    table = torch.log_softmax(torch.randn(3, 8, 5, generator=gen), -1).requires_grad_(True)
    w, _ = perception_weights(
        attn,
        mask,
        _b([True, False, True]),
        _gather_fn(table),
        k_avg=2,
        k_f=1,
        K=4,
        weights_grad=True,
    )
    (w * torch.arange(24.0).view(3, 8)).sum().backward()
    assert table.grad is not None and torch.isfinite(table.grad).all()
    assert table.grad.abs().sum() > 0


@pytest.mark.parametrize("G", [5, 8])
@pytest.mark.parametrize("V", [640, 5000])
def test_perception_weights_identical_responses_are_exactly_one(V: int, G: int) -> None:
    """G identical responses (same tokens, same attention, same log-probs): every aligned
    pair agrees, so d = 0, u = 0 and every weight is exactly 1 (float32 noise stretched by the
    min-max normalisation used to give weights up to ~1.6)."""
    gen = torch.Generator().manual_seed(V)
    N, T = 24, 4
    attn = torch.rand(N, T, generator=gen).expand(G, N, T)
    mask = torch.ones(G, N, dtype=torch.bool)
    table = torch.log_softmax(3.0 * torch.randn(N, V, generator=gen), dim=-1).expand(G, N, V)
    for level, strategy in (("all", "topk-union"), ("all", "all")):
        w, info = perception_weights(attn, mask, torch.arange(G) % 2 == 0, _gather_fn(table),
                                     k_avg=4, k_f=2, K=16, select_level=level,
                                     select_strategy=strategy)
        assert info["num_crucial_frames"] >= 2 and info["perception_token_frac"] > 0
        assert w.dtype == torch.float32
        assert (w == 1.0).all(), float(w.max())


def test_perception_weights_no_frames_all_ones() -> None:
    attn, mask, _, table = _e2e_inputs()

    def never(index: Tensor) -> Tensor:
        raise AssertionError("logp_fn must not be called without crucial frames")

    # all wrong + "hard": psi(S1) = {} -> no crucial frames
    w, info = perception_weights(
        attn, mask, _b([False, False]), never, k_avg=2, k_f=1, K=2, select_level="hard"
    )
    torch.testing.assert_close(w, torch.ones(2, 4))
    assert info["num_crucial_frames"] == 0.0
    assert info["perception_token_frac"] == 0.0
    assert info["weight_mean"] == 1.0 and info["weight_max"] == 1.0
    assert info["crucial_frames"].numel() == 0
    # no valid tokens at all
    w, _ = perception_weights(
        attn, torch.zeros(2, 4, dtype=torch.bool), _b([True, True]), never, select_strategy="all"
    )
    torch.testing.assert_close(w, torch.ones(2, 4))


def test_perception_weights_bad_names() -> None:
    attn, mask, correct, table = _e2e_inputs()
    with pytest.raises(ValueError):
        perception_weights(attn, mask, correct, _gather_fn(table), select_level="force-all")
    with pytest.raises(ValueError):
        perception_weights(attn, mask, correct, _gather_fn(table), select_strategy="every")


# ------------------------------------------- randomised check against a naive loop reference


def _reference_weights(
    attn: Tensor,
    mask: Tensor,
    correct: Tensor,
    table: Tensor,
    k_avg: int,
    k_f: int,
    K: int,
    w_max: float,
    level: str,
) -> Tensor:
    """Straightforward loop implementation of docs/method.md steps 2-6 (float64)."""
    G, N, T = attn.shape
    V = table.shape[-1]
    a = attn.double()
    lp_table = table.double()
    tops: list[set[int]] = []
    for i in range(G):
        toks = [n for n in range(N) if mask[i, n]]
        s = []
        for t in range(T):
            vals = sorted((float(a[i, n, t]) for n in toks), reverse=True)[:k_avg]
            s.append(sum(vals) / len(vals) if vals else 0.0)
        order = sorted(range(T), key=lambda t, s=s: (-s[t], t))[: min(k_f, T)]
        tops.append(set(order) if toks else set())
    s1 = [i for i in range(G) if correct[i] and mask[i].any()]
    s2 = [i for i in range(G) if not correct[i] and mask[i].any()]
    psi1 = set().union(*(tops[i] for i in s1)) if s1 else set()
    psi2 = set().union(*(tops[i] for i in s2)) if s2 else set()
    if level == "all":
        frames = psi1 | psi2
    elif level == "soft":
        frames = psi1 if s1 else psi1 | psi2
    else:
        frames = psi1 - psi2
    Kc = min(K, N)
    total = torch.zeros(G, N, dtype=torch.float64)
    count = torch.zeros(G, N, dtype=torch.float64)
    for t in sorted(frames):
        sel: list[list[int]] = []
        for i in range(G):
            toks = [n for n in range(N) if mask[i, n]]
            best = sorted(toks, key=lambda n, i=i: (-float(a[i, n, t]), n))[:Kc]
            sel.append(sorted(best))
        d = []
        for k in range(Kc):
            rows = [
                lp_table[i, sel[i][k]] if k < len(sel[i]) else torch.full((V,), -math.log(V))
                for i in range(G)
            ]
            lp = torch.stack(rows).double()
            m = lp.mean(0)
            delta = (m - lp).clamp(-11, 11)
            d.append(float((delta.exp() - delta - 1).sum(-1).mean()))
        valid_k = [k for k in range(Kc) if any(k < len(sel[i]) for i in range(G))]
        lo = min(d[k] for k in valid_k)
        hi = max(d[k] for k in valid_k)
        for i in range(G):
            for k, n in enumerate(sel[i]):
                total[i, n] += (d[k] - lo) / (hi - lo + 1e-8)
                count[i, n] += 1
    return 1 + (w_max - 1) * total / count.clamp(min=1)


@pytest.mark.parametrize("level", ["all", "soft", "hard"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_perception_weights_matches_reference(level: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    G, N, T, V = 4, 9, 5, 7
    attn = torch.rand(G, N, T, generator=gen)
    lengths = torch.tensor([9, 6, 0, 3])
    mask = torch.arange(N)[None, :] < lengths[:, None]
    attn = attn * mask[:, :, None]
    correct = torch.rand(G, generator=gen) > 0.5
    table = torch.log_softmax(torch.randn(G, N, V, generator=gen), dim=-1)
    kw = {"k_avg": 3, "k_f": 2, "K": 4, "w_max": 1.7}
    w, _ = perception_weights(attn, mask, correct, _gather_fn(table), select_level=level, **kw)
    ref = _reference_weights(attn, mask, correct, table, level=level, **kw)
    torch.testing.assert_close(w.double(), ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------- the default APPO preset: K below the response length


def _default_appo_preset():
    """(rl config, APPO perception config, vocabulary size) from the repository's params.yaml."""
    from pathlib import Path

    from appo.config import ModelConfig, RLConfig, load_section

    params = Path(__file__).resolve().parents[1] / "params.yaml"
    rl = load_section(RLConfig, "rl", params)
    vocab = load_section(ModelConfig, "model", params).tiny.vocab_size
    return rl, rl.algorithm("appo").perception, vocab


def _preset_group(seed: int, G: int, N: int, T: int, V: int):
    """A realistic group: G responses of up to N tokens (some padded), random log-probs."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(N // 2, N + 1, (G,), generator=gen)
    lengths[0] = N
    mask = torch.arange(N)[None, :] < lengths[:, None]
    correct = torch.arange(G) % 3 == 0
    table = torch.log_softmax(2.0 * torch.randn(G, N, V, generator=gen), dim=-1)
    return mask, correct, table


def _random_attn(seed: int, mask: Tensor, T: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(*mask.shape, T, generator=gen) * mask[:, :, None]


def test_default_appo_weights_depend_on_attention() -> None:
    """With the default APPO preset (K from K_fraction of rl.max_new_tokens) the perception
    tokens, hence the weights, follow the attention: two attention maps give different weights,
    the same map the same weights. With an absolute K at or above the response length (the
    published K = 128 for 40 tokens) and every frame crucial, every valid token is a perception
    token of every crucial frame and the weights no longer depend on the attention."""
    rl, p, V = _default_appo_preset()
    G, N, T = rl.num_generations, rl.max_new_tokens, 4
    K = p.tokens_per_frame(N)
    assert 1 <= K < N, f"effective K {K} must be below the response length {N}"
    mask, correct, table = _preset_group(0, G, N, T, V)
    assert not mask.all()  # some padding
    kw = {"k_avg": p.k_avg, "k_f": p.k_f, "w_max": p.w_max, "select_level": p.select_level,
          "select_strategy": p.select_strategy}

    def weights(attn: Tensor, K: int) -> tuple[Tensor, dict]:
        return perception_weights(attn, mask, correct, _gather_fn(table), K=K, **kw)

    attn1, attn2 = _random_attn(1, mask, T), _random_attn(2, mask, T)
    w1, info1 = weights(attn1, K)
    w1_again, _ = weights(attn1.clone(), K)
    w2, _ = weights(attn2, K)
    assert torch.equal(w1, w1_again)
    assert not torch.allclose(w1[mask], w2[mask])
    assert 0 < info1["perception_token_frac"] < 1
    assert (w1[mask] > 1).any() and (w1 >= 1).all() and (w1 <= p.w_max).all()

    # the old setting: every frame crucial (k_f = 3 of T = 4 temporal patches was nearly that)
    # and K >= N make the weights blind to the attention
    kw["k_f"] = T
    v1, i1 = weights(attn1, 128)
    v2, i2 = weights(attn2, 128)
    assert i1["num_crucial_frames"] == i2["num_crucial_frames"] == T
    assert i1["perception_token_frac"] == 1.0
    torch.testing.assert_close(v1, v2)


# --------------------------------------------------- controls: random attention, uniform weights


def test_random_frame_attention_by_hand() -> None:
    from appo.rl.perception import random_frame_attention

    mask = _b([[True, True, False], [True, False, False]])
    frame_valid = _b([[True, True], [True, False]])
    a = random_frame_attention((2, 3, 2), mask, torch.Generator().manual_seed(7), frame_valid)
    draw = torch.rand(2, 3, 2, generator=torch.Generator().manual_seed(7))
    keep = _b([[[True, True], [True, True], [False, False]],
               [[True, False], [False, False], [False, False]]])
    torch.testing.assert_close(a, torch.where(keep, draw, torch.zeros(())), rtol=0, atol=0)
    assert a.dtype == torch.float32 and bool(((a >= 0) & (a < 1)).all())
    assert bool((a[keep] > 0).all())  # a U[0, 1) draw of exactly 0 is (practically) impossible
    # reproducible from the seed, different for another seed
    again = random_frame_attention((2, 3, 2), mask, torch.Generator().manual_seed(7), frame_valid)
    other = random_frame_attention((2, 3, 2), mask, torch.Generator().manual_seed(8), frame_valid)
    assert torch.equal(a, again) and not torch.equal(a, other)
    # [T] frame validity, no frame validity, another dtype
    b = random_frame_attention((2, 3, 2), mask, torch.Generator().manual_seed(7), _b([True, False]))
    assert torch.equal(b[..., 1], torch.zeros(2, 3)) and torch.equal(b[..., 0], a[..., 0])
    c = random_frame_attention((2, 3, 2), mask, torch.Generator().manual_seed(7))
    torch.testing.assert_close(c, draw * mask[:, :, None], rtol=0, atol=0)
    d = random_frame_attention((2, 3, 2), mask, torch.Generator().manual_seed(7),
                               dtype=torch.bfloat16)
    assert d.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="mask must be"):
        random_frame_attention((2, 4, 2), mask, torch.Generator())


def test_uniform_like_by_hand() -> None:
    from appo.rl.perception import uniform_like

    w = _t([[1.0, 1.7, 1.3, 5.0], [1.0, 1.6, 9.0, 9.0]])
    mask = _b([[True, True, True, False], [True, True, False, False]])
    u = uniform_like(w, mask)
    # valid weights 1 + 1.7 + 1.3 + 1 + 1.6 = 6.6 over 5 tokens -> 1.32; padding unchanged
    torch.testing.assert_close(u, _t([[1.32, 1.32, 1.32, 5.0], [1.32, 1.32, 9.0, 9.0]]))
    torch.testing.assert_close(u[mask].sum(), w[mask].sum())  # same total emphasis
    torch.testing.assert_close(uniform_like(w, torch.zeros_like(mask)), w)  # nothing valid
    wg = w.clone().requires_grad_(True)
    uniform_like(wg, mask)[mask].sum().backward()
    torch.testing.assert_close(wg.grad, mask.float())  # d(sum of the means)/dw_valid = 1
    with pytest.raises(ValueError, match="one shape"):
        uniform_like(w, mask[:, :3])
