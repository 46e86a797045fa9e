"""Shared, session-scoped tiny artifacts: built once, on CPU, from nothing downloaded."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from appo.config import FramesConfig, TinyModelConfig  # noqa: E402

# Tiny models gain nothing from intra-op threads, and two-thread processes slow down ~10x when
# anything else runs on a 2-core machine.
torch.set_num_threads(1)

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
    from appo.config import SyntheticConfig
    from appo.data.dataset import load_split
    from appo.data.frames import FrameStore, extract_all
    from appo.data.synthetic import generate_split

    root = tmp_path_factory.mktemp("synthetic")
    for split in ("sft", "rl", "test"):
        generate_split(root / "data", split, 8, SyntheticConfig())
    records = {s: load_split(root / "data" / f"{s}.json") for s in ("sft", "rl", "test")}
    videos = [qa.video for rs in records.values() for qa in rs]
    extract_all(videos, root / "frames", FRAMES)
    return root / "data", FrameStore(root / "frames"), records


@pytest.fixture()
def micro_params(tmp_path, synthetic_data, tiny_checkpoint):
    """Factory: a params.yaml for a micro RL run on the session's tiny data and model."""
    from pathlib import Path

    import yaml

    data_dir, store, _ = synthetic_data
    repo_params = Path(__file__).resolve().parents[1] / "params.yaml"

    def make(folder: str, **rl) -> Path:
        params = yaml.safe_load(repo_params.read_text())
        params["data"]["out_dir"] = str(data_dir)
        params["frames"]["out_dir"] = str(store.dir)
        params["model"]["device"] = "cpu"
        root = tmp_path / folder
        params["rl"].update(dict(init=str(tiny_checkpoint), out_dir=str(root / "rl"),
                                 prompts_per_step=2, num_generations=2, max_new_tokens=8,
                                 groups_per_micro_batch=1, lr=1e-3) | rl)
        root.mkdir(parents=True, exist_ok=True)
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        return root / "params.yaml"

    return make
