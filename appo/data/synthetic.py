"""Deterministic generator of a key-frame video-QA benchmark (real .mp4 files + Video-R1 JSON).

Every question is answerable only from a few frames (the ``key_frames``): a shape flashes for
``event_frames`` frames among noisy grey distractors, so a policy that does not *look* at the
right frames cannot beat chance. Events last ``event_frames`` consecutive frames starting at a
multiple of ``event_frames``, so segment-centre uniform sampling of ``num_frames/event_frames``
frames (what :mod:`appo.data.frames` does) always keeps at least one frame of each event.

Families (answer formats are mixed: option letters and numbers):
- ``flash_color``: which colour was the square that flashed? (multiple choice, 4 options)
- ``flash_shape``: which shape flashed? (multiple choice, 4 options)
- ``flash_position``: in which quarter of the frame did the square flash? (multiple choice, 4)
- ``count``: how many times did the white square flash? (numerical, 1 to ``count_max``)
- ``order``: two squares of different colours flash; which colour came first? (multiple
  choice, the 4 colours: both flashes must be seen, and their order)
Options are listed in a fixed order per family: binding a shuffled letter is a language skill
that a from-scratch model learns far slower than perception.

The sft split's chains of thought are a simulated teacher's (as Video-R1's CoT data was written
by a larger VLM). With ``teacher_error`` > 0 the teacher misperceives: on a question listed in
:data:`TEACHER_CONFUSIONS` (``count`` with three or four flashes: half of that family) it misses
one flash with that probability, in the chain of thought and the answer alike. The video is the
truth; the rl, val and test splits are always labelled by the truth. Above 0.5 the
warm start learns the error as the more likely answer, while the truth stays a likely sample:
the headroom an outcome reward can teach, on the tokens that report what was seen.
"""

from __future__ import annotations

import json
import os
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np

from appo.config import ConfigError, SyntheticConfig
from appo.data.schema import VideoQA
from appo.io import atomic_write_text, atomic_write_video

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 210, 40),
}
SHAPES = ("square", "circle", "triangle", "cross")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
FAMILIES = ("flash_color", "flash_shape", "flash_position", "count", "order")
SPLIT_SEEDS = {"sft": 1, "rl": 2, "val": 3, "test": 4}
TEACHER_SEED = 99  # the teacher's own stream: its errors never change the videos

# What the misperceiving teacher reports instead of the truth, per family (values not listed,
# and families not listed: the truth). It misses one of three or four flashes, counting's
# classic error. Probed and dropped (docs/calibration.md): colour confusions (red called green,
# both ways or one way), with which the 640-step warm start stopped telling the colours apart
# and RL, its vision tower frozen, never sampled the truth to learn from.
TEACHER_CONFUSIONS: dict[str, dict] = {
    "count": {3: 2, 4: 3},
}


