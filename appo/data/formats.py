"""Readers for the public benchmark/dataset formats, each mapped to :class:`VideoQA`.

Three formats are understood:

* ``videor1``: Video-R1 style JSON (Video-R1-260k, its CoT SFT file, Video-R1 eval files, the
  APPO paper's Perception Test file) and everything :meth:`VideoQA.to_json` writes;
* ``nextgqa``: NExT-GQA with native NExT-QA fields (plain options, index answer, time clues),
  or its official CSV release (text answers; spans and video paths from the ``gsub_<split>.json``
  and ``map_vid_vidorID.json`` shipped next to it);
* ``seedbench_r1``: SEED-Bench-R1, both the training form (``answer`` + ``negative_answers``,
  options sampled with a fixed seed) and the evaluation form (``choice_a`` .. ``choice_d`` +
  ``golden_choice_idx``).

Malformed records fail fast with a :class:`DataError` naming the file, the line (JSONL) or
index (JSON list) and the field; silently dropping records would give wrong benchmark numbers.
The only tolerated problem is a missing video/image file, which is collected in the
:class:`LoadReport` and left to the evaluation to score, unless no record of the file has its
media (:func:`require_usable`: a wrong root, not a benchmark).
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appo.data.schema import (
    OPTION_LETTERS,
    PROBLEM_TYPES,
    DataError,
    LoadReport,
    VideoQA,
    parse_solution,
)

__all__ = [
    "FORMATS",
    "PathRemap",
    "annotation_source",
    "detect_format",
    "from_nextgqa",
    "from_seedbench_r1",
    "from_videor1",
    "load_annotations",
    "load_source",
    "missing_media",
    "read_records",
    "require_usable",
]

FORMATS = ("videor1", "nextgqa", "seedbench_r1")
DATA_TYPES = ("video", "image", "video+image")
SEEDBENCH_NUM_NEGATIVES = 3
# NExT-GQA's official <split>.csv (text answers); spans and paths come from its companion files.
NEXTGQA_CSV_COLUMNS = ("video_id", "question", "answer", "qid", "type", "a0", "a1", "a2", "a3",
                       "a4")
NEXTGQA_VIDEO_MAP = "map_vid_vidorID.json"

BaseDir = str | os.PathLike[str] | None

_SEP_RE = re.compile(r"[\\/]")
_DRIVE_RE = re.compile(r"^[A-Za-z]:[\\/]")
_LETTER_ANSWER_RE = re.compile(r"^\(?([A-J])\)?(?:[.):]\s*.*)?$", re.DOTALL)


# --------------------------------------------------------------------------------------------
# paths


def _basename(path: str) -> str:
    """Last path component, for POSIX or Windows separators (foreign paths may be either)."""
    return _SEP_RE.split(path.rstrip("/\\"))[-1]


def _stem(path: str) -> str:
    """Basename without its extension: the video id of NExT-QA style paths."""
    return os.path.splitext(_basename(path))[0]


def _is_absolute(path: str) -> bool:
    """Absolute on any machine: POSIX ``/x``, Windows ``\\x`` or ``C:\\x`` (foreign paths)."""
    return path.startswith(("/", "\\")) or _DRIVE_RE.match(path) is not None


def _parts(path: str) -> list[str]:
    """Path components for either separator, without empty and ``.`` components."""
    return [p for p in _SEP_RE.split(path) if p and p != "."]


@dataclass(frozen=True)
class PathRemap:
    """Maps the foreign paths stored in annotation files onto this machine.

    ``resolve`` uses ``video_root`` (or ``image_root`` for ``kind="image"``): with no root the
    path is kept (a relative path is joined to ``base_dir``, the annotation file's directory);
    with a root and a matching ``strip_prefix`` the suffix after the prefix is kept under the
    root; a relative path (Video-R1's ``./Evaluation/...``, NExT-QA's ``1025/123.mp4``) is
    kept whole under the root, because its folders are part of the release layout; otherwise
    (a foreign absolute path) only the basename is kept under the root.
    """

    video_root: str | None = None
    image_root: str | None = None
    strip_prefix: str | None = None

    def root_for(self, kind: str = "video") -> str | None:
        if kind == "video":
            return self.video_root
        if kind == "image":
            return self.image_root
        raise ValueError(f"kind must be 'video' or 'image', got {kind!r}")

    def resolve(self, path: str, kind: str = "video", base_dir: BaseDir = None) -> str:
        root = self.root_for(kind)
        if root is None:
            if base_dir is not None and not os.path.isabs(path):
                return os.path.join(os.fspath(base_dir), path)
            return path
        prefix = self.strip_prefix
        if prefix:
            prefix_norm = prefix.rstrip("/\\")
            if path == prefix_norm or (
                path.startswith(prefix_norm) and path[len(prefix_norm)] in "/\\"
            ):
                return os.path.join(root, *_parts(path[len(prefix_norm) :]))
        if not _is_absolute(path):
            return os.path.join(root, *_parts(path))
        return os.path.join(root, _basename(path))


def annotation_source(entry: Any, section: PathRemap) -> tuple[str, PathRemap]:
    """(path, remap) of a ``data.files`` / ``eval.benchmarks`` entry.

    An entry is a path (the section's roots apply) or a :class:`appo.config.FileSpec` whose
    set roots override the section's, so every file keeps its own release layout.
    """
    if isinstance(entry, (str, os.PathLike)):
        return os.fspath(entry), section
    remap = PathRemap(
        entry.video_root if entry.video_root is not None else section.video_root,
        entry.image_root if entry.image_root is not None else section.image_root,
        entry.strip_prefix if entry.strip_prefix is not None else section.strip_prefix,
    )
    return entry.path, remap


# --------------------------------------------------------------------------------------------
# reading files


def _read_text(path: str | os.PathLike[str]) -> str:
    """The whole annotation file as text (a BOM is dropped: some releases were saved with one)."""
    name = os.fspath(path)
    try:
        return Path(name).read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise DataError(f"{name}: cannot read annotation file: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}: not UTF-8 text: {exc}") from exc


def _is_csv(name: str, text: str) -> bool:
    """A ``.csv`` name, or a first line that is neither JSON nor JSONL but has commas."""
    first = text.lstrip().split("\n", 1)[0]
    return name.lower().endswith(".csv") or (first[:1] not in "[{" and "," in first)


def _is_record(raw: dict[str, Any]) -> bool:
    """Whether a JSON object carries a field of some supported record format."""
    return any(key in raw for _, keys in _SIGNATURES for key in keys)


def _parse_json(name: str, text: str) -> tuple[bool, list[tuple[int, dict[str, Any]]]]:
    """(is_json_list, records) of JSON-list or JSONL text; see :func:`read_records`.

    A pretty-printed wrapper object such as ``{"data": [...]}`` would otherwise surface as
    "invalid JSON" on its second line, so a whole-file object that is not a record is named
    for what it is.
    """
    stripped = text.lstrip()
    if _is_csv(name, text):
        raise DataError(f"{name}: CSV: only NExT-GQA's CSV ({', '.join(NEXTGQA_CSV_COLUMNS)}) "
                        "is supported, and only through load_annotations")
    out: list[tuple[int, dict[str, Any]]] = []
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{name}:{exc.lineno}: invalid JSON (column {exc.colno}): {exc.msg}"
            ) from exc
        for index, entry in enumerate(data):
            if not isinstance(entry, dict):
                raise DataError(
                    f"{name}[{index}]: record must be a JSON object, got {type(entry).__name__}"
                )
            out.append((index, entry))
        return True, out
    if stripped.startswith("{"):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # JSONL (several objects) or broken: the line loop below says which
        if isinstance(whole, dict):
            if not _is_record(whole):
                keys = ", ".join(sorted(whole)[:5])
                raise DataError(f"{name}: top-level JSON object (keys: {keys}), expected a list "
                                "of records (JSON list) or one record per line (JSONL)")
            return False, [(1, whole)]
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{name}:{lineno}: invalid JSON (column {exc.colno}): {exc.msg}"
            ) from exc
        if not isinstance(entry, dict):
            raise DataError(
                f"{name}:{lineno}: record must be a JSON object, got {type(entry).__name__}"
            )
        out.append((lineno, entry))
    return False, out


def read_records(path: str | os.PathLike[str]) -> list[tuple[int, dict[str, Any]]]:
    """Read a JSON-list or JSONL file (decided by content: first non-space char ``[``).

    Returns ``(number, record)`` pairs: the 0-based index for a JSON list, the 1-based line for
    JSONL (blank lines skipped). Invalid JSON, a non-object entry, a top-level wrapper object
    or a CSV file raises :class:`DataError`.
    """
    return _parse_json(os.fspath(path), _read_text(path))[1]


def _where(path: str | os.PathLike[str], number: int, is_list: bool) -> str:
    name = os.fspath(path)
    return f"{name}[{number}]" if is_list else f"{name}:{number}"


# --------------------------------------------------------------------------------------------
# field helpers


def _err(where: str, key: str, message: str) -> DataError:
    return DataError(f"{where}: field {key!r} {message}")


def _req(raw: dict[str, Any], key: str, where: str) -> Any:
    if key not in raw or raw[key] is None:
        raise _err(where, key, "is missing")
    return raw[key]


def _req_str(raw: dict[str, Any], key: str, where: str, *, allow_empty: bool = False) -> str:
    value = _req(raw, key, where)
    if not isinstance(value, str):
        raise _err(where, key, f"must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _err(where, key, "is empty")
    return value


def _opt_str(raw: dict[str, Any], key: str, where: str) -> str | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _err(where, key, f"must be a string, got {type(value).__name__}")
    return value


def _req_id(raw: dict[str, Any], key: str, where: str) -> str:
    value = _req(raw, key, where)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _err(where, key, f"must be a string or an integer, got {type(value).__name__}")
    text = str(value).strip()
    if not text:
        raise _err(where, key, "is empty")
    return text


def _as_float(value: Any, key: str, where: str) -> float:
    if isinstance(value, bool):
        raise _err(where, key, f"must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise _err(where, key, f"must be a number, got {value!r}")


def _opt_float(raw: dict[str, Any], key: str, where: str) -> float | None:
    value = raw.get(key)
    if value is None or value == "":
        return None
    return _as_float(value, key, where)


def _str_list(raw: dict[str, Any], key: str, where: str, *, required: bool) -> list[str]:
    value = raw.get(key)
    if value is None:
        if required:
            raise _err(where, key, "is missing")
        return []
    if not isinstance(value, list):
        raise _err(where, key, f"must be a list of strings, got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _err(where, key, f"item {i} must be a string, got {type(item).__name__}")
    return list(value)


def _spans(raw: dict[str, Any], key: str, where: str) -> tuple[tuple[float, float], ...]:
    value = raw.get(key)
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _err(where, key, f"must be a list of [start, end] pairs, got {value!r}")
    spans: list[tuple[float, float]] = []
    for i, span in enumerate(value):
        if not isinstance(span, (list, tuple)) or len(span) != 2:
            raise _err(where, key, f"item {i} must be a [start, end] pair, got {span!r}")
        start = _as_float(span[0], key, where)
        end = _as_float(span[1], key, where)
        if start < 0 or end < start:
            raise _err(where, key, f"item {i} must satisfy 0 <= start <= end, got {span!r}")
        spans.append((start, end))
    return tuple(spans)


def _int_list(raw: dict[str, Any], key: str, where: str) -> tuple[int, ...]:
    value = raw.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or any(
        isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in value
    ):
        raise _err(where, key, f"must be a list of non-negative integers, got {value!r}")
    return tuple(value)


def _option_text(option: str, index: int, where: str) -> str:
    """Text of an already lettered Video-R1 option, ``"A. text"`` or ``"A) text"``.

    Video-R1-260k mixes both styles in one file, so both are accepted (and rewritten to the
    one ``"A. "`` style by :func:`_lettered`); the letter must still match the position, since
    the gold answer is a letter.
    """
    letter = OPTION_LETTERS[index]
    match = re.match(rf"\s*{letter}\s*[.)]\s*(.*)$", option, re.DOTALL)
    if match is None:
        raise _err(
            where, "options", f"item {index} must start with '{letter}.' or '{letter})', "
            f"got {option!r}"
        )
    return match.group(1)


def _lettered(options: list[str]) -> tuple[str, ...]:
    return tuple(f"{OPTION_LETTERS[i]}. {text.strip()}" for i, text in enumerate(options))


def _check_option_count(n: int, key: str, where: str) -> None:
    if n < 2:
        raise _err(where, key, f"needs at least 2 options for a multiple-choice question, got {n}")
    if n > len(OPTION_LETTERS):
        raise _err(where, key, f"has {n} options; at most {len(OPTION_LETTERS)} are supported")


def _build(where: str, **kwargs: Any) -> VideoQA:
    """Construct the record; any remaining schema error gets the file/record prefix."""
    try:
        return VideoQA(**kwargs)
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from exc


# --------------------------------------------------------------------------------------------
# adapters


def from_videor1(
    raw: dict[str, Any], where: str, remap: PathRemap, base_dir: BaseDir = None
) -> VideoQA:
    """Video-R1 style record (also what :meth:`VideoQA.to_json` writes) -> :class:`VideoQA`.

    Multiple-choice options come lettered, ``"A. ..."`` or ``"A) ..."`` (validated in order,
    stored as ``"A. ..."``); the gold letter comes from ``solution``. ``family`` falls back to ``data_source``.
    """
    problem_id = _req_id(raw, "problem_id", where)
    problem = _req_str(raw, "problem", where)
    problem_type = _req_str(raw, "problem_type", where)
    if problem_type not in PROBLEM_TYPES:
        raise _err(
            where, "problem_type", f"is {problem_type!r}, not one of {', '.join(PROBLEM_TYPES)}"
        )
    data_type = _opt_str(raw, "data_type", where) or "video"
    if data_type not in DATA_TYPES:
        raise _err(where, "data_type", f"is {data_type!r}, not one of {', '.join(DATA_TYPES)}")

    is_mc = problem_type == "multiple choice"
    options = _str_list(raw, "options", where, required=is_mc)
    if is_mc:
        _check_option_count(len(options), "options", where)
        options = [_option_text(option, i, where) for i, option in enumerate(options)]

    solution = _req_str(raw, "solution", where)
    answer = parse_solution(solution, where)
    if not answer:
        raise _err(where, "solution", f"has an empty answer: {solution!r}")
    if is_mc:
        match = _LETTER_ANSWER_RE.match(answer)
        letters = OPTION_LETTERS[: len(options)]
        if match is None or match.group(1) not in letters:
            raise _err(
                where, "solution", f"answer {answer!r} is not one of the option letters {letters}"
            )
        answer = match.group(1)
    elif problem_type in ("numerical", "regression"):
        try:
            float(answer.replace(",", ""))
        except ValueError:
            raise _err(
                where, "solution", f"answer {answer!r} is not a number ({problem_type})"
            ) from None

    path = _req_str(raw, "path", where)
    video = remap.resolve(path, "image" if data_type == "image" else "video", base_dir)
    image_raw = _opt_str(raw, "image", where)
    image = remap.resolve(image_raw, "image", base_dir) if image_raw else None
    if data_type == "video+image" and image is None:
        raise _err(where, "image", "is missing for data_type 'video+image'")

    return _build(
        where,
        problem_id=problem_id,
        problem=problem,
        problem_type=problem_type,
        answer=answer,
        video=video,
        options=_lettered(options),
        data_type=data_type,
        image=image,
        process=_opt_str(raw, "process", where),
        key_frames=_int_list(raw, "key_frames", where),
        time_spans=_spans(raw, "time_spans", where),
        duration=_opt_float(raw, "duration", where),
        family=_opt_str(raw, "family", where) or _opt_str(raw, "data_source", where),
        dataset_name=_opt_str(raw, "dataset_name", where),
    )


def from_nextgqa(
    raw: dict[str, Any], where: str, remap: PathRemap, base_dir: BaseDir = None
) -> VideoQA:
    """NExT-GQA record (native NExT-QA fields) -> multiple-choice :class:`VideoQA`.

    Plain options become ``"A. ..."``; the index answer ``"0".."4"`` becomes the letter;
    ``time_clues`` become ``time_spans`` and ``qtype`` the ``family``. A ``qid`` is unique only
    within its video, so the id is ``<video id>_<qid>`` (kept as is when the qid already
    starts with the video id): paired comparisons key rows by (benchmark, problem_id).
    """
    qid = _req_id(raw, "qid", where)
    question = _req_str(raw, "question", where)
    options = _str_list(raw, "options", where, required=True)
    _check_option_count(len(options), "options", where)
    answer_raw = _req(raw, "answer", where)
    if isinstance(answer_raw, bool):
        index = -1
    elif isinstance(answer_raw, int):
        index = answer_raw
    elif isinstance(answer_raw, str) and answer_raw.strip().isdigit():
        index = int(answer_raw.strip())
    else:
        index = -1
    if not 0 <= index < len(options):
        raise _err(
            where,
            "answer",
            f"must be an option index 0..{len(options) - 1}, got {answer_raw!r}",
        )
    video_path = _req_str(raw, "video_path", where)
    video_id = _stem(video_path)
    problem_id = qid if qid.startswith(f"{video_id}_") else f"{video_id}_{qid}"
    return _build(
        where,
        problem_id=problem_id,
        problem=question,
        problem_type="multiple choice",
        answer=OPTION_LETTERS[index],
        video=remap.resolve(video_path, "video", base_dir),
        options=_lettered(options),
        data_type="video",
        time_spans=_spans(raw, "time_clues", where),
        duration=_opt_float(raw, "duration", where),
        family=_opt_str(raw, "qtype", where),
        dataset_name=_opt_str(raw, "dataset_name", where) or "nextgqa",
    )


def _companion(path: Path, csv_name: str) -> dict[str, Any]:
    """A JSON object shipped next to NExT-GQA's CSV (``gsub_<split>.json``, the video map)."""
    if not path.is_file():
        raise DataError(f"{csv_name}: NExT-GQA CSV needs {path.name} in the same folder "
                        f"({path} not found)")
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON (column {exc.colno}): {exc.msg}") \
            from exc
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object keyed by video_id")
    return data


def nextgqa_csv_record(
    row: dict[str, Any], where: str, spans: dict[str, Any], video_map: dict[str, Any]
) -> dict[str, Any]:
    """One row of NExT-GQA's official CSV -> the native NExT-GQA record :func:`from_nextgqa` reads.

    The CSV gives the answer as text (one of ``a0`` .. ``a4``), the spans live in
    ``gsub_<split>.json`` (``{video_id: {duration, location: {qid: [[s, e], ...]}}}``) and the
    video path in ``map_vid_vidorID.json`` (``{video_id: "1025/123"}``, relative, no extension).
    Converting to the native record keeps one adapter for both NExT-GQA forms.
    """
    video_id = _req_str(row, "video_id", where).strip()
    qid = _req_str(row, "qid", where).strip()
    options = [_req_str(row, f"a{i}", where).strip() for i in range(5)]
    answer = _req_str(row, "answer", where).strip()
    if answer not in options:
        raise _err(where, "answer", f"{answer!r} is not one of the options a0..a4")
    if video_id not in video_map:
        raise _err(where, "video_id", f"{video_id!r} has no entry in {NEXTGQA_VIDEO_MAP}")
    entry = spans.get(video_id)
    location = entry.get("location") if isinstance(entry, dict) else None
    if not isinstance(location, dict) or qid not in location:
        raise _err(where, "qid", f"{qid!r} of video {video_id!r} has no span in the gsub file")
    return {
        "qid": qid,
        "question": _req_str(row, "question", where),
        "video_path": f"{video_map[video_id]}.mp4",
        "options": options,
        "answer": str(options.index(answer)),
        "qtype": row.get("type"),
        "duration": entry.get("duration"),
        "time_clues": location[qid],
        "dataset_name": "nextgqa",
    }


def _nextgqa_csv(name: str, text: str) -> list[tuple[str, dict[str, Any]]]:
    """(where, native record) of every row of NExT-GQA's official CSV and its companion files."""
    reader = csv.DictReader(io.StringIO(text))
    absent = [c for c in NEXTGQA_CSV_COLUMNS if c not in (reader.fieldnames or [])]
    if absent:
        raise DataError(f"{name}: CSV: only NExT-GQA's CSV ({', '.join(NEXTGQA_CSV_COLUMNS)}) "
                        f"is supported; this header lacks {', '.join(absent)}")
    folder = Path(name).parent
    spans = _companion(folder / f"gsub_{Path(name).stem}.json", name)
    video_map = _companion(folder / NEXTGQA_VIDEO_MAP, name)
    out = []
    for row in reader:
        where = f"{name}:{reader.line_num}"
        out.append((where, nextgqa_csv_record(row, where, spans, video_map)))
    return out


def _golden_index(value: Any, n: int, where: str) -> int:
    key = "golden_choice_idx"
    index = -1
    if isinstance(value, bool):
        index = -1
    elif isinstance(value, int):
        index = value
    elif isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            index = int(text)
        elif len(text) == 1 and text.upper() in OPTION_LETTERS:
            index = OPTION_LETTERS.index(text.upper())
    if not 0 <= index < n:
        raise _err(
            where,
            key,
            f"must be an index 0..{n - 1} or a letter {OPTION_LETTERS[:n]}, got {value!r}",
        )
    return index


def seedbench_options(
    answer: str, negatives: list[str], sample_id: str, seed: int = 0
) -> tuple[list[str], int]:
    """Training-form options: up to 3 negatives sampled plus the answer, shuffled.

    The generator is ``random.Random(f"{seed}:{sample_id}")`` (stable across processes and
    Python hash seeds), so the same seed always yields the same options and gold index.
    Returns ``(plain_options, gold_index)``.
    """
    answer_key = answer.strip()
    pool: list[str] = []
    for neg in negatives:
        if neg.strip() and neg.strip() != answer_key and neg not in pool:
            pool.append(neg)
    rng = random.Random(f"{seed}:{sample_id}")
    chosen = rng.sample(pool, min(SEEDBENCH_NUM_NEGATIVES, len(pool)))
    options = [*chosen, answer]
    rng.shuffle(options)
    return options, options.index(answer)


def from_seedbench_r1(
    raw: dict[str, Any],
    where: str,
    remap: PathRemap,
    base_dir: BaseDir = None,
    seed: int = 0,
) -> VideoQA:
    """SEED-Bench-R1 record -> multiple-choice ``"video+image"`` :class:`VideoQA`.

    A record whose ``task_progress_metadata`` is empty (the task has not started, so there is
    no clip) is ``"image"``-only, as the official evaluation treats it: the observation image
    is the record's one visual input.

    Evaluation form (``choice_a`` ..) is used when ``choice_a`` is present, else the training
    form (``answer`` + ``negative_answers``, see :func:`seedbench_options`). Video is
    ``<video_root>/videos/<video_source>/<video_basename>``, image is
    ``<image_root or video_root>/images/<video_source>/<current_observation_basename>``
    (roots default to the annotation file's directory).
    """
    sample_id = _req_id(raw, "sample_id", where)
    task_goal = _req_str(raw, "task_goal", where)
    question = _req_str(raw, "question", where)

    if "choice_a" in raw:
        choices: list[str] = []
        for letter in OPTION_LETTERS:
            key = f"choice_{letter.lower()}"
            if key not in raw:
                break
            choices.append(_req_str(raw, key, where))
        _check_option_count(len(choices), "choice_b", where)
        gold = _golden_index(_req(raw, "golden_choice_idx", where), len(choices), where)
    elif "golden_choice_idx" in raw:
        raise _err(where, "choice_a", "is missing (evaluation form with golden_choice_idx)")
    else:
        answer = _req_str(raw, "answer", where)
        negatives = _str_list(raw, "negative_answers", where, required=True)
        choices, gold = seedbench_options(answer, negatives, sample_id, seed)
        if len(choices) < 2:
            raise _err(where, "negative_answers", "has no usable wrong answer")

    source = _req_str(raw, "video_source", where)
    image_name = _basename(_req_str(raw, "current_observation_basename", where))
    default_root = os.fspath(base_dir) if base_dir is not None else "."
    image_root = remap.image_root or remap.video_root or default_root
    image = os.path.join(image_root, "images", source, image_name)
    media: dict[str, Any] = {"data_type": "image", "video": image}
    progress = raw.get("task_progress_metadata")
    if progress is not None and not isinstance(progress, list):
        raise _err(where, "task_progress_metadata", f"must be a list, got {progress!r}")
    if progress != []:  # no progress yet: the official evaluation shows the image alone
        video_name = _basename(_req_str(raw, "video_basename", where))
        video_root = remap.video_root or default_root
        media = {"data_type": "video+image", "image": image,
                 "video": os.path.join(video_root, "videos", source, video_name)}

    return _build(
        where,
        problem_id=sample_id,
        problem=f"Task goal: {task_goal.strip()}\n{question.strip()}",
        problem_type="multiple choice",
        answer=OPTION_LETTERS[gold],
        options=_lettered(choices),
        duration=_opt_float(raw, "duration", where),
        family=source,
        dataset_name=_opt_str(raw, "dataset_name", where) or "seed_bench_r1",
        **media,
    )


# --------------------------------------------------------------------------------------------
# detection and loading

# (format, fields any of which identifies it), checked in order: most specific first.
_SIGNATURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("seedbench_r1", ("task_goal", "negative_answers", "golden_choice_idx")),
    ("nextgqa", ("qid", "video_path", "time_clues")),
    ("videor1", ("problem", "solution")),
)


def detect_format(raw: dict[str, Any], where: str = "") -> str:
    """Which format a record is in: ``"videor1"``, ``"nextgqa"`` or ``"seedbench_r1"``."""
    for fmt, keys in _SIGNATURES:
        if any(k in raw for k in keys):
            return fmt
    looked = "; ".join(f"{fmt}: {', '.join(keys)}" for fmt, keys in _SIGNATURES)
    prefix = f"{where}: " if where else ""
    raise DataError(
        f"{prefix}unknown record format (fields {sorted(raw)}); looked for any of the fields "
        f"{looked}"
    )


Adapter = Callable[[dict[str, Any], str, PathRemap, BaseDir], VideoQA]


def _adapter(fmt: str, seed: int) -> Adapter:
    if fmt == "videor1":
        return from_videor1
    if fmt == "nextgqa":
        return from_nextgqa
    if fmt == "seedbench_r1":

        def seedbench(
            raw: dict[str, Any], where: str, remap: PathRemap, base_dir: BaseDir
        ) -> VideoQA:
            return from_seedbench_r1(raw, where, remap, base_dir, seed=seed)

        return seedbench
    raise ValueError(f"fmt must be 'auto' or one of {', '.join(FORMATS)}, got {fmt!r}")


def _missing(qa: VideoQA) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    if not os.path.exists(qa.video):
        found.append(("image" if qa.data_type == "image" else "video", qa.video))
    if qa.image is not None and qa.image != qa.video and not os.path.exists(qa.image):
        found.append(("image", qa.image))
    return found


def missing_media(qa: VideoQA) -> list[str]:
    """The record's video/image paths that do not exist on this machine."""
    return [path for _, path in _missing(qa)]


def _raw_records(path: str | os.PathLike[str]) -> tuple[list[tuple[str, dict[str, Any]]], bool]:
    """(where, raw record) pairs of any supported file, and whether it was NExT-GQA's CSV."""
    name = os.fspath(path)
    text = _read_text(path)
    if _is_csv(name, text):
        return _nextgqa_csv(name, text), True
    is_list, records = _parse_json(name, text)
    return [(_where(path, number, is_list), raw) for number, raw in records], False


def load_annotations(
    path: str | os.PathLike[str],
    remap: PathRemap | None = None,
    fmt: str = "auto",
    check_files: bool = True,
    seed: int = 0,
) -> tuple[list[VideoQA], LoadReport]:
    """Read an annotation file (JSON list, JSONL or NExT-GQA's CSV) of any supported format.

    A malformed record raises :class:`DataError` (file, line/index, field). With
    ``check_files``, missing video/image files are listed in the report as
    ``"file:line: video not found: /x/y.mp4"`` and the record is still returned. ``fmt="auto"``
    detects the format per record; ``seed`` drives SEED-Bench-R1 training-form option sampling.
    NExT-GQA's CSV is read with ``gsub_<split>.json`` and ``map_vid_vidorID.json`` from its
    folder, as the release ships them.
    """
    remap = remap if remap is not None else PathRemap()
    if fmt != "auto":
        _adapter(fmt, seed)  # validate fmt before reading
    records, from_csv = _raw_records(path)
    base_dir = os.path.dirname(os.path.abspath(os.fspath(path)))
    report = LoadReport()
    out: list[VideoQA] = []
    for where, raw in records:
        record_fmt = "nextgqa" if from_csv else detect_format(raw, where) if fmt == "auto" else fmt
        qa = _adapter(record_fmt, seed)(raw, where, remap, base_dir)
        if check_files:
            for kind, media in _missing(qa):
                report.add(f"{where}: {kind} not found: {media}")
        out.append(qa)
    return out, report


def require_usable(path: str | os.PathLike[str], records: list[VideoQA]) -> None:
    """Fail when no record of a file has its media on this machine.

    That is a wrong ``video_root`` / ``strip_prefix``, not a benchmark on which the model
    scores 0%: left alone it gives a page of warnings and a successful run that DVC caches.
    """
    if records and all(missing_media(qa) for qa in records):
        first = missing_media(records[0])[0]
        raise DataError(f"{os.fspath(path)}: none of its {len(records)} records has its media "
                        f"on this machine (first missing: {first}); check video_root, "
                        "image_root and strip_prefix")


def load_source(
    entry: Any, section: PathRemap, seed: int = 0
) -> tuple[str, list[VideoQA], LoadReport]:
    """(path, records, report) of one ``data.files`` / ``eval.benchmarks`` entry.

    The one loader of both stages: per-file roots (:func:`annotation_source`), missing media
    listed in the report, and :func:`require_usable`.
    """
    path, remap = annotation_source(entry, section)
    records, report = load_annotations(path, remap, seed=seed)
    require_usable(path, records)
    return path, records, report
