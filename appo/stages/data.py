"""DVC stage ``data``: generate the synthetic benchmark, or normalise real annotation files.

Output: ``<data.out_dir>/{split}.json`` in the Video-R1 schema (plus videos for synthetic
data), the single format every later stage reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from appo.config import DataConfig, load_section
from appo.data.formats import PathRemap, load_source
from appo.data.synthetic import generate_split
from appo.io import atomic_write_json, atomic_write_text
from appo.stages import log_stage_run, stage_main

SPLITS = ("sft", "rl", "val", "test")


def run(cfg: DataConfig, seed: int = 0) -> dict[str, int]:
    out = Path(cfg.out_dir)
    counts: dict[str, int] = {}
    if cfg.source == "synthetic":
        for split in SPLITS:
            records = generate_split(out, split, getattr(cfg.synthetic, split), cfg.synthetic, seed)
            counts[split] = len(records)
    elif cfg.source == "files":
        remap = PathRemap(cfg.video_root, cfg.image_root, cfg.strip_prefix)
        for split, entry in cfg.files.items():
            _, records, report = load_source(entry, remap)  # option sampling: fixed seed 0
            for problem in report.problems:
                print(f"warning: {problem}")
            rows = []
            for qa in records:
                row = qa.to_json()
                row["path"] = str(Path(qa.video).resolve())
                rows.append(row)
            atomic_write_text(out / f"{split}.json", json.dumps(rows, indent=1))
            counts[split] = len(records)
    else:  # DataConfig rejects any other source when params are loaded
        raise AssertionError(cfg.source)
    atomic_write_json(out / "summary.json", counts)
    return counts


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    from appo.config import load_yaml

    seed = int(load_yaml(args.params).get("seed", 0))
    cfg = load_section(DataConfig, "data", args.params)
    counts = run(cfg, seed)
    print(f"data: wrote {counts} questions")
    log_stage_run("data", {"data": dataclasses.asdict(cfg), "seed": seed},
                  {f"questions/{split}": n for split, n in counts.items()})


if __name__ == "__main__":
    main()
