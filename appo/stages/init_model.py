"""DVC stage ``init_model``: build the tiny default checkpoint, or validate a real one.

A real checkpoint is not copied (it can be 16 GB): ``<out_dir>/checkpoint.json`` points at
it, and :func:`appo.models.loading.resolve_checkpoint` follows the pointer.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from appo.config import FramesConfig, ModelConfig, load_section
from appo.io import atomic_dir, atomic_write_json
from appo.models.loading import check_checkpoint
from appo.models.tiny import build_tiny_checkpoint
from appo.stages import log_stage_run, stage_main


def run(cfg: ModelConfig, frames: FramesConfig) -> Path:
    if cfg.path:
        config = check_checkpoint(cfg.path)
        with atomic_dir(cfg.out_dir) as tmp:
            atomic_write_json(tmp / "checkpoint.json", {
                "path": str(Path(cfg.path).resolve()), "model_type": config["model_type"]})
        print(f"init_model: using the checkpoint at {cfg.path}")
    else:
        build_tiny_checkpoint(cfg.out_dir, cfg.tiny, max_pixels=frames.max_pixels)
        print(f"init_model: built the tiny Qwen2.5-VL checkpoint in {cfg.out_dir}")
    return Path(cfg.out_dir)


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    cfg = load_section(ModelConfig, "model", args.params)
    frames = load_section(FramesConfig, "frames", args.params)
    run(cfg, frames)
    log_stage_run("init_model", {"model": dataclasses.asdict(cfg),
                                 "frames.max_pixels": frames.max_pixels}, {})


if __name__ == "__main__":
    main()
