"""Real annotation files as they ship (issue 17): each fixture is written here in the exact field
layout of the public release (our own records and tiny media), then loaded, prompted and scored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from appo.data.formats import PathRemap, load_annotations, read_records
from appo.data.prompts import question_text
from appo.data.schema import DataError
from appo.io import atomic_write_video


def write_json(path: Path, data: Any, indent: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent), encoding="utf-8")
    return path


def write_video(path: Path, seed: int = 0, n: int = 8, size: int = 56) -> Path:
    rng = np.random.default_rng(seed)
    atomic_write_video(path, rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8), 4.0)
    return path


def write_png(path: Path, value: int = 128, size: int = 56) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)
    return path


# ------------------------------------------------------------------------------------------
# Video-R1-260k


def videor1_260k_records() -> list[dict[str, Any]]:
    """Video-R1-260k layout: both option styles occur in the release, image and video records."""
    return [
        {"problem_id": 1, "problem": "What is the man holding?", "data_type": "video",
         "problem_type": "multiple choice",
         "options": ["A) a cup", "B) a phone", "C) a book", "D) a bag"],
         "solution": "<answer>B</answer>", "path": "./Video-R1-data/LLaVA-Video-178K/a.mp4",
         "data_source": "LLaVA-Video-178K/2_3_m_academic_v0_1"},
        {"problem_id": 2, "problem": "Which shape is red?", "data_type": "image",
         "problem_type": "multiple choice",
         "options": ["A. circle", "B. square", "C. star"],
         "solution": "<answer>A</answer>", "path": "./Video-R1-data/CLEVR/img1.png",
         "data_source": "CLEVR-Math"},
    ]


def test_videor1_options_in_both_letter_styles(tmp_path: Path) -> None:
    path = write_json(tmp_path / "Video-R1-260k.json", videor1_260k_records())
    (video, image), _ = load_annotations(path, check_files=False)
    assert video.options == ("A. a cup", "B. a phone", "C. a book", "D. a bag")
    assert video.answer == "B"
    assert image.options == ("A. circle", "B. square", "C. star")
    assert "Options: A. a cup B. a phone C. a book D. a bag" in question_text(video)


def test_videor1_option_letter_out_of_order_still_fails(tmp_path: Path) -> None:
    bad = videor1_260k_records()[0] | {"options": ["A) x", "C) y"]}
    with pytest.raises(DataError, match=r"\[0\]: field 'options' item 1 must start with 'B\.' "
                                        r"or 'B\)'"):
        load_annotations(write_json(tmp_path / "bad.json", [bad]), check_files=False)


def test_videor1_relative_paths_keep_their_folders_under_a_root() -> None:
    remap = PathRemap("/data/Video-R1")
    assert remap.resolve("./Evaluation/MVBench/video/x.mp4") == \
        "/data/Video-R1/Evaluation/MVBench/video/x.mp4"
    assert remap.resolve("/home/author/Evaluation/x.mp4") == "/data/Video-R1/x.mp4"


# ------------------------------------------------------------------------------------------
# NExT-GQA


def appo_nextgqa_records() -> list[dict[str, Any]]:
    """APPO's nextgqa_val_3k3.json layout: qid unique only within a video, name "nextqa"."""
    common = {"options": ["to eat it", "to throw it", "to hide it", "to give it away", "to sit"],
              "frame_count": "900", "width": "640", "height": "480", "split": "val",
              "dataset_name": "nextqa", "duration": 30.0}
    return [
        {"qid": "6", "question": "why did the boy pick up the ball",
         "video_path": "/mnt/nextqa/videos/1025/4010069381.mp4", "answer": "3", "qtype": "CW",
         "time_clues": [[2.0, 5.5]], **common},
        {"qid": "6", "question": "why did the girl laugh",
         "video_path": "/mnt/nextqa/videos/1106/5333075105.mp4", "answer": "1", "qtype": "CW",
         "time_clues": [[1.0, 3.0]], **common},
    ]


def test_nextgqa_ids_are_unique_across_videos(tmp_path: Path) -> None:
    path = write_json(tmp_path / "nextgqa_val_3k3.json", appo_nextgqa_records())
    records, _ = load_annotations(path, check_files=False)
    assert [qa.problem_id for qa in records] == ["4010069381_6", "5333075105_6"]


