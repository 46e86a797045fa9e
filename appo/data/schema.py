"""The one internal question type every loader produces and every stage consumes.

Real benchmark files (Video-R1 style, NExT-GQA, SEED-Bench-R1) and the synthetic generator all
map to :class:`VideoQA`, so rewards, training and evaluation never see format differences.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

PROBLEM_TYPES = ("multiple choice", "numerical", "free-form", "regression", "OCR")
OPTION_LETTERS = "ABCDEFGHIJ"
_SOLUTION_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


class DataError(ValueError):
    """A malformed input record or file; the message names the file, record and field."""


@dataclass(frozen=True)
class VideoQA:
    """One video question with its gold answer.

    ``answer`` is the bare gold answer (the text inside ``<answer>``): an option letter for
    multiple choice, a number for numerical/regression, text otherwise. ``key_frames`` are the
    indices (in the source video) of the frames that show the answer: diagnostics only, never
    read by a training algorithm.
    """

    problem_id: str
    problem: str
    problem_type: str
    answer: str
    video: str
    options: tuple[str, ...] = ()
    data_type: str = "video"
    image: str | None = None
    process: str | None = None
    key_frames: tuple[int, ...] = ()
    time_spans: tuple[tuple[float, float], ...] = ()
    duration: float | None = None
    family: str | None = None
    dataset_name: str | None = None

    def __post_init__(self) -> None:
        if self.problem_type not in PROBLEM_TYPES:
            raise DataError(
                f"problem {self.problem_id}: problem_type {self.problem_type!r} is not one of "
                f"{', '.join(PROBLEM_TYPES)}"
            )
        if self.problem_type == "multiple choice":
            if len(self.options) < 2:
                raise DataError(
                    f"problem {self.problem_id}: field 'options' needs at least 2 lettered "
                    "options for a multiple-choice question"
                )
            letters = OPTION_LETTERS[: len(self.options)]
            if self.answer not in letters:
                raise DataError(
                    f"problem {self.problem_id}: answer {self.answer!r} is not one of the option "
                    f"letters {letters}"
                )

    @property
    def video_file(self) -> str | None:
        """The video to decode; None for an image-only record.

        An ``"image"`` record keeps its picture in ``video`` (Video-R1's one ``path`` field), so
        every consumer asks here and in :attr:`image_file` instead of reading ``data_type``.
        """
        return None if self.data_type == "image" else self.video

    @property
    def image_file(self) -> str | None:
        """The image shown to the model (Video-R1 image records, SEED-Bench-R1's observation)."""
        return self.video if self.data_type == "image" else self.image

    @property
    def solution(self) -> str:
        """The gold answer in the Video-R1 tag form."""
        return f"<answer>{self.answer}</answer>"

    def to_json(self) -> dict[str, Any]:
        """The Video-R1 JSON record (plus our optional diagnostic fields)."""
        record = asdict(self)
        record.pop("answer")
        record["solution"] = self.solution
        record["path"] = record.pop("video")
        record["options"] = list(self.options)
        record["key_frames"] = list(self.key_frames)
        record["time_spans"] = [list(s) for s in self.time_spans]
        return {k: v for k, v in record.items() if v not in (None, [], ())}


def parse_solution(solution: str, where: str) -> str:
    """Return the text inside ``<answer>...</answer>``; ``where`` names the record in errors."""
    match = _SOLUTION_RE.search(solution or "")
    if match is None:
        raise DataError(f"{where}: field 'solution' must look like '<answer>X</answer>', got {solution!r}")
    return match.group(1).strip()


@dataclass
class LoadReport:
    """What a loader skipped and why, so nothing is dropped silently."""

    problems: list[str] = field(default_factory=list)

    def add(self, message: str) -> None:
        self.problems.append(message)
