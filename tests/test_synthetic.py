import dataclasses
import json
import re

import numpy as np
import pytest

from appo.config import SyntheticConfig as Knobs
from appo.data.synthetic import (
    COLORS,
    FAMILIES,
    QUADRANTS,
    _spaced_slots,
    generate_split,
    make_question,
)


def _color_visible(frame: np.ndarray, rgb, tol: float = 40) -> bool:
    dist = np.abs(frame.astype(float) - np.array(rgb)).max(-1)
    return bool((dist < tol).sum() >= 20)


def test_generator_is_deterministic(tmp_path):
    a = generate_split(tmp_path / "a", "rl", 4, Knobs())
    b = generate_split(tmp_path / "b", "rl", 4, Knobs())
    assert a == b
    assert (tmp_path / "a" / "rl.json").read_text() == (tmp_path / "b" / "rl.json").read_text()
    other = generate_split(tmp_path / "c", "test", 4, Knobs())
    assert [q.answer for q in other] != [q.answer for q in a] or other[0].key_frames != a[0].key_frames


@pytest.mark.parametrize("seed", range(6))
def test_colour_answer_is_visible_only_in_key_frames(seed):
    frames, fields = make_question("flash_color", np.random.default_rng(seed), Knobs())
    color = list(COLORS.values())["ABCD".index(fields["answer"])]
    for t in range(len(frames)):
        assert _color_visible(frames[t], color) == (t in fields["key_frames"])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("count_max", [3, 4])
def test_count_matches_number_of_flashes(seed, count_max):
    knobs = Knobs(count_max=count_max)
    frames, fields = make_question("count", np.random.default_rng(seed), knobs)
    lit = [t for t in range(len(frames)) if _color_visible(frames[t], (250, 250, 250))]
    assert lit == list(fields["key_frames"])
    assert len(lit) == int(fields["answer"]) * knobs.event_frames


def test_order_answer_is_the_earlier_colour():
    for seed in range(8):
        frames, fields = make_question("order", np.random.default_rng(seed), Knobs())
        first, last = min(fields["key_frames"]), max(fields["key_frames"])
        seen_first = [n for n, rgb in COLORS.items() if _color_visible(frames[first], rgb)]
        seen_last = [n for n, rgb in COLORS.items() if _color_visible(frames[last], rgb)]
        assert len(seen_first) == 1 and len(seen_last) == 1 and seen_first != seen_last
        assert fields["answer"] == "ABCD"[list(COLORS).index(seen_first[0])]


def test_spaced_slots_are_separate_and_cover_every_arrangement():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(2000):
        picks = _spaced_slots(rng, 8, 4)
        assert sorted(picks) == picks and all(b - a >= 2 for a, b in zip(picks, picks[1:]))
        seen.add(tuple(picks))
    # C(8 - 4 + 1, 4) = 5 arrangements of 4 separate flashes in 8 slots; all of them occur
    assert seen == {(0, 2, 4, 6), (0, 2, 4, 7), (0, 2, 5, 7), (0, 3, 5, 7), (1, 3, 5, 7)}
    with pytest.raises(ValueError, match="count_max"):
        _spaced_slots(rng, 8, 5)


def test_shape_grid_places_the_shape_on_patch_multiples():
    knobs = Knobs(families=["flash_shape"], shape_grid=14, noise=0.0, distractors=0)
    corners = set()
    for seed in range(12):
        frames, fields = make_question("flash_shape", np.random.default_rng(seed), knobs)
        lit = np.abs(frames[fields["key_frames"][0]].astype(float) - COLORS["yellow"]).max(-1) < 40
        ys, xs = np.nonzero(lit)
        assert ys.min() % 14 == 0 and xs.min() % 14 == 0
        corners.add((int(ys.min()), int(xs.min())))
    assert len(corners) > 3  # still a random place on the grid


def test_shapes_use_their_own_size():
    knobs = Knobs(families=["flash_shape"], shape_size=24, noise=0.0, distractors=0)
    frames, fields = make_question("flash_shape", np.random.default_rng(0), knobs)
    lit = (np.abs(frames[fields["key_frames"][0]].astype(float) - COLORS["yellow"]).max(-1) < 40)
    ys, xs = np.nonzero(lit)
    assert max(ys.max() - ys.min(), xs.max() - xs.min()) + 1 == 24


def test_written_video_shows_answer_in_key_frames(tmp_path):
    import decord

    records = generate_split(tmp_path, "sft", 4, Knobs(families=["flash_color"]))
    for qa in records:
        frames = decord.VideoReader(str(tmp_path / qa.video)).get_batch(list(range(16))).asnumpy()
        color = list(COLORS.values())["ABCD".index(qa.answer)]
        for t in range(16):
            assert _color_visible(frames[t], color) == (t in qa.key_frames)
    rows = json.loads((tmp_path / "sft.json").read_text())
    assert rows[0]["solution"] == f"<answer>{records[0].answer}</answer>"
    assert rows[0]["process"].startswith("<think>") and rows[0]["key_frames"]


