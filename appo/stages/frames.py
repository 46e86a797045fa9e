"""DVC stage ``frames``: decode every video and image of every split once into the frame cache."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from appo.config import DataConfig, FramesConfig, load_section
from appo.data.dataset import load_split, split_files
from appo.data.frames import extract_records
from appo.stages import log_stage_run, stage_main


def run(data: DataConfig, cfg: FramesConfig) -> int:
    records = [qa for path in split_files(data.out_dir) for qa in load_split(path)]
    manifest = extract_records(records, cfg.out_dir, cfg)
    skipped = len(json.loads((Path(cfg.out_dir) / "skipped.json").read_text()))
    print(f"frames: cached {len(manifest)} videos and images in {cfg.out_dir}"
          + (f", skipped {skipped} (see {Path(cfg.out_dir) / 'skipped.json'})" if skipped else ""))
    return len(manifest)


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    cfg = load_section(FramesConfig, "frames", args.params)
    cached = run(load_section(DataConfig, "data", args.params), cfg)
    log_stage_run("frames", {"frames": dataclasses.asdict(cfg)}, {"cached": cached})


if __name__ == "__main__":
    main()
