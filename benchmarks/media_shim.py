"""Video files as arrays, for test runs on a machine without av (PyAV) or decord.

The test fixtures build their data the pipeline's way: the synthetic generator writes .mp4
files (PyAV) and the frames stage decodes them (decord) into the frame cache. On a bare GPU
machine neither is installed, and decoding is not what the GPU tests test, so :func:`install`
swaps the two ends for an array container written to the same path: the generator's frames
are stored as they are, and the extractor samples, resizes and describes them exactly as
:func:`appo.data.frames.extract_video` does after decoding (lossless video decodes to the same
pixels). Nothing is swapped where both packages import.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def write_video(path: str | Path, frames: np.ndarray, fps: float) -> None:
    """Stand-in for :func:`appo.io.atomic_write_video`: uint8 frames and fps, atomically."""
    from appo.io import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, frames=frames, fps=np.float64(fps))


def extract_video(path: str | Path, cfg) -> tuple[np.ndarray, dict]:
    """Stand-in for :func:`appo.data.frames.extract_video` over :func:`write_video` files."""
    from appo.data import frames as fr

    path = Path(path)
    if not path.is_file():
        raise fr.FrameError("file not found")
    try:
        with np.load(path) as data:
            video, fps = data["frames"], float(data["fps"])
    except Exception as exc:
        raise fr.FrameError(f"unreadable video: {str(exc).splitlines()[0][:200]}") from exc
    indices = fr.sample_indices(len(video), fps, cfg)
    chosen = video[indices]
    h, w = fr.fit_pixels(chosen.shape[1], chosen.shape[2], cfg.max_pixels)
    if (h, w) != chosen.shape[1:3]:
        chosen = fr._resize(chosen, h, w)
    meta = dict(indices=indices.tolist(), timestamps=(indices / fps).round(4).tolist(),
                source_fps=fps, source_frames=len(video), height=h, width=w)
    return chosen, meta


def install(force: bool = False) -> bool:
    """Swap the video writer and reader when av or decord is missing (or ``force``); returns
    whether it did."""
    if not force and _importable("av") and _importable("decord"):
        return False
    from appo.data import frames, synthetic

    synthetic.atomic_write_video = write_video
    frames.extract_video = extract_video
    return True
