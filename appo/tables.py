"""The one table renderer (markdown) and the number formats of eval, report and experiments.

- :func:`pct`: a fraction as a percentage with one decimal, ``-`` for a missing or non-finite
  value;
- :func:`num`: a number in a format, ``-`` likewise;
- :func:`markdown`: a markdown table, text columns left-aligned and numbers right-aligned.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and not math.isfinite(x))


def pct(x: float | None) -> str:
    """``0.1234`` -> ``"12.3"``; None, nan or inf -> ``"-"``."""
    return "-" if missing(x) else f"{100 * x:.1f}"


def num(x: Any, fmt: str = ".3f") -> str:
    """``x`` formatted with ``fmt``; None, nan or inf -> ``"-"``."""
    return "-" if missing(x) else format(x, fmt)


def markdown(head: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 1
             ) -> list[str]:
    """Markdown table lines (and a closing blank line): the first ``text_columns`` columns
    left-aligned, the rest right-aligned."""
    align = ["---"] * text_columns + ["---:"] * (len(head) - text_columns)
    return ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|",
            *("| " + " | ".join(r) + " |" for r in rows), ""]