def test_families_are_balanced_and_unknown_is_rejected(tmp_path):
    records = generate_split(tmp_path, "val", 8, Knobs())
    assert [r.family for r in records] == list(Knobs().families) * 2
    assert set(Knobs().families) <= set(FAMILIES)
    with pytest.raises(ValueError, match="unknown family"):
        make_question("nope", np.random.default_rng(0), Knobs())
    with pytest.raises(ValueError, match="data.synthetic.families: expected"):
        generate_split(tmp_path, "val", 2, Knobs(families=["flash_colour"]))


def test_a_family_left_out_of_sft_appears_in_every_other_split(tmp_path):
    knobs = Knobs(sft_families=["flash_color", "count"])
    sft = generate_split(tmp_path, "sft", 6, knobs)
    assert [r.family for r in sft] == ["flash_color", "count"] * 3
    assert all(r.process for r in sft)
    rl = generate_split(tmp_path, "rl", 4, knobs)
    assert [r.family for r in rl] == list(knobs.families)  # order included: RL must learn it
    with pytest.raises(ValueError, match="data.synthetic.sft_families: expected"):
        generate_split(tmp_path, "sft", 2, Knobs(sft_families=[]))


@pytest.mark.parametrize("seed", range(6))
def test_position_answer_is_the_quadrant_of_the_flash(seed):
    knobs = Knobs()
    frames, fields = make_question("flash_position", np.random.default_rng(seed), knobs)
    lit = np.abs(frames[fields["key_frames"][0]].astype(float) - COLORS["green"]).max(-1) < 40
    ys, xs = np.nonzero(lit)
    half = knobs.size // 2
    quadrant = 2 * int(ys.mean() >= half) + int(xs.mean() >= half)
    assert (ys < half).all() or (ys >= half).all()  # wholly inside one quarter
    assert fields["answer"] == "ABCD"[quadrant]
    assert QUADRANTS[quadrant] in fields["process"]


def test_split_is_the_same_with_any_number_of_encoding_workers(tmp_path):
    one = generate_split(tmp_path / "one", "val", 6, Knobs(), workers=1)
    two = generate_split(tmp_path / "two", "val", 6, Knobs(), workers=2)
    assert one == two
    for qa in one:
        assert (tmp_path / "one" / qa.video).read_bytes() == (tmp_path / "two" / qa.video).read_bytes()


def _truth_and_teacher(family: str, seed: int) -> tuple[dict, dict, np.ndarray, np.ndarray]:
    frames, truth = make_question(family, np.random.default_rng(seed), Knobs())
    frames_t, teacher = make_question(family, np.random.default_rng(seed), Knobs(), misperceive=True)
    return truth, teacher, frames, frames_t


@pytest.mark.parametrize("seed", range(12))
def test_misperceiving_teacher_misses_one_of_three_or_four_flashes_and_nothing_else(seed):
    truth, teacher, frames, frames_t = _truth_and_teacher("count", seed)
    np.testing.assert_array_equal(frames, frames_t)  # the video is the truth
    assert teacher["key_frames"] == truth["key_frames"]
    n = int(truth["answer"])
    assert int(teacher["answer"]) == (n - 1 if n >= 3 else n)
    times = re.findall(r"\d\.\ds", teacher["process"])
    assert len(times) == int(teacher["answer"])  # the chain of thought agrees with the answer
    assert times == re.findall(r"\d\.\ds", truth["process"])[: len(times)]  # the last one missed
    for family in ("flash_color", "flash_shape", "flash_position", "order"):
        truth, teacher, _, _ = _truth_and_teacher(family, seed)
        assert teacher == truth


def test_teacher_error_labels_only_the_sft_split_and_keeps_its_videos(tmp_path):
    n, knobs = 240, Knobs(families=["count"])
    clean = generate_split(tmp_path / "a", "sft", n, knobs, workers=1)
    noisy = generate_split(tmp_path / "b", "sft", n, dataclasses.replace(knobs, teacher_error=0.6),
                           workers=1)
    for a, b in zip(clean, noisy, strict=True):
        assert (tmp_path / "a" / a.video).read_bytes() == (tmp_path / "b" / b.video).read_bytes()
        assert b.answer == a.answer or (a.answer in "34" and int(b.answer) == int(a.answer) - 1)
    many = [b.answer != a.answer for a, b in zip(clean, noisy, strict=True) if a.answer in "34"]
    assert 0.45 < sum(many) / len(many) < 0.75  # about 0.6 of ~120 (binomial sd ~0.045)
    rl = generate_split(tmp_path / "c", "rl", 8, Knobs(teacher_error=0.6), workers=1)
    assert rl == generate_split(tmp_path / "d", "rl", 8, Knobs(), workers=1)
