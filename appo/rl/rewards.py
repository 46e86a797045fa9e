"""Rule-based rewards for video question answering (Video-R1 / VSI-Bench / NExT-GQA rules).

Every function here is pure and never raises on malformed model text: a response that cannot be
parsed scores 0.0 (or parses to ``None`` / ``[]``). Records are duck-typed: anything with
``problem_type``, ``answer`` and ``options`` attributes (and ``time_spans`` for grounding) works,
:class:`appo.data.schema.VideoQA` included.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Protocol

from appo.config import DEFAULT_REWARD_WEIGHTS, REWARD_COMPONENTS

__all__ = [
    "COMPONENTS",
    "MRA_THRESHOLDS",
    "QARecord",
    "RewardSpec",
    "accuracy_reward",
    "choice_accuracy",
    "extract_answer",
    "extract_time_spans",
    "format_reward",
    "iou_reward",
    "is_correct",
    "mean_relative_accuracy",
    "normalize_choice",
    "normalize_text",
    "numerical_accuracy",
    "ocr_accuracy",
    "parse_number",
    "rouge_l_f1",
    "score_responses",
    "temporal_iou",
    "word_error_rate",
]

COMPONENTS = REWARD_COMPONENTS
OPTION_LETTERS = "ABCDEFGHIJ"
# VSI-Bench confidence thresholds 0.50, 0.55, ..., 0.95, kept in hundredths so they are exact.
MRA_THRESHOLDS = tuple(range(50, 100, 5))


class QARecord(Protocol):
    """What a reward needs from a question record (``VideoQA`` satisfies it)."""

    @property
    def problem_type(self) -> str: ...

    @property
    def answer(self) -> str: ...

    @property
    def options(self) -> Sequence[str]: ...


# --------------------------------------------------------------------------------------------
# Answer extraction
# --------------------------------------------------------------------------------------------

_ANSWER_OPEN = re.compile(r"<\s*answer\s*>", re.IGNORECASE)
_ANSWER_CLOSE = re.compile(r"<\s*/\s*answer\s*>?", re.IGNORECASE)
_STRAY_TAG = re.compile(r"<\s*/?\s*(?:answer|think|time)\s*>", re.IGNORECASE)
_ANSWER_PHRASE = re.compile(r"\banswer\s*(?:is\b\s*:?|:)[ \t]*([^\n]*)", re.IGNORECASE)


def extract_answer(text: str | None) -> str | None:
    """Answer = stripped content of the LAST ``<answer>`` tag, else the last "answer is/: X".

    An unclosed final ``<answer>`` takes the rest of the text. Without any tag the last
    "Answer: X" / "answer is X" phrase (rest of its line) is used. Returns ``None`` when there is
    nothing (or only whitespace) to grade.
    """
    if not isinstance(text, str) or not text:
        return None
    openers = list(_ANSWER_OPEN.finditer(text))
    if openers:
        rest = text[openers[-1].end() :]
        close = _ANSWER_CLOSE.search(rest)
        content = rest[: close.start()] if close else rest
        content = _STRAY_TAG.sub(" ", content).strip()
        return content or None
    phrases = [m.group(1).strip() for m in _ANSWER_PHRASE.finditer(text)]
    phrases = [p for p in phrases if p]
    return phrases[-1] if phrases else None


# --------------------------------------------------------------------------------------------
# Multiple choice
# --------------------------------------------------------------------------------------------

_OPTION_PREFIX = re.compile(
    r"^\s*(?:\(\s*([A-Za-z])\s*\)|\[\s*([A-Za-z])\s*\]|([A-Za-z])\s*[.:)])\s*(.*)$", re.DOTALL
)
_CHOICE_LEAD = re.compile(
    r"^\s*(?:the\s+)?(?:final\s+|correct\s+|best\s+)*(?:answer|option|choice)\b\s*(?:is\b)?\s*:?\s*",
    re.IGNORECASE,
)
_BARE_LETTER = re.compile(r"^\s*[\(\[]?\s*([A-Za-z])\s*[\)\]]?\s*[.:)]?\s*$")
_EDGE_PUNCT = "".join(string.punctuation) + " \t\n\r\u3002\uff0c\uff1a\uff1b\uff01\uff1f"


def _choice_key(text: str) -> str:
    """Case/space-insensitive comparison key for option text."""
    text = unicodedata.normalize("NFKC", text).casefold().strip(_EDGE_PUNCT)
    return "".join(text.split())


def _split_option(option: str, position: int) -> tuple[str, str]:
    """(letter, text) of an option like ``"B. blue"``; positional letter if it has no prefix."""
    option = unicodedata.normalize("NFKC", option)
    match = _OPTION_PREFIX.match(option)
    if match:
        letter = next(g for g in match.groups()[:3] if g).upper()
        return letter, match.group(4)
    return OPTION_LETTERS[position] if position < len(OPTION_LETTERS) else "", option


def _letter_prefix(text: str) -> tuple[str, str] | None:
    """(letter, remainder) when ``text`` starts with a letter marker: "B", "B.", "(B) x", "b) x"."""
    bare = _BARE_LETTER.match(text)
    if bare:
        return bare.group(1).upper(), ""
    match = _OPTION_PREFIX.match(text)
    if match:
        return next(g for g in match.groups()[:3] if g).upper(), match.group(4)
    return None


def normalize_choice(ans: str | None, options: Sequence[str]) -> str | None:
    """Letter = explicit letter marker ("B", "(B)", "b)", "Answer: B") or the unique option text.

    With ``options`` empty any letter A-J is accepted. Returns ``None`` when the answer maps to
    no option letter, or when its text matches several options.
    """
    if not isinstance(ans, str):
        return None
    try:
        parsed = [_split_option(str(o), i) for i, o in enumerate(options or ())]
    except TypeError:
        parsed = []
    letters = {letter for letter, _ in parsed if letter} or set(OPTION_LETTERS)
    by_key: dict[str, set[str]] = {}
    for letter, text in parsed:
        key = _choice_key(text)
        if key and letter:
            by_key.setdefault(key, set()).add(letter)

    def by_text(candidate: str) -> str | None:
        hits = by_key.get(_choice_key(candidate), set())
        return next(iter(hits)) if len(hits) == 1 else None

    text = unicodedata.normalize("NFKC", ans).strip()
    if not text:
        return None
    candidates = [text]
    stripped = _CHOICE_LEAD.sub("", text, count=1).strip()
    if stripped and stripped != text:
        candidates.append(stripped)
    for candidate in candidates:
        marked = _letter_prefix(candidate)
        if marked is not None and marked[0] in letters:
            return marked[0]
        hit = by_text(candidate)
        if hit is not None:
            return hit
    return None


def choice_accuracy(pred: str | None, gold: str, options: Sequence[str]) -> float:
    """1.0 iff normalize_choice(pred) == normalize_choice(gold) (the gold option letter)."""
    got = normalize_choice(pred, options)
    want = normalize_choice(gold, options) or str(gold).strip().upper()
    return 1.0 if got is not None and got == want else 0.0


# --------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------

_NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13,
    "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18,
    "nineteen": 19, "twenty": 20,
}  # fmt: skip
_NUMBER = re.compile(
    r"(?P<num>[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d{1,3})?|[-+]?\.\d+)"
    r"|\b(?P<word>" + "|".join(sorted(_NUMBER_WORDS, key=len, reverse=True)) + r")\b",
    re.IGNORECASE,
)


def _number_token(text: Any) -> str | None:
    """The first number in ``text`` as written (thousands commas kept, words as digits)."""
    if isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        return repr(float(text)) if math.isfinite(text) else None
    if not isinstance(text, str):
        return None
    match = _NUMBER.search(unicodedata.normalize("NFKC", text))
    if match is None:
        return None
    if match.group("word"):
        return str(_NUMBER_WORDS[match.group("word").lower()])
    return match.group("num")


def _number_string(text: Any) -> str | None:
    """The first number in ``text`` as a plain decimal string (commas dropped, words as digits)."""
    token = _number_token(text)
    return None if token is None else token.replace(",", "")


def parse_number(text: Any) -> float | None:
    """First number in the text: "3", "-2.5", "1,234", "3 times", "three" (zero..twenty)."""
    number = _number_string(text)
    if number is None:
        return None
    try:
        value = float(number)
    except (ValueError, OverflowError):
        return None
    return value if math.isfinite(value) else None


def _exact_number(text: Any) -> Fraction | None:
    """First number in the text as an exact fraction of its decimal digits."""
    number = _number_string(text)
    if number is None:
        return None
    try:
        return Fraction(number)
    except (ValueError, OverflowError, ZeroDivisionError):
        return None


def _has_decimal_mark(token: str) -> bool:
    return "." in token or "," in token


def numerical_accuracy(pred: str | float | None, gold: str | float, rel_tol: float = 0.0) -> float:
    """Video-R1's numerical rule: 0.0 unless pred and gold both have, or both lack, a decimal
    mark ("." or ","); then 1.0 iff round(pred, 2) == round(gold, 2), or
    |pred - gold| <= rel_tol * |gold|.

    So ``4.0`` against ``4`` and ``1,234`` against ``1234`` are wrong, as in Video-R1's reward
    and evaluation scripts (the reference evaluator of every numerical record we read).
    Deliberate difference: Video-R1 converts the whole answer with ``float`` (``"3 cups"``
    scores 0), here the first number of the answer is used (``"3 cups"``, ``"three"`` -> 3),
    and the decimal-mark test looks at that number as written.
    """
    p_token, g_token = _number_token(pred), _number_token(gold)
    if p_token is None or g_token is None:
        return 0.0
    if _has_decimal_mark(p_token) != _has_decimal_mark(g_token):
        return 0.0
    p, g = parse_number(p_token), parse_number(g_token)
    if p is None or g is None:
        return 0.0
    if round(p, 2) == round(g, 2):
        return 1.0
    if rel_tol > 0.0 and abs(p - g) <= rel_tol * abs(g):
        return 1.0
    return 0.0


def mean_relative_accuracy(pred: str | float | None, gold: str | float) -> float:
    """MRA = mean over theta in {.50,.55,...,.95} of 1[|pred-gold|/|gold| < 1-theta].

    VSI-Bench's regression score, with a strict ``<``; when gold is 0 the absolute error
    |pred - gold| is compared instead. Arithmetic is exact on the decimal digits written.
    """
    p, g = _exact_number(pred), _exact_number(gold)
    if p is None or g is None:
        return 0.0
    error = abs(p - g) / abs(g) if g != 0 else abs(p - g)
    hits = sum(1 for theta in MRA_THRESHOLDS if error < Fraction(100 - theta, 100))
    return hits / len(MRA_THRESHOLDS)


# --------------------------------------------------------------------------------------------
# Text answers
# --------------------------------------------------------------------------------------------

_PUNCT = re.compile(r"[^\w\s]|_")
_ARTICLES = frozenset({"a", "an", "the"})


def normalize_text(text: str | None, *, drop_articles: bool = True) -> list[str]:
    """Tokens = whitespace split of lowercase text with punctuation (and articles) removed."""
    if not isinstance(text, str):
        return []
    text = _PUNCT.sub(" ", unicodedata.normalize("NFKC", text).casefold())
    tokens = text.split()
    if drop_articles:
        tokens = [t for t in tokens if t not in _ARTICLES]
    return tokens


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) time, O(len(b)) memory)."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_f1(pred: str | None, gold: str) -> float:
    """ROUGE-L F1 = 2PR/(P+R), P = LCS/|pred|, R = LCS/|gold| on normalized tokens.

    An exact normalized match scores 1.0 (also when both normalize to nothing).
    """
    if not isinstance(pred, str):
        return 0.0
    p, g = normalize_text(pred), normalize_text(gold)
    if p == g:
        return 1.0 if p or pred.strip().casefold() == str(gold).strip().casefold() else 0.0
    if not p or not g:
        return 0.0
    lcs = _lcs_length(p, g)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(g)
    return 2 * precision * recall / (precision + recall)


def _edit_distance(a: Sequence[str], b: Sequence[str]) -> int:
    """Levenshtein distance between token sequences (unit insert/delete/substitute)."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        current = [i]
        for j, y in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def word_error_rate(pred: str | None, gold: str) -> float:
    """WER = word edit distance(pred, gold) / |gold words| on lowercase, punctuation-free text.

    Articles are kept (OCR is verbatim). With an empty gold: 0.0 if pred is empty too, else 1.0.
    """
    p = normalize_text(pred, drop_articles=False)
    g = normalize_text(gold, drop_articles=False)
    if not g:
        return 0.0 if not p else 1.0
    return _edit_distance(p, g) / len(g)