def test_grounding_prompt_follows_time_clues_not_the_dataset_name(tmp_path: Path) -> None:
    path = write_json(tmp_path / "nextgqa_val_3k3.json", appo_nextgqa_records())
    qa = load_annotations(path, check_files=False)[0][0]
    assert qa.dataset_name == "nextqa"
    text = question_text(qa)
    assert "The video lasts 30.0 seconds." in text and "<time>s to e</time>" in text


NEXTGQA_CSV = """video_id,frame_count,width,height,question,answer,qid,type,a0,a1,a2,a3,a4
2574374895,719,320,240,what did the baby do after throwing the cup away,lay on floor,8,TN,\
clap proudly,the lady sitting down,lay on floor,just picked it up,crawl
3083302557,1420,640,480,what did the lady do while turning back,thumbs up,3,TC,walk away,\
thumbs up,put down her club,"applying cream, on face",caressing for the dog
"""


def write_nextgqa_release(folder: Path, videos: bool = True) -> Path:
    """test.csv + gsub_test.json + map_vid_vidorID.json as NExT-GQA ships them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "test.csv").write_text(NEXTGQA_CSV, encoding="utf-8")
    write_json(folder / "gsub_test.json", {
        "2574374895": {"duration": 24.0, "location": {"8": [[18.2, 23.9]]}, "fps": 29.97},
        "3083302557": {"duration": 47.4, "location": {"3": [[1.2, 5.8], [20.0, 23.5]]},
                       "fps": 29.97},
    })
    write_json(folder / "map_vid_vidorID.json",
               {"2574374895": "0000/2574374895", "3083302557": "1019/3083302557"})
    if videos:
        write_video(folder / "videos" / "0000" / "2574374895.mp4", 1)
        write_video(folder / "videos" / "1019" / "3083302557.mp4", 2)
    return folder / "test.csv"


def test_nextgqa_official_csv_release(tmp_path: Path) -> None:
    path = write_nextgqa_release(tmp_path / "nextgqa")
    records, report = load_annotations(path, PathRemap(str(tmp_path / "nextgqa" / "videos")))
    assert report.problems == []
    first, second = records
    assert first.problem_id == "2574374895_8" and second.problem_id == "3083302557_3"
    assert first.answer == "C" and first.options[2] == "C. lay on floor"
    assert second.answer == "B" and second.options[3] == "D. applying cream, on face"
    assert first.time_spans == ((18.2, 23.9),)
    assert second.time_spans == ((1.2, 5.8), (20.0, 23.5))
    assert first.duration == 24.0 and first.family == "TN"
    assert first.video == str(tmp_path / "nextgqa" / "videos" / "0000" / "2574374895.mp4")
    assert "<time>" in question_text(first)


def test_nextgqa_csv_needs_its_companion_files(tmp_path: Path) -> None:
    path = write_nextgqa_release(tmp_path / "n", videos=False)
    (tmp_path / "n" / "gsub_test.json").unlink()
    with pytest.raises(DataError, match=r"test\.csv: NExT-GQA CSV needs gsub_test\.json"):
        load_annotations(path)


def test_nextgqa_csv_answer_must_be_an_option(tmp_path: Path) -> None:
    path = write_nextgqa_release(tmp_path / "n", videos=False)
    path.write_text(NEXTGQA_CSV.replace(",lay on floor,8,", ",sleep,8,"), encoding="utf-8")
    with pytest.raises(DataError, match=r"test\.csv:2: field 'answer' 'sleep' is not one of"):
        load_annotations(path)


# ------------------------------------------------------------------------------------------
# bad inputs: one line naming the file and the real problem


def test_top_level_object_is_named(tmp_path: Path) -> None:
    path = write_json(tmp_path / "wrapped.json", {"data": videor1_260k_records()}, indent=2)
    with pytest.raises(DataError, match=r"wrapped\.json: top-level JSON object \(keys: data\), "
                                        r"expected a list of records"):
        load_annotations(path)
    one_line = write_json(tmp_path / "wrapped1.json", {"data": videor1_260k_records()})
    with pytest.raises(DataError, match="top-level JSON object"):
        read_records(one_line)


def test_a_single_pretty_printed_record_still_loads(tmp_path: Path) -> None:
    path = write_json(tmp_path / "one.json", videor1_260k_records()[0], indent=2)
    (qa,), _ = load_annotations(path, check_files=False)
    assert qa.problem_id == "1"


def test_other_csv_is_named(tmp_path: Path) -> None:
    path = tmp_path / "qa.csv"
    path.write_text("id,question,answer\n1,what,yes\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"qa\.csv: CSV: only NExT-GQA's CSV .* is supported; "
                                        r"this header lacks video_id"):
        load_annotations(path)
    with pytest.raises(DataError, match=r"qa\.csv: CSV: only NExT-GQA's CSV"):
        read_records(path)


# ------------------------------------------------------------------------------------------
# VideoMMMU-style data_source URLs become valid MLflow metric keys


def test_url_family_names_log_to_mlflow(tmp_path: Path, monkeypatch) -> None:
    from appo.eval.metrics import aggregate, score_prediction
    from appo.stages.eval import _flat_metrics
    from appo.tracking import RunLogger

    record = {"problem_id": 1, "problem": "Which law applies?", "data_type": "video",
              "problem_type": "multiple choice", "options": ["A. Ohm", "B. Hooke"],
              "solution": "<answer>A</answer>", "path": "./Evaluation/VideoMMMU/Art/a.mp4",
              "data_source": "https://videommmu.github.io/", "dataset_name": "videommmu"}
    (qa,), _ = load_annotations(write_json(tmp_path / "videommmu.json", [record]),
                                check_files=False)
    row = {"benchmark": "videommmu", "family": qa.family, "problem_type": qa.problem_type,
           "missing": False, **score_prediction(qa, "<answer>A</answer>")}
    metrics = aggregate([row])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with RunLogger(tmp_path / "out", "eval-url", mlflow=True) as logger:
        logger.log_metrics(_flat_metrics(metrics), step=0)
    logged = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[-1])
    assert logged["family/https_/videommmu.github.io/accuracy"] == 1.0
    assert logged["bench/videommmu/accuracy"] == 1.0


def test_numerical_answers_follow_video_r1_scoring(tmp_path: Path) -> None:
    from appo.eval.metrics import score_prediction

    record = {"problem_id": 7, "problem": "How many chairs are in the room?", "data_type": "video",
              "problem_type": "numerical", "options": [], "solution": "<answer>4</answer>",
              "path": "./Evaluation/VSI-Bench/scannet/scene0011_00.mp4",
              "data_source": "VSI-Bench/object_counting"}
    (qa,), _ = load_annotations(write_json(tmp_path / "eval_vsibench.json", [record]),
                                check_files=False)
    assert score_prediction(qa, "<think>..</think><answer>4</answer>")["correct"] is True
    assert score_prediction(qa, "<think>..</think><answer>4.0</answer>")["correct"] is False


# ------------------------------------------------------------------------------------------
# per-file roots (data.files / eval.benchmarks entries) and files with no usable video


def seed_eval_lines() -> list[dict[str, Any]]:
    """SEED-Bench-R1 validation_L1.jsonl layout (evaluation form)."""
    return [{"sample_id": "L1_0", "video_id": "P01_11", "task_goal": "make tea",
             "question": "What is the next action?", "choice_a": "boil water",
             "choice_b": "cut onion", "choice_c": "wash cup", "choice_d": "open fridge",
             "golden_choice_idx": "A",
             "task_progress_metadata": [{"narration_text": "fill kettle", "start_frame": 0,
                                         "stop_frame": 4}],
             "video_source": "EpicKitchens", "video_basename": "P01_11_0.mp4",
             "current_observation_basename": "P01_11_0.png", "duration": 2.0,
             "dataset_name": "seed_bench_r1"}]


def write_two_layouts(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """A Video-R1 eval file (./Evaluation/... paths) and a SEED-Bench-R1 file, separate roots."""
    vr1_root, seed_root = tmp_path / "Video-R1", tmp_path / "seed_bench_r1"
    write_video(vr1_root / "Evaluation" / "MVBench" / "video" / "clip.mp4", 3)
    write_video(seed_root / "videos" / "EpicKitchens" / "P01_11_0.mp4", 4)
    write_png(seed_root / "images" / "EpicKitchens" / "P01_11_0.png")
    vr1 = write_json(tmp_path / "ann" / "eval_mvbench.json", [
        {"problem_id": 1, "problem": "What happens?", "data_type": "video",
         "problem_type": "multiple choice", "options": ["A. a", "B. b"],
         "solution": "<answer>A</answer>", "path": "./Evaluation/MVBench/video/clip.mp4",
         "data_source": "MVBench/action_sequence"}])
    seed = tmp_path / "ann" / "validation_L1.jsonl"
    seed.write_text("".join(json.dumps(r) + "\n" for r in seed_eval_lines()), encoding="utf-8")
    return vr1, vr1_root, seed, seed_root


def test_per_file_roots_in_data_files(tmp_path: Path) -> None:
    from appo.config import DataConfig, from_dict
    from appo.stages.data import run

    vr1, vr1_root, seed, seed_root = write_two_layouts(tmp_path)
    cfg = from_dict(DataConfig, {
        "source": "files", "out_dir": str(tmp_path / "dataset"),
        "video_root": str(vr1_root),
        "files": {"rl": str(vr1), "test": {"path": str(seed), "video_root": str(seed_root)}},
    }, "data")
    assert run(cfg) == {"rl": 1, "test": 1}
    rl = json.loads((tmp_path / "dataset" / "rl.json").read_text())
    test = json.loads((tmp_path / "dataset" / "test.json").read_text())
    assert Path(rl[0]["path"]).is_file() and Path(test[0]["path"]).is_file()
    assert Path(test[0]["image"]).is_file()


def test_file_entry_with_an_unknown_key_is_named() -> None:
    from appo.config import ConfigError, EvalConfig, from_dict

    with pytest.raises(ConfigError, match=r"unknown key 'eval\.benchmarks\.l1\.videoroot'"):
        from_dict(EvalConfig, {"benchmarks": {"l1": {"path": "x.jsonl", "videoroot": "/v"}}},
                  "eval")
    with pytest.raises(ConfigError, match=r"eval\.benchmarks\.l1: 'path' is missing"):
        from_dict(EvalConfig, {"benchmarks": {"l1": {"video_root": "/v"}}}, "eval")


def test_per_file_roots_in_eval_benchmarks(tmp_path: Path) -> None:
    from appo.config import EvalConfig, FramesConfig, from_dict
    from appo.stages.eval import load_benchmarks

    vr1, vr1_root, seed, seed_root = write_two_layouts(tmp_path)
    cfg = from_dict(EvalConfig, {
        "splits": [], "video_root": str(vr1_root),
        "benchmarks": {"mvbench": str(vr1),
                       "seed_l1": {"path": str(seed), "video_root": str(seed_root)}},
    }, "eval")
    frames = FramesConfig(num_frames=4, max_pixels=56 * 56, workers=1)
    loaded = load_benchmarks(None, frames, cfg, tmp_path / "out")
    assert [(name, len(records), problems) for name, records, _, problems in loaded] == \
        [("mvbench", 1, []), ("seed_l1", 1, [])]
    for _, records, store, _ in loaded:
        assert all(qa.video in store for qa in records)


def test_no_usable_video_fails_naming_file_and_first_missing_path(tmp_path: Path) -> None:
    from appo.config import DataConfig, EvalConfig, FramesConfig
    from appo.stages.data import run
    from appo.stages.eval import load_benchmarks

    vr1, _, _, _ = write_two_layouts(tmp_path)
    wrong = str(tmp_path / "wrong_root")
    expected = (rf"eval_mvbench\.json: none of its 1 records has its media on this machine "
                rf"\(first missing: {wrong}/Evaluation/MVBench/video/clip\.mp4\)")
    with pytest.raises(DataError, match=expected):
        run(DataConfig(source="files", out_dir=str(tmp_path / "d"), files={"rl": str(vr1)},
                       video_root=wrong))
    with pytest.raises(DataError, match=expected):
        load_benchmarks(None, FramesConfig(), EvalConfig(splits=[], benchmarks={"b": str(vr1)},
                                                         video_root=wrong), tmp_path / "out")


def test_eval_benchmark_with_no_decodable_video_fails(tmp_path: Path) -> None:
    from appo.config import EvalConfig, FramesConfig
    from appo.data.frames import FrameError
    from appo.stages.eval import load_benchmarks

    vr1, vr1_root, _, _ = write_two_layouts(tmp_path)
    (vr1_root / "Evaluation" / "MVBench" / "video" / "clip.mp4").write_bytes(b"not a video")
    cfg = EvalConfig(splits=[], benchmarks={"b": str(vr1)}, video_root=str(vr1_root))
    with pytest.raises(FrameError, match=r"eval_mvbench\.json: no usable video among 1 "
                                         r"\(first problem: .*clip\.mp4: unreadable video"):
        load_benchmarks(None, FramesConfig(), cfg, tmp_path / "out")


# ------------------------------------------------------------------------------------------
# image records: cached by the frames stage, prompted as images, evaluated next to videos


def write_mixed_videor1(tmp_path: Path) -> Path:
    """A Video-R1-260k-style file mixing image and video records, media at their paths."""
    root = tmp_path / "Video-R1"
    write_video(root / "Video-R1-data" / "LLaVA-Video-178K" / "a.mp4", 5)
    write_png(root / "Video-R1-data" / "CLEVR" / "img1.png", 200, size=84)
    records = videor1_260k_records()
    records.append({"problem_id": 3, "problem": "How many cubes?", "data_type": "image",
                    "problem_type": "numerical", "options": [], "solution": "<answer>2</answer>",
                    "path": "./Video-R1-data/CLEVR/img1.png", "data_source": "CLEVR-Math",
                    "process": "<think>Two cubes.</think>"})
    return write_json(root / "Video-R1-260k.json", records)


def test_seedbench_empty_progress_is_image_only(tmp_path: Path) -> None:
    lines = seed_eval_lines() + [seed_eval_lines()[0] | {"sample_id": "L1_1",
                                                          "task_progress_metadata": []}]
    path = tmp_path / "validation_L1.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    (with_video, image_only), _ = load_annotations(path, PathRemap("/seed"), check_files=False)
    assert with_video.data_type == "video+image"
    assert with_video.video_file == "/seed/videos/EpicKitchens/P01_11_0.mp4"
    assert image_only.data_type == "image" and image_only.video_file is None
    assert image_only.image_file == "/seed/images/EpicKitchens/P01_11_0.png"


def test_image_records_are_cached_and_prompted_as_images(tmp_path: Path) -> None:
    from appo.config import FramesConfig
    from appo.data.frames import FrameStore, extract_records
    from appo.data.prompts import messages

    records, report = load_annotations(write_mixed_videor1(tmp_path))
    assert report.problems == []
    cfg = FramesConfig(num_frames=4, max_pixels=56 * 56, workers=1)
    manifest = extract_records(records, tmp_path / "frames", cfg)
    assert sorted(manifest["kind"]) == ["image", "video"]  # img1.png is cached once
    store = FrameStore(tmp_path / "frames")
    video, image, numeric = records
    assert store.get(video.video).frames.shape == (4, 56, 56, 3)
    cached = store.image(image.video)
    assert cached.shape == (56, 56, 3) and int(cached.mean()) == 200  # 84x84 fit to 56x56
    kinds = [[c["type"] for c in messages(qa)[1]["content"]] for qa in records]
    assert kinds == [["video", "text"], ["image", "text"], ["image", "text"]]


def test_mixed_image_and_video_file_is_evaluated(tmp_path: Path, tiny_policy) -> None:
    from appo.config import FramesConfig
    from appo.data.frames import FrameStore, extract_records
    from appo.eval.runner import evaluate

    records, _ = load_annotations(write_mixed_videor1(tmp_path))
    seed_lines = [seed_eval_lines()[0] | {"sample_id": "L1_1", "task_progress_metadata": []}]
    seed = tmp_path / "seed" / "validation_L1.jsonl"
    write_png(seed.parent / "images" / "EpicKitchens" / "P01_11_0.png", 60)
    seed.write_text(json.dumps(seed_lines[0]) + "\n", encoding="utf-8")
    records += load_annotations(seed)[0]
    extract_records(records, tmp_path / "frames", FramesConfig(num_frames=4, workers=1))
    model, processor = tiny_policy
    rows, report = evaluate(model, processor, records, FrameStore(tmp_path / "frames"),
                            batch_size=4, max_new_tokens=4, progress=False)
    assert report["missing"] == [] and len(rows) == 4
    assert all(isinstance(r["response"], str) for r in rows)


@pytest.mark.parametrize("attention", ["policy", "random"])
def test_mixed_image_and_video_file_trains_with_appo(tmp_path: Path, tiny_policy,
                                                     attention: str) -> None:
    """Video-R1-260k mixes image and video records: one RL run trains on both, APPO's frame
    attention included (an image is a single frame)."""
    import copy

    import torch

    from appo.config import AlgorithmConfig, FramesConfig, PerceptionConfig, RLConfig
    from appo.data.frames import FrameStore, extract_records
    from appo.rl.trainer import RLTrainer

    records, _ = load_annotations(write_mixed_videor1(tmp_path))
    extract_records(records, tmp_path / "frames", FramesConfig(num_frames=4, workers=1))
    model, processor = tiny_policy
    model = copy.deepcopy(model)
    appo = AlgorithmConfig(clip_high=0.28, agg_mode="token-mean", beta=0.0,
                           perception=PerceptionConfig(enabled=True, K=4, k_avg=4,
                                                       attention=attention))
    cfg = RLConfig(prompts_per_step=3, num_generations=2, max_new_tokens=8, lr=1e-3,
                   groups_per_micro_batch=3)

    def reward(texts, recs):
        vals = [sum(c.isdigit() for c in t) / max(1, len(t)) + 0.1 * (i % 2)
                for i, t in enumerate(texts)]
        return {"total": vals, "accuracy": vals}

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = RLTrainer(model, processor, cfg, appo, records, FrameStore(tmp_path / "frames"),
                        reward_fn=reward)
    metrics = trainer.train_step()
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), metrics
    assert metrics["appo/num_crucial_frames"] >= 1
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


# ------------------------------------------------------------------------------------------
# evaluation protocols


def _qa(problem_type: str, answer: str, options: tuple[str, ...] = ()):
    from appo.data.schema import VideoQA

    return VideoQA(problem_id="1", problem="q", problem_type=problem_type, answer=answer,
                   video="v.mp4", options=options)


@pytest.mark.parametrize(("problem_type", "gold", "response", "videor1", "pipeline"), [
    ("multiple choice", "C", "<answer>C</answer>", 1.0, 1.0),
    ("multiple choice", "C", "<answer>(C)</answer>", 0.0, 1.0),  # Video-R1: exact letter
    ("multiple choice", "C", "<answer>B</answer> no, <answer>C</answer>", 0.0, 1.0),  # first tag
    ("multiple choice", "C", "C", 1.0, 0.0),  # no tag: Video-R1 scores the whole output
    ("numerical", "4", "<answer>4.0</answer>", 0.0, 0.0),
    ("numerical", "3", "<answer>3 cups</answer>", 0.0, 1.0),
    ("numerical", "1,234", "<answer>1,234</answer>", 1.0, 1.0),
    ("regression", "10", "<answer>7.2</answer>", 0.5, 0.5),
    ("OCR", "hello world", "<answer>Hello world</answer>", 0.5, 1.0),  # case-sensitive WER
    ("free-form", "the cat sat", "<answer>The cat sat.</answer>", 1.0, 1.0),
])
def test_videor1_scoring_next_to_the_pipeline_rules(problem_type, gold, response, videor1,
                                                    pipeline) -> None:
    from appo.eval.metrics import score_prediction

    qa = _qa(problem_type, gold, ("A. x", "B. y", "C. z") if problem_type == "multiple choice"
             else ())
    assert score_prediction(qa, response, "videor1")["reward"] == pytest.approx(videor1)
    assert score_prediction(qa, response)["reward"] == pytest.approx(pipeline)


def test_videor1_free_form_is_the_mean_of_rouge_1_2_l() -> None:
    from appo.eval.protocol import videor1_rouge

    # 1-grams: 2 of 3 match; 2-grams: 1 of 2; LCS 2 -> (2/3 + 1/2 + 2/3) / 3
    assert videor1_rouge("a cat sat", "the cat sat") == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)


def test_protocol_knob_sets_pixels_and_decoding(tmp_path: Path, tiny_policy) -> None:
    from appo.config import ConfigError, EvalConfig, FramesConfig
    from appo.eval.protocol import PROTOCOLS
    from appo.eval.runner import evaluate
    from appo.stages.eval import check_config, load_benchmarks

    with pytest.raises(ConfigError, match=r"'eval\.protocol' must be one of pipeline, videor1, "
                                          r"appo, got 'video-r1'"):
        check_config(EvalConfig(protocol="video-r1"))
    write_video(tmp_path / "Evaluation" / "clip.mp4", 6, size=112)
    ann = write_json(tmp_path / "eval_mvbench.json", [
        {"problem_id": 1, "problem": "What happens?", "data_type": "video",
         "problem_type": "multiple choice", "options": ["A. a", "B. b"],
         "solution": "<answer>A</answer>", "path": "./Evaluation/clip.mp4"}])
    frames = FramesConfig(num_frames=4, workers=1)  # 56*56 pixels per frame by default
    sizes = {}
    for protocol in ("pipeline", "videor1"):
        cfg = EvalConfig(splits=[], benchmarks={"mv": str(ann)}, protocol=protocol)
        (_, records, store, _), = load_benchmarks(None, frames, cfg, tmp_path / protocol)
        sizes[protocol] = store.get(records[0].video).frames.shape[1:3]
        model, processor = tiny_policy
        rows, _ = evaluate(model, processor, records, store, max_new_tokens=4, progress=False,
                           protocol=PROTOCOLS[protocol])
        assert isinstance(rows[0]["response"], str)
    assert sizes == {"pipeline": (56, 56), "videor1": (112, 112)}


# ------------------------------------------------------------------------------------------
# every format through the eval stage in one config


def every_format_benchmarks(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """One fixture of every public format as ``eval.benchmarks`` entries, and the mixed
    image+video Video-R1 file (which is also one of them)."""
    vr1, vr1_root, seed, seed_root = write_two_layouts(tmp_path)
    with seed.open("a", encoding="utf-8") as f:  # an image-only SEED-Bench-R1 line
        f.write(json.dumps(seed_eval_lines()[0] | {"sample_id": "L1_1",
                                                    "task_progress_metadata": []}) + "\n")
    csv_path = write_nextgqa_release(tmp_path / "nextgqa")
    gqa_json = write_json(tmp_path / "ann" / "nextgqa_val_3k3.json", [
        appo_nextgqa_records()[0] | {"video_path": "/mnt/nextqa/0000/2574374895.mp4"}])
    mixed = write_mixed_videor1(tmp_path)
    videos = str(tmp_path / "nextgqa" / "videos")
    return mixed, {
        "mvbench": {"path": str(vr1), "video_root": str(vr1_root)},
        "seed_l1": {"path": str(seed), "video_root": str(seed_root)},
        "nextgqa_csv": {"path": str(csv_path), "video_root": videos},
        "nextgqa_json": {"path": str(gqa_json), "video_root": videos,
                         "strip_prefix": "/mnt/nextqa"},
        "videor1_mixed": str(mixed),
    }


#: questions per benchmark of :func:`every_format_benchmarks`
EVERY_FORMAT_COUNTS = {"mvbench": 1, "seed_l1": 2, "nextgqa_csv": 2, "nextgqa_json": 1,
                       "videor1_mixed": 3}


def test_every_format_through_the_eval_stage(tmp_path: Path, tiny_policy, monkeypatch) -> None:
    from appo.config import DataConfig, EvalConfig, FramesConfig, ModelConfig, from_dict
    from appo.stages.eval import run

    monkeypatch.setenv("APPO_MLFLOW", "0")
    _, benchmarks = every_format_benchmarks(tmp_path)
    cfg = from_dict(EvalConfig, {"splits": [], "batch_size": 4, "max_new_tokens": 4,
                                 "perception_layers": [], "benchmarks": benchmarks}, "eval")
    metrics = run("tiny", "all", DataConfig(), FramesConfig(num_frames=4, workers=1),
                  ModelConfig(), cfg, tmp_path / "out", model_and_processor=tiny_policy)
    assert {name: stats["n"] for name, stats in metrics["benchmarks"].items()} == \
        EVERY_FORMAT_COUNTS
    assert metrics["missing"] == []
    assert "mIoU" in metrics["benchmarks"]["nextgqa_csv"]
    assert "mIoU" in metrics["benchmarks"]["nextgqa_json"]
