import json

import numpy as np
import pytest

from appo.config import FramesConfig
from appo.data.frames import FrameError, FrameStore, extract_all, extract_video, sample_indices
from appo.io import atomic_write_video


def _ramp_video(path, n=16, fps=4.0, size=56):
    frames = np.zeros((n, size, size, 3), np.uint8)
    for t in range(n):
        frames[t] = 10 + 15 * t  # each frame a distinct flat grey level
    atomic_write_video(path, frames, fps)
    return frames


def test_sample_indices_are_segment_centres():
    cfg = FramesConfig(num_frames=8)
    assert sample_indices(16, 4.0, cfg).tolist() == [1, 3, 5, 7, 9, 11, 13, 15]
    assert sample_indices(10, 5.0, FramesConfig(fps=1.0, max_frames=16)).tolist() == [2, 7]
    with pytest.raises(FrameError, match="fewer than the 8 requested"):
        sample_indices(5, 4.0, cfg)


def test_extraction_returns_written_frames_and_timestamps(tmp_path):
    written = _ramp_video(tmp_path / "v.mp4")
    frames, meta = extract_video(tmp_path / "v.mp4", FramesConfig(num_frames=8))
    assert frames.shape == (8, 56, 56, 3) and frames.dtype == np.uint8
    assert meta["indices"] == [1, 3, 5, 7, 9, 11, 13, 15]
    assert meta["timestamps"] == [i / 4.0 for i in meta["indices"]]
    assert meta["source_fps"] == 4.0 and meta["source_frames"] == 16
    diff = np.abs(frames.astype(int) - written[meta["indices"]].astype(int))
    assert diff.mean() < 3  # codec tolerance


def test_resize_to_pixel_budget(tmp_path):
    _ramp_video(tmp_path / "big.mp4", size=112)
    frames, meta = extract_video(tmp_path / "big.mp4", FramesConfig(num_frames=4, max_pixels=56 * 56))
    assert frames.shape == (4, 56, 56, 3) and (meta["height"], meta["width"]) == (56, 56)


def test_bad_videos_are_clear_errors(tmp_path):
    cfg = FramesConfig(num_frames=8)
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(FrameError, match="empty"):
        extract_video(tmp_path / "empty.mp4", cfg)
    with pytest.raises(FrameError, match="not found"):
        extract_video(tmp_path / "missing.mp4", cfg)
    (tmp_path / "junk.mp4").write_bytes(b"this is not a video" * 100)
    with pytest.raises(FrameError, match="unreadable"):
        extract_video(tmp_path / "junk.mp4", cfg)
    _ramp_video(tmp_path / "short.mp4", n=4)
    with pytest.raises(FrameError, match="fewer than the 8 requested"):
        extract_video(tmp_path / "short.mp4", cfg)


def test_truncated_video_is_skipped_and_reported(tmp_path):
    _ramp_video(tmp_path / "good.mp4")
    _ramp_video(tmp_path / "cut.mp4")
    data = (tmp_path / "cut.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 3])
    out = tmp_path / "cache"
    manifest = extract_all([str(tmp_path / "good.mp4"), str(tmp_path / "cut.mp4")], out,
                           FramesConfig(num_frames=8, workers=2))
    assert len(manifest) == 1
    skipped = json.loads((out / "skipped.json").read_text())
    assert len(skipped) == 1 and skipped[0]["video"].endswith("cut.mp4") and skipped[0]["error"]
    store = FrameStore(out)
    assert store.get(str(tmp_path / "good.mp4")).frames.shape == (8, 56, 56, 3)
    with pytest.raises(FrameError, match="not in the frame cache"):
        store.get(str(tmp_path / "cut.mp4"))


def test_nothing_usable_fails_loudly(tmp_path):
    (tmp_path / "junk.mp4").write_bytes(b"x" * 100)
    with pytest.raises(FrameError, match="no usable video"):
        extract_all([str(tmp_path / "junk.mp4")], tmp_path / "cache", FramesConfig())
    assert not (tmp_path / "cache" / "manifest.parquet").exists()