def ocr_accuracy(pred: str | None, gold: str) -> float:
    """OCR score = max(0, 1 - WER(pred, gold)); 0.0 when there is no prediction."""
    if not isinstance(pred, str):
        return 0.0
    return max(0.0, 1.0 - word_error_rate(pred, gold))


# --------------------------------------------------------------------------------------------
# Rewards on whole responses
# --------------------------------------------------------------------------------------------


def accuracy_reward(response: str, qa: QARecord, *, numerical_rel_tol: float = 0.0) -> float:
    """Accuracy = the problem type's rule applied to extract_answer(response) vs ``qa.answer``.

    multiple choice: letter match; numerical: Video-R1's rule (:func:`numerical_accuracy`);
    regression: MRA; free-form: ROUGE-L F1; OCR: max(0, 1 - WER). An unknown
    ``qa.problem_type`` is a data error and raises ``ValueError``.
    """
    problem_type = getattr(qa, "problem_type", None)
    gold = str(getattr(qa, "answer", ""))
    if problem_type not in ("multiple choice", "numerical", "free-form", "regression", "OCR"):
        raise ValueError(f"accuracy_reward: unknown problem_type {problem_type!r}")
    pred = extract_answer(response)
    if pred is None:
        return 0.0
    if problem_type == "multiple choice":
        return choice_accuracy(pred, gold, tuple(getattr(qa, "options", ()) or ()))
    if problem_type == "numerical":
        return numerical_accuracy(pred, gold, numerical_rel_tol)
    if problem_type == "regression":
        return mean_relative_accuracy(pred, gold)
    if problem_type == "free-form":
        return rouge_l_f1(pred, gold)
    return ocr_accuracy(pred, gold)


