"""Evaluation protocols: one knob (``eval.protocol``) for decoding, pixel budget and scoring.

* ``pipeline`` (default): greedy decoding, frames as the ``frames`` section samples them, and
  the RL reward rules of :mod:`appo.rl.rewards`, so a reported number means what the reward
  meant during training.
* ``videor1``: Video-R1's published evaluation: near-greedy sampling (temperature 0.01,
  top-p 0.001), at most 256*28*28 pixels per frame, and its scripts' answer extraction and
  per-type scores (:func:`videor1_score`). Video-R1 reports the mean score, the ``reward``
  column of our tables.
* ``appo``: the APPO paper's benchmarks (SEED-Bench-R1 L1/L2/L3 accuracy, NExT-GQA accuracy and
  mIoU, Perception Test accuracy) with the same decoding and pixel budget as ``videor1``
  (APPO's code builds on Video-R1's) and letter-match accuracy plus temporal IoU.

The frame count is not part of a protocol: set ``frames.num_frames`` (or ``fps`` /
``max_frames``) to the count of the run you compare against.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from appo.rl.rewards import _edit_distance, _lcs_length  # the same DP, reused

__all__ = ["PROTOCOLS", "Protocol", "videor1_answer", "videor1_score"]


@dataclass(frozen=True)
class Protocol:
    """Decoding, per-frame pixel budget and scoring rules of one evaluation protocol."""

    name: str
    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    max_pixels: int | None = None  # per-frame budget of benchmark frames; None: frames.max_pixels
    scoring: str = "pipeline"  # pipeline (the RL rewards) | videor1 (:func:`videor1_score`)


VIDEOR1_MAX_PIXELS = 256 * 28 * 28

PROTOCOLS = {
    "pipeline": Protocol("pipeline"),
    "videor1": Protocol("videor1", greedy=False, temperature=0.01, top_p=0.001,
                        max_pixels=VIDEOR1_MAX_PIXELS, scoring="videor1"),
    "appo": Protocol("appo", greedy=False, temperature=0.01, top_p=0.001,
                     max_pixels=VIDEOR1_MAX_PIXELS, scoring="pipeline"),
}


# --------------------------------------------------------------------------------------------
# Video-R1's scoring, as its evaluation scripts compute it

_ANSWER = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)
_ROUGE_TOKEN = re.compile(r"[^a-z0-9]+")
MRA_THRESHOLDS = tuple(0.5 + 0.05 * i for i in range(10))  # 0.50 .. 0.95


def videor1_answer(text: str | None) -> str:
    """The FIRST ``<answer>...</answer>`` content, or the whole output when there is none."""
    text = text or ""
    match = _ANSWER.search(text)
    answer = match.group(1).strip() if match else ""
    return answer or text


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def _rouge_tokens(text: str) -> list[str]:
    return _ROUGE_TOKEN.sub(" ", text.lower()).split()


def _f1(overlap: int, n_pred: int, n_gold: int) -> float:
    if overlap == 0:
        return 0.0
    precision, recall = overlap / n_pred, overlap / n_gold
    return 2 * precision * recall / (precision + recall)


def _rouge_n(pred: list[str], gold: list[str], n: int) -> float:
    def grams(tokens: list[str]) -> dict[tuple[str, ...], int]:
        out: dict[tuple[str, ...], int] = {}
        for i in range(len(tokens) - n + 1):
            key = tuple(tokens[i:i + n])
            out[key] = out.get(key, 0) + 1
        return out

    p, g = grams(pred), grams(gold)
    overlap = sum(min(count, g.get(key, 0)) for key, count in p.items())
    return _f1(overlap, sum(p.values()), sum(g.values()))


def videor1_rouge(pred: str, gold: str) -> float:
    """Mean of ROUGE-1, ROUGE-2 and ROUGE-L F1 (``rouge_score``'s lowercase alphanumeric
    tokens; Video-R1 also applies the Porter stemmer, which is not available here)."""
    p, g = _rouge_tokens(pred), _rouge_tokens(gold)
    rouge_l = _f1(_lcs_length(p, g), len(p), len(g)) if p and g else 0.0
    return (_rouge_n(p, g, 1) + _rouge_n(p, g, 2) + rouge_l) / 3


def videor1_score(response: str | None, qa: Any) -> float:
    """Video-R1's per-type score of one response (0..1), as in its evaluation scripts.

    multiple choice: the answer equals the gold letter exactly; numerical: both or neither
    have a decimal mark, then equal at 2 decimals (``float`` of the whole answer); regression:
    mean relative accuracy, ``|p - g| / (|g| + 1e-8) < 1 - theta``; OCR: ``1 - WER`` on
    whitespace tokens, case-sensitive; free-form: :func:`videor1_rouge`. Anything that does
    not parse scores 0.
    """
    answer, gold = videor1_answer(response).strip(), str(qa.answer).strip()
    kind = qa.problem_type
    if kind == "multiple choice":
        return float(answer == gold)
    if kind in ("numerical", "regression"):
        p, g = _number(answer), _number(gold)
        if p is None or g is None:
            return 0.0
        if kind == "regression":
            error = abs(p - g) / (abs(g) + 1e-8)
            return sum(error < 1 - t for t in MRA_THRESHOLDS) / len(MRA_THRESHOLDS)
        if ("." in answer or "," in answer) != ("." in gold or "," in gold):
            return 0.0
        return float(round(p, 2) == round(g, 2))
    if kind == "OCR":
        ref, hyp = gold.split(), answer.split()
        return max(0.0, min(1.0, 1 - _edit_distance(ref, hyp) / max(1, len(ref))))
    return max(0.0, min(1.0, videor1_rouge(answer, gold)))
