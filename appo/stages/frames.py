"""DVC stage ``frames``: decode every video of every split once (decord) into the frame cache."""

from __future__ import annotations

import argparse
from pathlib import Path

from appo.config import DataConfig, FramesConfig, load_section
from appo.data.dataset import load_split, split_files
from appo.data.frames import extract_all
from appo.stages import stage_main


def run(data: DataConfig, cfg: FramesConfig) -> int:
    videos = [qa.video for path in split_files(data.out_dir) for qa in load_split(path)]
    manifest = extract_all(videos, cfg.out_dir, cfg)
    skipped = len(set(videos)) - len(manifest)
    print(f"frames: cached {len(manifest)} videos in {cfg.out_dir}"
          + (f", skipped {skipped} (see {Path(cfg.out_dir) / 'skipped.json'})" if skipped else ""))
    return len(manifest)


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    run(load_section(DataConfig, "data", args.params), load_section(FramesConfig, "frames", args.params))


if __name__ == "__main__":
    main()