def is_correct(response: str, qa: QARecord, *, numerical_rel_tol: float = 0.0) -> bool:
    """Correct iff accuracy_reward(response, qa) >= 0.5 (shared with evaluation)."""
    return accuracy_reward(response, qa, numerical_rel_tol=numerical_rel_tol) >= 0.5


_FORMAT = re.compile(r"<think>(.*?)</think>\s*<answer>(.*?)</answer>", re.DOTALL)


def format_reward(response: str) -> float:
    """1.0 iff stripped response is exactly ``<think>T</think>\\s*<answer>A</answer>``, T, A non-empty.

    Exactly one of each tag, in that order, nothing before ``<think>`` or after ``</answer>``.
    """
    if not isinstance(response, str):
        return 0.0
    text = response.strip()
    if any(text.count(tag) != 1 for tag in ("<think>", "</think>", "<answer>", "</answer>")):
        return 0.0
    match = _FORMAT.fullmatch(text)
    if match is None or not match.group(1).strip() or not match.group(2).strip():
        return 0.0
    return 1.0


# --------------------------------------------------------------------------------------------
# Temporal grounding (NExT-GQA)
# --------------------------------------------------------------------------------------------

_TIME_OPEN = re.compile(r"<\s*time\s*>", re.IGNORECASE)
_TIME_CLOSE = re.compile(r"<\s*/\s*time\s*>?", re.IGNORECASE)
_SECONDS = r"(\d+(?:\.\d+)?|\.\d+)(?:\s*(?:seconds|second|secs|sec|s)\b)?"
_SPAN = re.compile(_SECONDS + r"\s*(?:to|-|\u2013|\u2014|~)\s*" + _SECONDS, re.IGNORECASE)


