"""Hand-computed cases and property tests for ``appo.rl.rewards``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appo.data.schema import VideoQA
from appo.rl.rewards import (
    RewardSpec,
    accuracy_reward,
    extract_answer,
    extract_time_spans,
    format_reward,
    iou_reward,
    is_correct,
    mean_relative_accuracy,
    normalize_choice,
    numerical_accuracy,
    ocr_accuracy,
    parse_number,
    rouge_l_f1,
    score_responses,
    temporal_iou,
    word_error_rate,
)

OPTIONS = ("A. red", "B. blue", "C. green", "D. light blue")


def _qa(problem_type: str, answer: str, **kw: object) -> VideoQA:
    options = OPTIONS if problem_type == "multiple choice" else ()
    return VideoQA(
        problem_id="p0",
        problem="q?",
        problem_type=problem_type,
        answer=answer,
        video="v.mp4",
        options=kw.pop("options", options),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


# ------------------------------------------------------------------ extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>x</think><answer>B</answer>", "B"),
        ("<answer>A</answer> then <answer>C</answer>", "C"),  # last tag wins
        ("<answer>  \n B \t</answer>", "B"),  # whitespace stripped
        ("<answer>A</answer> wait, actually <answer>D", "D"),  # unclosed final tag
        ("<answer>A<answer>B</answer></answer>", "B"),  # nested: innermost last opener
        ("<answer>A</answer", "A"),  # malformed closing tag
        ("<ANSWER>c</ANSWER>", "c"),  # tag case-insensitive
        ("<answer>蓝色 </answer>", "蓝色"),  # unicode
        ("<answer></answer>", None),  # empty tag
        ("<answer>A</answer><answer>   </answer>", None),  # last tag empty
        ("I think the answer is B.", "B."),  # fallback phrase
        ("Reasoning...\nAnswer: 42 meters\nDone", "42 meters"),  # fallback, rest of line
        ("Answer: A\nNo wait. Final answer: C", "C"),  # last phrase wins
        ("B", None),  # no tag, no phrase
        ("", None),
        ("None", None),
        ("</answer>>< <<answer", None),  # garbage without a real opener
        ("<answer", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_extract_answer_non_string() -> None:
    assert extract_answer(None) is None


@pytest.mark.parametrize(
    ("ans", "expected"),
    [
        ("B", "B"),
        ("B.", "B"),
        ("(B)", "B"),
        ("b)", "B"),
        ("[C]", "C"),
        ("B. blue", "B"),
        ("(D) light blue", "D"),
        ("Answer: B", "B"),
        ("The answer is C", "C"),
        ("blue", "B"),
        ("  BLUE. ", "B"),
        ("Light  Blue", "D"),
        ("lightblue", "D"),
        ("Ｂ", "B"),  # full-width letter (NFKC)
        ("E", None),  # letter outside the options
        ("purple", None),
        ("", None),
        ("   ", None),
    ],
)
def test_normalize_choice(ans: str, expected: str | None) -> None:
    assert normalize_choice(ans, OPTIONS) == expected


def test_normalize_choice_ambiguous_text() -> None:
    assert normalize_choice("cat", ("A. cat", "B. Cat", "C. dog")) is None
    assert normalize_choice("dog", ("A. cat", "B. Cat", "C. dog")) == "C"


def test_normalize_choice_unprefixed_options_use_position() -> None:
    assert normalize_choice("green", ("red", "green")) == "B"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3", 3.0),
        ("-2.5", -2.5),
        ("1,234", 1234.0),
        ("3 times", 3.0),
        ("three", 3.0),
        ("Twenty cars and 5 bikes", 20.0),  # first number, word or digits
        ("about .5 m", 0.5),
        ("someone", None),  # 'one' only as a whole word
        ("no digits", None),
        ("", None),
    ],
)
def test_parse_number(text: str, expected: float | None) -> None:
    assert parse_number(text) == expected


# ------------------------------------------------------------------ accuracy rules


@pytest.mark.parametrize(
    ("pred", "gold", "rel_tol", "expected"),
    [
        ("3", "3", 0.0, 1.0),
        ("3.004", "3.0", 0.0, 1.0),  # round(3.004, 2) == 3.0
        ("3.006", "3.0", 0.0, 0.0),  # round(3.006, 2) == 3.01
        # Video-R1's reference rule: a decimal mark on one side only is wrong
        ("4.0", "4", 0.0, 0.0),
        ("4", "4.0", 0.0, 0.0),
        ("3.004", "3", 0.0, 0.0),
        ("1,234", "1234", 0.0, 0.0),
        ("1,234", "1,234", 0.0, 1.0),
        ("4.00", "4.0", 0.0, 1.0),
        # deliberate difference: the first number of the answer, words included
        ("three", "3", 0.0, 1.0),
        ("3 times", "3", 0.0, 1.0),
        ("3 times", "3.00", 0.0, 0.0),
        ("-2.5", "-2.5", 0.0, 1.0),
        ("105", "100", 0.05, 1.0),  # |5| <= 0.05 * 100
        ("105", "100", 0.04, 0.0),  # |5| >  0.04 * 100
        ("abc", "3", 0.0, 0.0),
        (None, "3", 0.0, 0.0),
    ],
)
def test_numerical_accuracy(pred: str | None, gold: str, rel_tol: float, expected: float) -> None:
    assert numerical_accuracy(pred, gold, rel_tol) == expected


@pytest.mark.parametrize(
    ("pred", "gold", "expected"),
    [
        # rel. error 0.2 < 1-theta for theta in .50,.55,.60,.65,.70,.75 (not .80: strict <)
        ("8", "10", 0.6),
        ("12", "10", 0.6),
        ("10", "10", 1.0),
        ("10.4", "10", 1.0),  # 0.04 < 0.05
        ("10.5", "10", 0.9),  # 0.05 not < 0.05 (theta .95 misses)
        ("14", "10", 0.2),  # 0.4 < 0.5, 0.45 only
        ("15", "10", 0.0),  # 0.5 not < 0.5
        ("1.32", "1.1", 0.6),  # exactly 0.2 in decimal; must not round down
        ("0.3", "0", 0.4),  # gold 0: |0.3| < .5,.45,.4,.35
        ("about 8 meters", "10", 0.6),
        ("none", "10", 0.0),
    ],
)
def test_mean_relative_accuracy(pred: str, gold: str, expected: float) -> None:
    assert mean_relative_accuracy(pred, gold) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("pred", "gold", "expected"),
    [
        ("The Red Car!", "red car", 1.0),  # exact after normalization
        # pred [red car on road], gold [red car]: LCS 2, P 1/2, R 1 -> 2/3
        ("a red car on the road", "the red car", 2 / 3),
        ("blue ball", "red ball", 0.5),  # LCS 1, P = R = 1/2
        # LCS 1, P 1/3, R 1/2 -> 2*(1/6)/(5/6) = 2/5
        ("cat dog bird", "dog cat", 0.4),
        ("xyz", "abc", 0.0),
        (None, "abc", 0.0),
    ],
)
def test_rouge_l(pred: str | None, gold: str, expected: float) -> None:
    assert rouge_l_f1(pred, gold) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("pred", "gold", "wer", "score"),
    [
        ("hello world", "hello world", 0.0, 1.0),
        ("Hello, World.", "hello world", 0.0, 1.0),
        ("hello word", "hello world", 0.5, 0.5),  # 1 substitution / 2
        ("hello", "hello big world", 2 / 3, 1 / 3),  # 2 deletions / 3
        ("the cat", "a cat", 0.5, 0.5),  # articles kept for OCR
        ("a b c d e f", "x", 6.0, 0.0),  # 1 sub + 5 insertions / 1, clipped at 0
    ],
)
def test_wer_and_ocr(pred: str, gold: str, wer: float, score: float) -> None:
    assert word_error_rate(pred, gold) == pytest.approx(wer)
    assert ocr_accuracy(pred, gold) == pytest.approx(score)


@pytest.mark.parametrize(
    ("response", "problem_type", "gold", "expected"),
    [
        ("<think>t</think><answer>B</answer>", "multiple choice", "B", 1.0),
        ("<think>t</think><answer>(b) blue</answer>", "multiple choice", "B", 1.0),
        ("<think>t</think><answer>green</answer>", "multiple choice", "C", 1.0),
        ("<think>t</think><answer>A</answer>", "multiple choice", "B", 0.0),
        ("<answer>B</answer><answer>A</answer>", "multiple choice", "B", 0.0),
        ("no answer here", "multiple choice", "B", 0.0),
        ("<answer>3 people</answer>", "numerical", "3", 1.0),
        ("<answer>8</answer>", "regression", "10", 0.6),
        ("<answer>blue ball</answer>", "free-form", "red ball", 0.5),
        ("<answer>hello word</answer>", "OCR", "hello world", 0.5),
        ("The answer is 4", "numerical", "4", 1.0),
    ],
)
def test_accuracy_reward(response: str, problem_type: str, gold: str, expected: float) -> None:
    assert accuracy_reward(response, _qa(problem_type, gold)) == pytest.approx(expected)


def test_accuracy_reward_duck_typed_and_rel_tol() -> None:
    qa = SimpleNamespace(problem_type="numerical", answer="100", options=[])
    assert accuracy_reward("<answer>104</answer>", qa) == 0.0
    assert accuracy_reward("<answer>104</answer>", qa, numerical_rel_tol=0.05) == 1.0


def test_accuracy_reward_unknown_type_raises() -> None:
    qa = SimpleNamespace(problem_type="essay", answer="x", options=())
    with pytest.raises(ValueError, match="essay"):
        accuracy_reward("<answer>x</answer>", qa)


@pytest.mark.parametrize(
    ("response", "problem_type", "gold", "expected"),
    [
        ("<answer>B</answer>", "multiple choice", "B", True),
        ("<answer>12</answer>", "regression", "10", True),  # MRA 0.6
        ("<answer>14</answer>", "regression", "10", False),  # MRA 0.2
        ("<answer>cat dog bird</answer>", "free-form", "dog cat", False),  # 0.4
        ("<answer>hello word</answer>", "OCR", "hello world", True),  # exactly 0.5
    ],
)
def test_is_correct(response: str, problem_type: str, gold: str, expected: bool) -> None:
    assert is_correct(response, _qa(problem_type, gold)) is expected


# ------------------------------------------------------------------ format


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("<think>x</think><answer>B</answer>", 1.0),
        ("<think>x</think>\n\n<answer>B</answer>\n", 1.0),
        ("  <think>multi\nline</think> <answer>B</answer>  ", 1.0),
        ("<think></think><answer>B</answer>", 0.0),  # empty think
        ("<think>x</think><answer> </answer>", 0.0),  # blank answer
        ("<answer>B</answer><think>x</think>", 0.0),  # wrong order
        ("<think>x</think><answer>B</answer> extra", 0.0),  # trailing text
        ("pre <think>x</think><answer>B</answer>", 0.0),  # leading text
        ("<think>x</think>middle<answer>B</answer>", 0.0),  # text between
        ("<think>x</think><think>y</think><answer>B</answer>", 0.0),  # two thinks
        ("<think>x <answer>A</answer></think><answer>B</answer>", 0.0),  # two answers
        ("<think>x</think><answer>B", 0.0),  # unclosed answer
        ("", 0.0),
    ],
)
def test_format_reward(response: str, expected: float) -> None:
    assert format_reward(response) == expected


# ------------------------------------------------------------------ temporal grounding


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<time>1.5 to 3, 4 to 6</time>", [(1.5, 3.0), (4.0, 6.0)]),
        ("<time>1-3</time>", [(1.0, 3.0)]),
        ("<time>2s to 4.5 seconds</time>", [(2.0, 4.5)]),
        ("<time>5 to 3, 1 to 2</time>", [(1.0, 2.0)]),  # reversed span skipped
        ("<time>0 to 1</time> then <time>2 to 4</time>", [(2.0, 4.0)]),  # last tag
        ("<time>7 to 9", [(7.0, 9.0)]),  # unclosed
        ("<time>soon</time>", []),
        ("from 1 to 3", []),  # no tag
    ],
)
def test_extract_time_spans(text: str, expected: list[tuple[float, float]]) -> None:
    assert extract_time_spans(text) == expected


@pytest.mark.parametrize(
    ("pred", "gold", "expected"),
    [
        ([(0, 10)], [(5, 15)], 1 / 3),  # inter 5, union 15
        ([(0, 6), (4, 10)], [(5, 15)], 1 / 3),  # overlapping preds merge to (0, 10)
        ([(0, 2), (4, 6)], [(0, 6)], 2 / 3),  # inter 4, union 6
        ([(0, 2), (4, 6)], [(1, 5)], 1 / 3),  # inter 2, union 6
        ([(2, 4)], [(2, 4)], 1.0),
        ([(0, 1)], [(2, 3)], 0.0),  # disjoint
        ([], [(2, 3)], 0.0),
        ([], [], 0.0),
        ([(1, 1)], [(1, 1)], 0.0),  # zero-length union
    ],
)
def test_temporal_iou(pred: list, gold: list, expected: float) -> None:
    assert temporal_iou(pred, gold) == pytest.approx(expected)


def test_iou_reward() -> None:
    qa = _qa("free-form", "x", time_spans=((5.0, 15.0),))
    assert iou_reward("<think>t</think><time>0 to 10</time><answer>x</answer>", qa) == (
        pytest.approx(1 / 3)
    )
    assert iou_reward("<time>0 to 10</time>", _qa("free-form", "x")) == 0.0  # no gold spans
    assert iou_reward("no time tag", qa) == 0.0


# ------------------------------------------------------------------ combination


def test_score_responses_weighted_total() -> None:
    spec = RewardSpec(weights={"accuracy": 0.9, "format": 0.1})
    qa = _qa("multiple choice", "B")
    responses = [
        "<think>t</think><answer>B</answer>",  # acc 1, fmt 1
        "Answer: A",  # acc 0, fmt 0
        "<answer>B</answer>",  # acc 1, fmt 0
        "<think>t</think><answer>C</answer>",  # acc 0, fmt 1
    ]
    out = score_responses(responses, [qa] * 4, spec)
    assert list(out) == ["accuracy", "format", "total"]
    assert out["accuracy"] == [1.0, 0.0, 1.0, 0.0]
    assert out["format"] == [1.0, 0.0, 0.0, 1.0]
    assert out["total"] == pytest.approx([1.0, 0.0, 0.9, 0.1])


def test_score_responses_with_iou() -> None:
    spec = RewardSpec(weights={"accuracy": 0.5, "format": 0.1, "iou": 0.4})
    qa = _qa("multiple choice", "A", time_spans=((0.0, 4.0),))
    out = score_responses(["<think>t</think><time>2 to 4</time><answer>A</answer>"], [qa], spec)
    # format fails: text between </think> and <answer>; iou = 2 / 4
    assert out["iou"] == [0.5]
    assert out["total"] == pytest.approx([0.5 + 0.0 + 0.4 * 0.5])


def test_reward_spec_validation() -> None:
    assert RewardSpec().weights == {"accuracy": 0.9, "format": 0.1}
    with pytest.raises(ValueError, match="acc"):
        RewardSpec(weights={"acc": 1.0})
    with pytest.raises(ValueError):
        RewardSpec(weights={})
    with pytest.raises(ValueError):
        RewardSpec(numerical_rel_tol=-0.1)
    with pytest.raises(ValueError):
        score_responses(["a"], [], RewardSpec())


# ------------------------------------------------------------------ properties

_TAGGY = st.text(
    alphabet=st.sampled_from(list("<>/ ABCabc019.,:-\n|~")) | st.characters(),
    max_size=200,
).map(lambda s: s.replace("|", "<answer>").replace("~", "</answer>"))
_TEXT = st.one_of(
    st.text(max_size=200),
    _TAGGY,
    st.builds(lambda a, b: f"<think>{a}</think><answer>{b}</answer>", st.text(), st.text()),
)


@settings(max_examples=200, deadline=None)
@given(_TEXT, st.sampled_from(["multiple choice", "numerical", "free-form", "regression", "OCR"]))
def test_rewards_never_raise(text: str, problem_type: str) -> None:
    gold = {"multiple choice": "B", "numerical": "3", "regression": "10"}.get(problem_type, "red")
    qa = _qa(problem_type, gold, time_spans=((1.0, 2.0),))
    answer = extract_answer(text)
    assert answer is None or isinstance(answer, str)
    assert 0.0 <= accuracy_reward(text, qa) <= 1.0
    assert format_reward(text) in (0.0, 1.0)
    assert 0.0 <= iou_reward(text, qa) <= 1.0
    normalize_choice(text, OPTIONS)
    parse_number(text)


_SPAN = st.tuples(
    st.floats(min_value=0, max_value=1e4, allow_nan=False),
    st.floats(min_value=0, max_value=1e4, allow_nan=False),
).map(lambda t: (min(t), max(t)))


@settings(max_examples=200, deadline=None)
@given(st.lists(_SPAN, max_size=6), st.lists(_SPAN, max_size=6))
def test_temporal_iou_symmetric_in_unit_interval(a: list, b: list) -> None:
    iou = temporal_iou(a, b)
    assert 0.0 <= iou <= 1.0
    assert iou == pytest.approx(temporal_iou(b, a))
    if a and sum(e - s for s, e in a) > 0:
        assert temporal_iou(a, a) == pytest.approx(1.0)
