"""Decode videos (decord) and images (PIL) once and cache them, so training never decodes media.

Each usable video becomes one ``.npy`` file of uint8 frames [T, H, W, 3] plus a row in
``manifest.parquet`` (source path, cache file, kind, sampled indices, timestamps, source
fps/length, shape); an image is cached the same way as one frame [1, H, W, 3] of kind
``image``, resized to the same pixel budget. Unreadable files are skipped and listed with the
reason in ``skipped.json``; the stage fails only when nothing usable remains. Every file is
written atomically.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from appo.config import FramesConfig
from appo.io import atomic_path, atomic_write_json, atomic_write_npy

MANIFEST = "manifest.parquet"


class FrameError(RuntimeError):
    """A video could not be turned into the requested frames; the message says why."""


def sample_indices(num_source: int, source_fps: float, cfg: FramesConfig) -> np.ndarray:
    """Segment-centre uniform sampling of an even number of frames (Qwen's temporal patch = 2).

    With ``cfg.fps`` set, the count is ``duration * fps`` capped at ``max_frames``; otherwise
    ``num_frames``. Index j is the centre of the j-th of k equal segments: floor((j + 0.5) n / k).
    """
    if cfg.fps:
        wanted = min(cfg.max_frames, max(2, int(num_source / source_fps * cfg.fps)))
    else:
        wanted = cfg.num_frames
    wanted -= wanted % 2
    if num_source < wanted:
        raise FrameError(f"has {num_source} frames, fewer than the {wanted} requested")
    return np.floor((np.arange(wanted) + 0.5) * num_source / wanted).astype(np.int64)


def fit_pixels(height: int, width: int, max_pixels: int, factor: int = 28) -> tuple[int, int]:
    """Largest (h, w), multiples of ``factor``, with the aspect ratio kept and h*w <= max_pixels."""
    scale = min(1.0, math.sqrt(max_pixels / (height * width)))
    h = max(factor, int(height * scale) // factor * factor)
    w = max(factor, int(width * scale) // factor * factor)
    return h, w


def extract_video(path: str | Path, cfg: FramesConfig) -> tuple[np.ndarray, dict]:
    """Sampled, resized uint8 frames [T, H, W, 3] of one video and its manifest fields."""
    import decord

    path = Path(path)
    if not path.is_file():
        raise FrameError("file not found")
    if path.stat().st_size == 0:
        raise FrameError("file is empty (0 bytes)")
    try:
        reader = decord.VideoReader(str(path), num_threads=1)
        num_source, source_fps = len(reader), float(reader.get_avg_fps())
    except Exception as exc:  # decord raises its own DECORDError for corrupt containers
        raise FrameError(f"unreadable video: {str(exc).splitlines()[0][:200]}") from exc
    if num_source == 0 or source_fps <= 0:
        raise FrameError("video has no decodable frames")
    indices = sample_indices(num_source, source_fps, cfg)
    try:
        frames = reader.get_batch(indices.tolist()).asnumpy()
    except Exception as exc:
        raise FrameError(f"decoding failed: {str(exc).splitlines()[0][:200]}") from exc
    h, w = fit_pixels(frames.shape[1], frames.shape[2], cfg.max_pixels)
    if (h, w) != frames.shape[1:3]:
        frames = _resize(frames, h, w)
    meta = dict(
        indices=indices.tolist(),
        timestamps=(indices / source_fps).round(4).tolist(),
        source_fps=source_fps,
        source_frames=num_source,
        height=h,
        width=w,
    )
    return frames, meta


def extract_image(path: str | Path, cfg: FramesConfig) -> tuple[np.ndarray, dict]:
    """One image as a single resized uint8 frame [1, H, W, 3] and its manifest fields.

    Same pixel budget (``cfg.max_pixels``) and resize as video frames, so an image question
    costs what one frame of a video question costs.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FrameError("file not found")
    try:
        with Image.open(path) as im:
            frame = np.array(im.convert("RGB"))[None]
    except (OSError, UnidentifiedImageError) as exc:
        raise FrameError(f"unreadable image: {str(exc).splitlines()[0][:200]}") from exc
    h, w = fit_pixels(frame.shape[1], frame.shape[2], cfg.max_pixels)
    if (h, w) != frame.shape[1:3]:
        frame = _resize(frame, h, w)
    meta = dict(indices=[0], timestamps=[0.0], source_fps=0.0, source_frames=1, height=h,
                width=w)
    return frame, meta


def _resize(frames: np.ndarray, h: int, w: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def video_key(video: str | Path) -> str:
    """Stable cache key of a video path: relative to the working directory when inside it.

    Relative keys keep the DVC-cached manifest valid when the repository is moved or cloned.
    """
    absolute = os.path.abspath(video)
    relative = os.path.relpath(absolute)
    return absolute if relative.startswith("..") else relative


def cache_name(video: str) -> str:
    return hashlib.sha1(video_key(video).encode()).hexdigest()[:20] + ".npy"


def extract_all(videos: list[str], out_dir: str | Path, cfg: FramesConfig,
                images: Iterable[str] = ()) -> pd.DataFrame:
    """Extract every video and image (paths as given) into ``out_dir``; returns the manifest.

    Writes ``manifest.parquet`` and ``skipped.json``. Raises FrameError if nothing is usable.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kinds = {video_key(v): "video" for v in videos} | {video_key(i): "image" for i in images}
    unique = sorted(kinds)
    extract = {"video": extract_video, "image": extract_image}

    def work(path: str) -> dict:
        kind = kinds[path]
        try:
            frames, meta = extract[kind](path, cfg)
        except FrameError as exc:
            return {"video": path, "kind": kind, "error": str(exc)}
        atomic_write_npy(out_dir / cache_name(path), frames)
        return {"video": path, "kind": kind, "file": cache_name(path), **meta}

    with ThreadPoolExecutor(max(1, cfg.workers)) as pool:
        rows = list(tqdm(pool.map(work, unique), total=len(unique), desc="frames", unit="file"))
    skipped = [r for r in rows if "error" in r]
    atomic_write_json(out_dir / "skipped.json", skipped)
    good = [r for r in rows if "error" not in r]
    if not good:
        first = f"{skipped[0]['video']}: {skipped[0]['error']}" if skipped else "no videos given"
        raise FrameError(f"no usable video among {len(unique)} (first problem: {first})")
    manifest = pd.DataFrame(good)
    with atomic_path(out_dir / MANIFEST) as tmp:
        manifest.to_parquet(tmp, index=False)
    return manifest


def extract_records(records: Iterable, out_dir: str | Path, cfg: FramesConfig) -> pd.DataFrame:
    """:func:`extract_all` over the media of question records: videos and images alike."""
    records = list(records)
    videos = [qa.video_file for qa in records if qa.video_file is not None]
    images = [qa.image_file for qa in records if qa.image_file is not None]
    return extract_all(videos, out_dir, cfg, images)


@dataclass
class CachedVideo:
    """Frames of one video as the processor wants them, plus sampling metadata."""

    frames: np.ndarray  # uint8 [T, H, W, 3]
    indices: list[int]
    source_fps: float
    source_frames: int

    def metadata(self):
        """transformers' VideoMetadata, so ``second_per_grid_ts`` (mrope time) is right."""
        from transformers.video_utils import VideoMetadata

        return VideoMetadata(
            total_num_frames=self.source_frames,
            fps=self.source_fps,
            frames_indices=list(self.indices),
        )


class FrameStore:
    """Read access to a frame cache directory written by :func:`extract_all`."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.dir = Path(cache_dir)
        path = self.dir / MANIFEST
        if not path.is_file():
            raise FrameError(f"{path}: frame manifest not found; run the frames stage first")
        self.rows = {r["video"]: r for r in pd.read_parquet(path).to_dict("records")}

    def __contains__(self, video: str) -> bool:
        return video_key(video) in self.rows

    def image(self, path: str) -> np.ndarray:
        """A cached image as uint8 [H, W, 3] (what the processor's ``images`` takes)."""
        return self.get(path).frames[0]

    def get(self, video: str) -> CachedVideo:
        row = self.rows.get(video_key(video))
        if row is None:
            raise FrameError(f"{video}: not in the frame cache {self.dir} (skipped or not extracted)")
        return CachedVideo(
            frames=np.load(self.dir / row["file"]),
            indices=[int(i) for i in row["indices"]],
            source_fps=float(row["source_fps"]),
            source_frames=int(row["source_frames"]),
        )
