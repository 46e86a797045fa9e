"""T-GRPO's temporal contrast and length bonus, by hand."""

import pytest
import torch

from appo.rl.temporal import length_bonus, temporal_bonus


def test_bonus_with_the_published_ratio_condition():
    # group 0: ordered acc [1,1,0,0] -> p = .5; shuffled [1,0] -> p~ = .5; .5 >= .8*.5 holds
    # group 1: ordered acc [1,0,0,0] -> p = .25; shuffled [1,1] -> p~ = 1; .25 < .8 fails
    ordered = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    shuffled = torch.tensor([1.0, 0.0, 1.0, 1.0])
    got = temporal_bonus(ordered, shuffled, 4, 2, bonus=0.3, condition="ratio", ratio=0.8)
    assert got.tolist() == pytest.approx([0.3, 0.3, 0, 0, 0, 0, 0, 0])


def test_paper_condition_is_strict():
    ordered = torch.tensor([1.0, 1.0, 0.0, 0.0])  # p = .5
    shuffled = torch.tensor([1.0, 0.0])           # p~ = .5: equal, so p > p~ fails
    assert temporal_bonus(ordered, shuffled, 4, 2, condition="greater").tolist() == [0, 0, 0, 0]
    assert temporal_bonus(ordered, shuffled, 4, 2, condition="ratio").tolist() == pytest.approx(
        [0.3, 0.3, 0, 0])


def test_all_correct_and_all_wrong_groups():
    ones, zeros = torch.ones(4), torch.zeros(4)
    # all correct ordered, all wrong shuffled: every ordered response gets the bonus
    assert temporal_bonus(ones, torch.zeros(2), 4, 2).tolist() == pytest.approx([0.3] * 4)
    # all correct in both: 1 >= .8 holds with ratio, 1 > 1 fails with greater
    assert temporal_bonus(ones, torch.ones(2), 4, 2).tolist() == pytest.approx([0.3] * 4)
    assert temporal_bonus(ones, torch.ones(2), 4, 2, condition="greater").tolist() == [0] * 4
    # all wrong ordered: the condition may hold (0 >= 0) but nobody is correct -> no bonus
    assert temporal_bonus(zeros, torch.zeros(2), 4, 2).tolist() == [0] * 4


def test_partial_accuracy_counts_as_positive_and_bad_input():
    got = temporal_bonus(torch.tensor([0.6, 0.0]), torch.tensor([0.0]), 2, 1, bonus=1.0)
    assert got.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="condition"):
        temporal_bonus(torch.ones(2), torch.ones(1), 2, 1, condition="nope")
    with pytest.raises(ValueError, match="groups"):
        temporal_bonus(torch.ones(4), torch.ones(4), 2, 1)


def test_length_bonus_window_is_inclusive_and_needs_a_correct_answer():
    lengths = torch.tensor([319, 320, 400, 512, 513, 400])
    acc = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    assert length_bonus(lengths, acc, 320, 512, 0.2).tolist() == pytest.approx(
        [0, 0.2, 0.2, 0.2, 0, 0])