def extract_time_spans(text: str | None) -> list[tuple[float, float]]:
    """Spans "s to e" / "s-e" inside the LAST ``<time>`` tag, in order, skipping those with e < s.

    An unclosed final ``<time>`` takes the rest of the text; no tag gives ``[]``.
    """
    if not isinstance(text, str):
        return []
    openers = list(_TIME_OPEN.finditer(text))
    if not openers:
        return []
    rest = text[openers[-1].end() :]
    close = _TIME_CLOSE.search(rest)
    body = unicodedata.normalize("NFKC", rest[: close.start()] if close else rest)
    spans: list[tuple[float, float]] = []
    for match in _SPAN.finditer(body):
        start, end = float(match.group(1)), float(match.group(2))
        if math.isfinite(start) and math.isfinite(end) and end >= start:
            spans.append((start, end))
    return spans


def _merge(spans: Sequence[Sequence[float]]) -> list[tuple[float, float]]:
    """Sorted, disjoint union of the valid (finite, e >= s) intervals in ``spans``."""
    valid = []
    for span in spans or ():
        try:
            start, end = float(span[0]), float(span[1])
        except (TypeError, ValueError, IndexError):
            continue
        if math.isfinite(start) and math.isfinite(end) and end >= start:
            valid.append((start, end))
    merged: list[tuple[float, float]] = []
    for start, end in sorted(valid):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def temporal_iou(
    pred_spans: Sequence[Sequence[float]], gold_spans: Sequence[Sequence[float]]
) -> float:
    """IoU = |U(pred) & U(gold)| / |U(pred) | U(gold)| on the time line (0.0 for empty unions)."""
    pred, gold = _merge(pred_spans), _merge(gold_spans)
    inter = 0.0
    i = j = 0
    while i < len(pred) and j < len(gold):
        lo, hi = max(pred[i][0], gold[j][0]), min(pred[i][1], gold[j][1])
        inter += max(0.0, hi - lo)
        if pred[i][1] < gold[j][1]:
            i += 1
        else:
            j += 1
    union = sum(e - s for s, e in pred) + sum(e - s for s, e in gold) - inter
    if not union > 0.0 or not math.isfinite(union):
        return 0.0
    return min(1.0, max(0.0, inter / union))