def _shape_mask(shape: str, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    c = (size - 1) / 2
    if shape == "square":
        return np.ones((size, size), bool)
    if shape == "circle":
        return (yy - c) ** 2 + (xx - c) ** 2 <= (size / 2) ** 2
    if shape == "triangle":
        return (yy >= 0) & (np.abs(xx - c) <= yy / 2 + 0.5)
    if shape == "cross":
        t = max(1, size // 3)
        lo, hi = (size - t) // 2, (size - t) // 2 + t
        return ((yy >= lo) & (yy < hi)) | ((xx >= lo) & (xx < hi))
    raise ValueError(f"unknown shape {shape!r}")


class _Painter:
    """Draws frames: grey background, grey moving distractors, per-pixel noise."""

    def __init__(self, knobs: SyntheticConfig, rng: np.random.Generator) -> None:
        self.k = knobs
        self.rng = rng
        n, s = knobs.num_frames, knobs.size
        self.frames = np.full((n, s, s, 3), 96, np.float32)
        for _ in range(knobs.distractors):
            shape = SHAPES[rng.integers(len(SHAPES))]
            grey = float(rng.integers(130, 170))
            y, x = self._free_position()
            dy, dx = rng.integers(-2, 3, size=2)
            for t in range(n):
                yt = int(np.clip(y + dy * t, 0, s - knobs.object_size))
                xt = int(np.clip(x + dx * t, 0, s - knobs.object_size))
                self._paint(t, shape, (grey, grey, grey), yt, xt)

    def _free_position(self, side: int | None = None) -> tuple[int, int]:
        hi = self.k.size - (side or self.k.object_size) + 1
        return int(self.rng.integers(hi)), int(self.rng.integers(hi))

    def _paint(self, t: int, shape: str, color: tuple[float, ...], y: int, x: int,
               side: int | None = None) -> None:
        o = side or self.k.object_size
        mask = _shape_mask(shape, o)
        self.frames[t, y : y + o, x : x + o][mask] = color

    def on_grid(self, side: int, step: int) -> tuple[int, int]:
        """A random position for a ``side``-pixel object at multiples of ``step`` pixels."""
        hi = (self.k.size - side) // step + 1
        return int(self.rng.integers(hi)) * step, int(self.rng.integers(hi)) * step

    def in_quadrant(self, quadrant: int) -> tuple[int, int]:
        """A position whose square lies wholly inside ``QUADRANTS[quadrant]`` of the frame."""
        half, o = self.k.size // 2, self.k.object_size
        if o > half:
            raise ValueError("object_size must be at most half the frame size for flash_position")
        y = int(self.rng.integers(half - o + 1)) + half * (quadrant // 2)
        x = int(self.rng.integers(half - o + 1)) + half * (quadrant % 2)
        return y, x

    def flash(self, start: int, shape: str, color: tuple[float, ...],
              side: int | None = None, at: tuple[int, int] | None = None) -> list[int]:
        """Show ``shape`` (``side`` pixels, default ``object_size``) for ``event_frames`` frames
        from ``start``, at ``at`` (else a random position); returns those frame indices."""
        y, x = at if at is not None else self._free_position(side)
        idx = list(range(start, start + self.k.event_frames))
        for t in idx:
            self._paint(t, shape, color, y, x, side)
        return idx

    def render(self) -> np.ndarray:
        noisy = self.frames + self.rng.normal(0, self.k.noise, self.frames.shape)
        return np.clip(noisy, 0, 255).astype(np.uint8)


def _event_slots(knobs: SyntheticConfig) -> int:
    return knobs.num_frames // knobs.event_frames


def _lettered(options: list[str]) -> tuple[str, ...]:
    return tuple(f"{'ABCD'[i]}. {o}" for i, o in enumerate(options))


def _seconds(frame: int, knobs: SyntheticConfig) -> str:
    return f"{frame / knobs.fps:.1f}s"


def make_question(family: str, rng: np.random.Generator, knobs: SyntheticConfig,
                  misperceive: bool = False) -> tuple[np.ndarray, dict]:
    """Frames [T, H, W, 3] uint8 and the question fields for one example of ``family``.

    ``misperceive``: the text fields (answer, chain of thought) report what the teacher of
    :data:`TEACHER_CONFUSIONS` sees; the frames, the key frames and ``rng`` stay the truth's.
    """
    confusions = TEACHER_CONFUSIONS.get(family, {}) if misperceive else {}

    def said(value):
        return confusions.get(value, value)

    painter = _Painter(knobs, rng)
    slots = rng.permutation(_event_slots(knobs))
    e = knobs.event_frames
    if family == "flash_color":
        name = list(COLORS)[rng.integers(len(COLORS))]
        keys = painter.flash(int(slots[0]) * e, "square", COLORS[name])
        name = said(name)
        fields = dict(
            problem="What colour was the square that flashed?",
            problem_type="multiple choice",
            options=_lettered(list(COLORS)),
            answer="ABCD"[list(COLORS).index(name)],
            process=f"At {_seconds(keys[0], knobs)} a {name} square flashes.",
        )
    elif family == "flash_shape":
        shape = SHAPES[rng.integers(len(SHAPES))]
        at = painter.on_grid(knobs.shape_size, knobs.shape_grid) if knobs.shape_grid else None
        keys = painter.flash(int(slots[0]) * e, shape, COLORS["yellow"], knobs.shape_size, at)
        shape = said(shape)
        fields = dict(
            problem="Which shape flashed in yellow?",
            problem_type="multiple choice",
            options=_lettered(list(SHAPES)),
            answer="ABCD"[SHAPES.index(shape)],
            process=f"At {_seconds(keys[0], knobs)} a yellow {shape} flashes.",
        )
    elif family == "flash_position":
        quadrant = int(rng.integers(len(QUADRANTS)))
        keys = painter.flash(int(slots[0]) * e, "square", COLORS["green"],
                             at=painter.in_quadrant(quadrant))
        quadrant = said(quadrant)
        fields = dict(
            problem="Where did the green square flash?",
            problem_type="multiple choice",
            options=_lettered(list(QUADRANTS)),
            answer="ABCD"[quadrant],
            process=f"At {_seconds(keys[0], knobs)} a green square flashes in the "
                    f"{QUADRANTS[quadrant]}.",
        )
    elif family == "count":
        count = int(rng.integers(1, knobs.count_max + 1))
        starts = [s * e for s in _spaced_slots(rng, len(slots), count)]
        keys = [k for s in starts for k in painter.flash(s, "square", (250, 250, 250))]
        count = said(count)
        times = ", ".join(_seconds(s, knobs) for s in starts[:count])  # a missed flash: the last
        fields = dict(
            problem="How many times did the white square flash?",
            problem_type="numerical",
            options=(),
            answer=str(count),
            process=f"A white square flashes at {times}.",
        )
    elif family == "order":
        first, second = (list(COLORS)[i] for i in rng.choice(len(COLORS), 2, replace=False))
        a, b = (s * e for s in _spaced_slots(rng, len(slots), 2))
        keys = painter.flash(a, "square", COLORS[first]) + painter.flash(b, "square", COLORS[second])
        first, second = said(first), said(second)
        fields = dict(
            problem="Which colour flashed first?",
            problem_type="multiple choice",
            options=_lettered(list(COLORS)),
            answer="ABCD"[list(COLORS).index(first)],
            process=(
                f"A {first} square flashes at {_seconds(a, knobs)}, "
                f"a {second} one at {_seconds(b, knobs)}."
            ),
        )
    else:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    fields["key_frames"] = tuple(sorted(keys))
    return painter.render(), fields


def _spaced_slots(rng: np.random.Generator, n: int, count: int) -> list[int]:
    """``count`` of the ``n`` event slots, uniformly among the sets with no two adjacent (so
    flashes are separate events): sorted picks from ``n - count + 1`` places, spread by 1."""
    if 2 * count - 1 > n:
        raise ValueError(f"{count} separate flashes need {2 * count - 1} event slots, have {n}: "
                         "raise num_frames or lower count_max")
    picks = np.sort(rng.choice(n - count + 1, count, replace=False))
    return [int(p) + i for i, p in enumerate(picks)]


def split_families(split: str, knobs: SyntheticConfig) -> list[str]:
    """The families a split is drawn from, checked against :data:`FAMILIES`."""
    key, families = "families", knobs.families
    if split == "sft" and knobs.sft_families is not None:
        key, families = "sft_families", knobs.sft_families
    unknown = [f for f in families if f not in FAMILIES]
    if not families or unknown:
        raise ConfigError(f"data.synthetic.{key}: expected a non-empty list of {', '.join(FAMILIES)}"
                         f"; got {families}")
    return list(families)


def generate_split(
    out_dir: str | Path,
    split: str,
    count: int,
    knobs: SyntheticConfig,
    seed: int = 0,
    workers: int | None = None,
) -> list[VideoQA]:
    """Write ``count`` videos of one split and its ``{split}.json`` annotation file.

    Splits draw from disjoint seed streams, so no video repeats across splits. The families of
    ``knobs.families`` (for the sft split ``knobs.sft_families`` when set) are interleaved
    (question i has family i mod len) so splits are balanced.
    Frames are drawn in order from one stream (the output does not depend on ``workers``);
    encoding, 85% of the time, runs in ``workers`` processes (default: up to 4 cores).
    """
    families = split_families(split, knobs)
    out_dir = Path(out_dir)
    video_dir = out_dir / "videos" / split
    video_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, SPLIT_SEEDS[split]])
    teacher_error = knobs.teacher_error if split == "sft" else 0.0  # in [0, 1]: appo.config
    teacher = np.random.default_rng([seed, SPLIT_SEEDS[split], TEACHER_SEED])
    workers = workers or min(4, os.cpu_count() or 1)
    records = []
    with ProcessPoolExecutor(workers) if workers > 1 else _InlineExecutor() as pool:
        pending: deque[Future] = deque()
        for i in range(count):
            family = families[i % len(families)]
            misperceive = bool(teacher.random() < teacher_error)
            frames, fields = make_question(family, rng, knobs, misperceive)
            path = video_dir / f"{split}_{i:05d}.mp4"
            pending.append(pool.submit(atomic_write_video, path, frames, knobs.fps))
            while len(pending) > 4 * workers:  # bound the frames held in memory
                pending.popleft().result()
            process = fields.pop("process")
            records.append(VideoQA(
                problem_id=f"{split}-{i:05d}",
                video=str(path.relative_to(out_dir)),
                family=family,
                duration=knobs.num_frames / knobs.fps,
                dataset_name="synthetic-keyframe",
                process=f"<think>{process}</think>" if split == "sft" else None,
                **fields,
            ))
        for job in pending:
            job.result()
    atomic_write_text(
        out_dir / f"{split}.json", json.dumps([r.to_json() for r in records], indent=1)
    )
    return records


class _InlineExecutor:
    """``submit`` runs the call at once: the one-worker path without a process pool."""

    def __enter__(self) -> _InlineExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def submit(self, fn, *args) -> Future:
        done: Future = Future()
        done.set_result(fn(*args))
        return done
