"""The GPU check's dry run (what CI runs): every part on CPU with the tiny model, in one call."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
PARTS = {"cuda_tests", "rl_step", "rollout_3b", "rollout_7b", "rl_run"}


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_part(tmp_path):
    out = tmp_path / "gpu-check"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run",
                           str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    md = (out / "gpu_check.md").read_text()
    assert report["dry_run"] is True and set(report["parts"]) == PARTS
    for key in ("python", "torch", "transformers", "accelerate", "peft", "pandas"):
        assert report["versions"][key], key
    assert report["device"]["name"]
    for name, part in report["parts"].items():
        assert part["status"] == "ok", (name, part["output_tail"])
        assert part["shape"] and part["result"], name
        assert f"## {name}:" in md
    # the parts ran with dvc / mlflow / prefect / decord / av blocked from import
    log = (out / "gpu_check.log").read_text()
    assert log.count("gpu_check child: blocked from import: dvc, mlflow, prefect, decord, av") \
        == len(PARTS)
    tests = report["parts"]["cuda_tests"]["result"]["tests"]
    assert tests and all(t["outcome"] in ("passed", "skipped") for t in tests)
    step = report["parts"]["rl_step"]["result"]
    assert {"appo/dapo step time", "appo/dapo step peak memory"} <= set(step["ratios"])
    assert [row[0] for row in step["table"]] == ["GRPO", "DAPO", "APPO"]
    assert set(report["parts"]["rollout_3b"]["result"]["summary"]) == {"dynamic", "static"}
    assert set(report["parts"]["rollout_7b"]["result"]["summary"]) == {"dynamic"}
    run = report["parts"]["rl_run"]["result"]
    assert run["ok"] and run["resumed_from"] == 1 and run["checkpoints"] >= 1
    for word in ("device:", "| part |", "appo/dapo step time", "resumed from step 1"):
        assert word in md, word


def test_media_shim_round_trips_frames_like_the_decoder(tmp_path):
    """The stand-in writer/reader the GPU check uses without av / decord: the extractor's
    sampling, resize and manifest fields on the generator's frames."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import media_shim

    from appo.config import FramesConfig
    from appo.data.frames import sample_indices

    frames = np.random.default_rng(0).integers(0, 256, (16, 64, 96, 3), dtype=np.uint8)
    media_shim.write_video(tmp_path / "v.mp4", frames, 8.0)
    cfg = FramesConfig(num_frames=4, max_pixels=56 * 56 * 2)
    got, meta = media_shim.extract_video(tmp_path / "v.mp4", cfg)
    idx = sample_indices(16, 8.0, cfg)
    assert meta["indices"] == idx.tolist() and meta["source_frames"] == 16
    assert meta["source_fps"] == 8.0 and got.shape == (4, meta["height"], meta["width"], 3)
    assert meta["height"] % 28 == 0 and meta["width"] % 28 == 0