def iou_reward(response: str, qa: Any) -> float:
    """IoU reward = temporal_iou(extract_time_spans(response), qa.time_spans); 0.0 without gold."""
    gold = getattr(qa, "time_spans", None) or ()
    if not gold:
        return 0.0
    return temporal_iou(extract_time_spans(response), gold)


# --------------------------------------------------------------------------------------------
# Weighted combination
# --------------------------------------------------------------------------------------------


def _default_weights() -> dict[str, float]:
    return dict(DEFAULT_REWARD_WEIGHTS)


@dataclass
class RewardSpec:
    """total = sum over components c of weights[c] * c(response, record); c in COMPONENTS.

    ``numerical_rel_tol`` is passed to the numerical accuracy rule.
    """

    weights: dict[str, float] = field(default_factory=_default_weights)
    numerical_rel_tol: float = 0.0

    def __post_init__(self) -> None:
        if not self.weights:
            raise ValueError(f"RewardSpec.weights is empty; use some of {', '.join(COMPONENTS)}")
        for name, weight in self.weights.items():
            if name not in COMPONENTS:
                raise ValueError(
                    f"RewardSpec.weights: unknown reward component {name!r}; "
                    f"known: {', '.join(COMPONENTS)}"
                )
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise ValueError(f"RewardSpec.weights[{name!r}] must be a number, got {weight!r}")
            if not math.isfinite(weight):
                raise ValueError(f"RewardSpec.weights[{name!r}] must be finite, got {weight!r}")
        if not math.isfinite(self.numerical_rel_tol) or self.numerical_rel_tol < 0:
            raise ValueError(
                f"RewardSpec.numerical_rel_tol must be >= 0, got {self.numerical_rel_tol!r}"
            )


def score_responses(
    responses: Sequence[str], records: Sequence[Any], spec: RewardSpec
) -> dict[str, list[float]]:
    """Per-response component values plus "total" = sum_c spec.weights[c] * value_c.

    ``responses[i]`` is scored against ``records[i]``; only the components named in
    ``spec.weights`` are computed (in that order).
    """
    if len(responses) != len(records):
        raise ValueError(f"score_responses: {len(responses)} responses but {len(records)} records")
    out: dict[str, list[float]] = {}
    for name in spec.weights:
        if name == "accuracy":
            out[name] = [
                accuracy_reward(r, qa, numerical_rel_tol=spec.numerical_rel_tol)
                for r, qa in zip(responses, records)
            ]
        elif name == "format":
            out[name] = [format_reward(r) for r in responses]
        else:
            out[name] = [iou_reward(r, qa) for r, qa in zip(responses, records)]
    out["total"] = [
        sum(spec.weights[name] * out[name][i] for name in spec.weights)
        for i in range(len(responses))
    ]
    return out
