"""Shared, session-scoped tiny artifacts: built once, on CPU, from nothing downloaded."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from appo.config import FramesConfig, TinyModelConfig  # noqa: E402

TINY = TinyModelConfig()
FRAMES = FramesConfig(num_frames=8, max_pixels=56 * 56, workers=1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from appo.models.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", TINY)


@pytest.fixture(scope="session")
def tiny_policy(tiny_checkpoint):
    from appo.models.loading import load_policy

    return load_policy(tiny_checkpoint, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """A few questions per split with their frame cache: (data_dir, frame_store, records)."""
    from appo.data.dataset import load_split
    from appo.data.frames import FrameStore, extract_all
    from appo.data.synthetic import Knobs, generate_split

    root = tmp_path_factory.mktemp("synthetic")
    for split in ("sft", "rl", "test"):
        generate_split(root / "data", split, 8, Knobs())
    records = {s: load_split(root / "data" / f"{s}.json") for s in ("sft", "rl", "test")}
    videos = [qa.video for rs in records.values() for qa in rs]
    extract_all(videos, root / "frames", FRAMES)
    return root / "data", FrameStore(root / "frames"), records
