"""Tests for appo.data.formats: every public format -> VideoQA, remapping, errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from appo.data.formats import (
    PathRemap,
    detect_format,
    from_nextgqa,
    from_seedbench_r1,
    from_videor1,
    load_annotations,
    missing_media,
    read_records,
)
from appo.data.schema import DataError, VideoQA

# ------------------------------------------------------------------------------------------
# sample records (public field names, foreign absolute paths)


def videor1_records() -> list[dict[str, Any]]:
    return [
        {
            "problem_id": 17,
            "problem": "Where is the person?",
            "data_type": "video",
            "problem_type": "multiple choice",
            "options": ["A. Indoors", "B. Outdoors", "C. In a car", "D. On a boat"],
            "solution": "<answer>C</answer>",
            "path": "/home/author/data/PerceptionTest/videos/v17.mp4",
            "data_source": "PerceptionTest/train",
            "duration": 12.5,
            "dataset_name": "perception_test",
            "process": "<think>The seats and the steering wheel show a car.</think>",
        },
        {
            "problem_id": "n2",
            "problem": "How many cups are on the table?",
            "data_type": "video",
            "problem_type": "numerical",
            "options": [],
            "solution": "<answer>3</answer>",
            "path": "/home/author/data/PerceptionTest/videos/v18.mp4",
        },
        {
            "problem_id": 19,
            "problem": "Describe what the person does.",
            "data_type": "video",
            "problem_type": "free-form",
            "options": [],
            "solution": "<answer>They pour water into a cup.</answer>",
            "path": "/home/author/data/PerceptionTest/videos/v19.mp4",
            "key_frames": [3, 7],
            "time_spans": [[1.0, 2.5]],
            "family": "action",
        },
    ]


def nextgqa_records() -> list[dict[str, Any]]:
    return [
        {
            "qid": "4010069381_6",
            "question": "why did the boy pick up the ball",
            "video_path": "/mnt/nextqa/videos/1025/4010069381.mp4",
            "options": ["to eat it", "to throw it", "to hide it", "to give it away", "to sit"],
            "answer": "3",
            "qtype": "CW",
            "frame_count": "900",
            "width": "640",
            "height": "480",
            "split": "test",
            "dataset_name": "nextqa",
            "duration": 30.0,
            "time_clues": [[2.0, 5.5], [10.0, 12.0]],
        },
        {
            "qid": "4010069381_7",
            "question": "what did the boy do after the ball fell",
            "video_path": "/mnt/nextqa/videos/1025/4010069381.mp4",
            "options": ["run", "cry", "laugh", "jump", "sit"],
            "answer": "0",
            "qtype": "TN",
            "duration": 30.0,
            "time_clues": [[20.0, 25.0]],
        },
    ]


SEED_NEGATIVES = ["cut onion", "wash plate", "open fridge", "turn off tap", "dry hands"]


def seed_train_record(sample_id: str = "s1") -> dict[str, Any]:
    return {
        "sample_id": sample_id,
        "video_id": "P01_11",
        "task_goal": "make a salad",
        "question": "What is the next action?",
        "answer": "pick up knife",
        "negative_answers": list(SEED_NEGATIVES),
        "task_progress_metadata": [
            {"narration_text": "wash lettuce", "start_frame": 10, "stop_frame": 90}
        ],
        "video_source": "EpicKitchens",
        "video_basename": "P01_11_clip3.mp4",
        "current_observation_basename": "P01_11_frame120.png",
        "duration": 8.0,
        "dataset_name": "seed_bench_r1",
    }


def seed_eval_record(golden: Any = "2", sample_id: str = "e1") -> dict[str, Any]:
    rec = seed_train_record(sample_id)
    del rec["answer"], rec["negative_answers"]
    rec.update(
        {
            "choice_a": "cut onion",
            "choice_b": "wash plate",
            "choice_c": "pick up knife",
            "choice_d": "open fridge",
            "golden_choice_idx": golden,
        }
    )
    return rec


def write_json(path: Path, records: list[Any]) -> Path:
    path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


# ------------------------------------------------------------------------------------------
# Video-R1


def check_videor1(items: list[VideoQA]) -> None:
    mc, num, free = items
    assert mc.problem_id == "17"
    assert mc.problem_type == "multiple choice"
    assert mc.options == ("A. Indoors", "B. Outdoors", "C. In a car", "D. On a boat")
    assert mc.answer == "C"
    assert mc.process is not None and mc.process.startswith("<think>")
    assert mc.duration == 12.5
    assert mc.dataset_name == "perception_test"
    assert mc.family == "PerceptionTest/train"  # data_source fallback
    assert mc.video == "/home/author/data/PerceptionTest/videos/v17.mp4"
    assert num.problem_type == "numerical" and num.answer == "3" and num.options == ()
    assert num.problem_id == "n2"
    assert free.problem_type == "free-form"
    assert free.answer == "They pour water into a cup."
    assert free.key_frames == (3, 7)
    assert free.time_spans == ((1.0, 2.5),)
    assert free.family == "action"


def test_videor1_json_list(tmp_path: Path) -> None:
    path = write_json(tmp_path / "train.json", videor1_records())
    items, report = load_annotations(path, check_files=False)
    check_videor1(items)
    assert report.problems == []


def test_videor1_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in videor1_records()) + "\n\n", encoding="utf-8")
    items, _ = load_annotations(path, fmt="videor1", check_files=False)
    check_videor1(items)
    assert [n for n, _ in read_records(path)] == [1, 2, 3]


def test_videor1_roundtrip_through_to_json(tmp_path: Path) -> None:
    items, _ = load_annotations(
        write_json(tmp_path / "a.json", videor1_records()), check_files=False
    )
    again, _ = load_annotations(
        write_json(tmp_path / "b.json", [qa.to_json() for qa in items]), check_files=False
    )
    assert again == items


def test_read_records_json_list_indices(tmp_path: Path) -> None:
    path = write_json(tmp_path / "x.json", videor1_records())
    rows = read_records(path)
    assert [n for n, _ in rows] == [0, 1, 2]
    assert rows[1][1]["problem_id"] == "n2"


# ------------------------------------------------------------------------------------------
# NExT-GQA


def test_nextgqa(tmp_path: Path) -> None:
    path = write_json(tmp_path / "nextgqa_test.json", nextgqa_records())
    items, _ = load_annotations(path, check_files=False)
    first, second = items
    assert first.problem_id == "4010069381_6"
    assert first.answer == "D"
    assert first.options == (
        "A. to eat it",
        "B. to throw it",
        "C. to hide it",
        "D. to give it away",
        "E. to sit",
    )
    assert first.time_spans == ((2.0, 5.5), (10.0, 12.0))
    assert first.family == "CW"
    assert first.dataset_name == "nextqa"
    assert first.duration == 30.0
    assert second.answer == "A"
    assert second.time_spans == ((20.0, 25.0),)


# ------------------------------------------------------------------------------------------
# SEED-Bench-R1


def test_seedbench_train_form_deterministic(tmp_path: Path) -> None:
    records = [seed_train_record(f"s{i}") for i in range(8)]
    path = write_json(tmp_path / "seed_train.json", records)
    a, _ = load_annotations(path, remap=PathRemap("/data/seed", None, None), check_files=False)
    b, _ = load_annotations(path, remap=PathRemap("/data/seed", None, None), check_files=False)
    assert a == b
    for qa in a:
        assert qa.problem_type == "multiple choice"
        assert len(qa.options) == 4
        gold = qa.options["ABCD".index(qa.answer)]
        assert gold == f"{qa.answer}. pick up knife"
        texts = [o.split(". ", 1)[1] for o in qa.options]
        assert len(set(texts)) == 4
        assert set(texts) - {"pick up knife"} <= set(SEED_NEGATIVES)
        assert "make a salad" in qa.problem and "What is the next action?" in qa.problem
        assert qa.family == "EpicKitchens"
        assert qa.data_type == "video+image"
        assert qa.video == "/data/seed/videos/EpicKitchens/P01_11_clip3.mp4"
        assert qa.image == "/data/seed/images/EpicKitchens/P01_11_frame120.png"
    # the seed changes the shuffle; across 8 samples the gold letter is not always the same
    assert len({qa.answer for qa in a}) > 1
    c, _ = load_annotations(path, check_files=False, seed=1)
    assert [qa.options for qa in c] != [qa.options for qa in a]


def test_seedbench_adapter_direct_is_reproducible() -> None:
    remap = PathRemap(None, None, None)
    one = from_seedbench_r1(seed_train_record(), "f.json:1", remap, "/base", seed=3)
    two = from_seedbench_r1(seed_train_record(), "f.json:1", remap, "/base", seed=3)
    assert one == two
    assert one.video == "/base/videos/EpicKitchens/P01_11_clip3.mp4"
    assert one.image == "/base/images/EpicKitchens/P01_11_frame120.png"


@pytest.mark.parametrize("golden", [2, "2", "C", "c"])
def test_seedbench_eval_form(tmp_path: Path, golden: Any) -> None:
    path = write_jsonl(tmp_path / "seed_L2.jsonl", [seed_eval_record(golden)])
    remap = PathRemap("/v", "/imgs", None)
    (qa,), _ = load_annotations(path, remap=remap, check_files=False)
    assert qa.answer == "C"
    assert qa.options == ("A. cut onion", "B. wash plate", "C. pick up knife", "D. open fridge")
    assert qa.video == "/v/videos/EpicKitchens/P01_11_clip3.mp4"
    assert qa.image == "/imgs/images/EpicKitchens/P01_11_frame120.png"


# ------------------------------------------------------------------------------------------
# paths


def test_remap_basename_and_prefix() -> None:
    foreign = "/home/author/data/PerceptionTest/videos/v17.mp4"
    assert PathRemap(None, None, None).resolve(foreign) == foreign
    assert PathRemap("/local/vids", None, None).resolve(foreign) == "/local/vids/v17.mp4"
    by_prefix = PathRemap("/local/vids", None, "/home/author/data")
    assert by_prefix.resolve(foreign) == "/local/vids/PerceptionTest/videos/v17.mp4"
    # trailing slash on the prefix, and a path outside the prefix falls back to the basename
    assert (
        PathRemap("/l", None, "/home/author/data/").resolve(foreign)
        == "/l/PerceptionTest/videos/v17.mp4"
    )
    assert by_prefix.resolve("/other/place/v1.mp4") == "/local/vids/v1.mp4"
    assert by_prefix.resolve("/home/author/database/v1.mp4") == "/local/vids/v1.mp4"
    # image kind uses image_root; video root does not apply to images
    remap = PathRemap("/local/vids", "/local/imgs", None)
    assert remap.resolve("/x/frame.png", kind="image") == "/local/imgs/frame.png"
    assert PathRemap("/local/vids", None, None).resolve("/x/f.png", kind="image") == "/x/f.png"
    # relative paths without a root are relative to the annotation file's directory
    assert PathRemap(None, None, None).resolve("clips/a.mp4", base_dir="/ann") == "/ann/clips/a.mp4"
    # Windows-style foreign path
    assert PathRemap("/v", None, None).resolve("C:\\data\\clip.mp4") == "/v/clip.mp4"


def test_remap_applied_by_loader(tmp_path: Path) -> None:
    path = write_json(tmp_path / "t.json", videor1_records())
    remap = PathRemap(str(tmp_path / "vids"), None, "/home/author/data")
    items, _ = load_annotations(path, remap=remap, check_files=False)
    assert items[0].video == str(tmp_path / "vids" / "PerceptionTest" / "videos" / "v17.mp4")


def test_relative_paths_resolved_against_annotation_dir(tmp_path: Path) -> None:
    rec = videor1_records()[0] | {"path": "clips/v17.mp4"}
    touch(tmp_path / "clips" / "v17.mp4")
    (qa,), report = load_annotations(write_json(tmp_path / "r.json", [rec]))
    assert qa.video == str(tmp_path / "clips" / "v17.mp4")
    assert report.problems == [] and missing_media(qa) == []


def test_missing_video_reported_with_file_and_line(tmp_path: Path) -> None:
    records = videor1_records()
    vids = tmp_path / "vids"
    touch(vids / "v17.mp4")
    touch(vids / "v19.mp4")
    path = write_jsonl(tmp_path / "eval.jsonl", records)
    items, report = load_annotations(path, remap=PathRemap(str(vids), None, None))
    assert len(items) == 3  # the record with the missing file is still returned
    missing = str(vids / "v18.mp4")
    assert report.problems == [f"{path}:2: video not found: {missing}"]
    assert missing_media(items[1]) == [missing]
    assert missing_media(items[0]) == []


def test_missing_image_reported(tmp_path: Path) -> None:
    touch(tmp_path / "videos" / "EpicKitchens" / "P01_11_clip3.mp4")
    path = write_json(tmp_path / "seed.json", [seed_eval_record()])
    (qa,), report = load_annotations(path)
    assert len(report.problems) == 1
    assert report.problems[0].startswith(f"{path}[0]: image not found: ")
    assert missing_media(qa) == [str(tmp_path / "images" / "EpicKitchens" / "P01_11_frame120.png")]


# ------------------------------------------------------------------------------------------
# malformed records: file name, line/index and field in every message


def _without(rec: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if k != key}


MALFORMED: list[tuple[str, dict[str, Any], str]] = [
    ("missing_problem", _without(videor1_records()[0], "problem"), "problem"),
    (
        "unknown_problem_type",
        videor1_records()[0] | {"problem_type": "multiple-choice"},
        "problem_type",
    ),
    ("mc_without_options", videor1_records()[0] | {"options": []}, "options"),
    ("mc_options_missing", _without(videor1_records()[0], "options"), "options"),
    (
        "mc_options_not_lettered",
        videor1_records()[0] | {"options": ["A. x", "C. y", "B. z"]},
        "options",
    ),
    ("bad_solution_tag", videor1_records()[0] | {"solution": "C"}, "solution"),
    (
        "solution_letter_out_of_range",
        videor1_records()[0] | {"solution": "<answer>F</answer>"},
        "solution",
    ),
    (
        "numerical_not_number",
        videor1_records()[1] | {"solution": "<answer>three</answer>"},
        "solution",
    ),
    ("missing_path", _without(videor1_records()[0], "path"), "path"),
    ("bad_time_spans", videor1_records()[2] | {"time_spans": [[3.0, 1.0]]}, "time_spans"),
    ("bad_golden_choice_idx", seed_eval_record(golden="E"), "golden_choice_idx"),
    ("golden_choice_idx_out_of_range", seed_eval_record(golden=7), "golden_choice_idx"),
    ("seed_no_negatives", seed_train_record() | {"negative_answers": []}, "negative_answers"),
    ("seed_missing_task_goal", _without(seed_train_record(), "task_goal"), "task_goal"),
    ("nextgqa_bad_answer", nextgqa_records()[0] | {"answer": "5"}, "answer"),
    ("nextgqa_missing_video", _without(nextgqa_records()[0], "video_path"), "video_path"),
]


@pytest.mark.parametrize(
    ("bad", "field"), [(b, f) for _, b, f in MALFORMED], ids=[n for n, _, _ in MALFORMED]
)
def test_malformed_record_jsonl_names_file_line_field(
    tmp_path: Path, bad: dict[str, Any], field: str
) -> None:
    good = videor1_records()[1]
    path = write_jsonl(tmp_path / "broken_file.jsonl", [good, good, bad])
    with pytest.raises(DataError) as info:
        load_annotations(path, check_files=False)
    message = str(info.value)
    assert "broken_file.jsonl:3:" in message
    assert f"'{field}'" in message


@pytest.mark.parametrize(
    ("bad", "field"), [(b, f) for _, b, f in MALFORMED], ids=[n for n, _, _ in MALFORMED]
)
def test_malformed_record_json_list_names_file_index_field(
    tmp_path: Path, bad: dict[str, Any], field: str
) -> None:
    good = videor1_records()[1]
    path = write_json(tmp_path / "broken_list.json", [good, bad])
    with pytest.raises(DataError) as info:
        load_annotations(path, check_files=False)
    message = str(info.value)
    assert "broken_list.json[1]:" in message
    assert f"'{field}'" in message


def test_invalid_json_line(tmp_path: Path) -> None:
    path = tmp_path / "bad_syntax.jsonl"
    good = json.dumps(videor1_records()[1])
    path.write_text(f'{good}\n{good}\n{{"problem_id": 3, "problem": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad_syntax\.jsonl:3: invalid JSON"):
        read_records(path)
    with pytest.raises(DataError, match=r"bad_syntax\.jsonl:3: invalid JSON"):
        load_annotations(path)


def test_invalid_json_list(tmp_path: Path) -> None:
    path = tmp_path / "bad_list.json"
    path.write_text('[\n  {"problem_id": 1},\n  {"problem_id": 2,,}\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad_list\.json:3: invalid JSON"):
        read_records(path)


def test_non_object_entries(tmp_path: Path) -> None:
    listed = write_json(tmp_path / "objs.json", [videor1_records()[1], ["not", "a", "dict"]])
    with pytest.raises(DataError, match=r"objs\.json\[1\]: record must be a JSON object"):
        read_records(listed)
    lines = write_jsonl(tmp_path / "objs.jsonl", [videor1_records()[1], 42])
    with pytest.raises(DataError, match=r"objs\.jsonl:2: record must be a JSON object"):
        read_records(lines)


def test_adapter_error_uses_where() -> None:
    rec = _without(videor1_records()[0], "problem")
    with pytest.raises(DataError, match=r"^anno\.json:12: field 'problem' is missing"):
        from_videor1(rec, "anno.json:12", PathRemap(None, None, None), None)


# ------------------------------------------------------------------------------------------
# format detection


def test_detect_format() -> None:
    assert detect_format(videor1_records()[0]) == "videor1"
    assert detect_format(nextgqa_records()[0]) == "nextgqa"
    assert detect_format(seed_train_record()) == "seedbench_r1"
    assert detect_format(seed_eval_record()) == "seedbench_r1"
    assert detect_format(VideoQA("1", "q", "numerical", "2", "/v.mp4").to_json()) == "videor1"
    with pytest.raises(DataError) as info:
        detect_format({"foo": 1, "bar": 2}, "x.json:4")
    message = str(info.value)
    assert message.startswith("x.json:4:")
    for key in ("problem", "qid", "task_goal", "negative_answers", "golden_choice_idx"):
        assert key in message


def test_auto_detection_mixed_file_and_unknown(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [videor1_records()[0], nextgqa_records()[0], seed_eval_record()],
    )
    items, _ = load_annotations(path, check_files=False)
    assert [qa.dataset_name for qa in items] == ["perception_test", "nextqa", "seed_bench_r1"]
    bad = write_jsonl(tmp_path / "unknown.jsonl", [videor1_records()[0], {"id": 1}])
    with pytest.raises(DataError, match=r"unknown\.jsonl:2: unknown record format"):
        load_annotations(bad, check_files=False)


def test_explicit_format_and_bad_fmt(tmp_path: Path) -> None:
    path = write_json(tmp_path / "n.json", nextgqa_records())
    items, _ = load_annotations(path, fmt="nextgqa", check_files=False)
    assert items[0].answer == "D"
    with pytest.raises(DataError, match=r"n\.json\[0\]: field 'problem_id' is missing"):
        load_annotations(path, fmt="videor1", check_files=False)
    with pytest.raises(ValueError, match="fmt"):
        load_annotations(path, fmt="csv", check_files=False)


def test_nextgqa_adapter_direct() -> None:
    qa = from_nextgqa(nextgqa_records()[0], "g.json:1", PathRemap("/nq", None, None), None)
    assert qa.video == "/nq/4010069381.mp4"
    assert qa.answer == "D"
