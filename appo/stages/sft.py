"""DVC stage ``sft``: chain-of-thought SFT warm start of the init model on the ``sft`` split.

Reads params sections ``data``, ``frames``, ``model`` and ``sft``. Output: ``<sft.out_dir>/model``
(a plain checkpoint, the RL stage's start) and ``<sft.out_dir>/metrics.json``; rerunning after
an interruption resumes from ``<sft.out_dir>/checkpoints``.
"""

from __future__ import annotations

import argparse
import os

from appo.config import DataConfig, FramesConfig, ModelConfig, SFTConfig, load_section, load_yaml
from appo.headline import write_headline
from appo.io import output_lock
from appo.stages import stage_main


def run(data: DataConfig, frames: FramesConfig, model: ModelConfig, cfg: SFTConfig,
        seed: int = 0, progress: bool = True, headline: str | None = None) -> dict:
    """Train; ``headline``: also write the headline metrics there (:mod:`appo.headline`)."""
    from appo.data.dataset import load_split, split_path
    from appo.data.frames import FrameStore
    from appo.train.sft import train

    records = load_split(split_path(data.out_dir, cfg.split))
    store = FrameStore(frames.out_dir)
    usable = [qa for qa in records if qa.video in store]
    if len(usable) < len(records):
        print(f"sft: {len(records) - len(usable)} of {len(records)} questions have no cached "
              f"frames (see {frames.out_dir}/skipped.json); training on the rest")
    start = cfg.init or model.out_dir
    result = train(cfg, usable, store, start, seed=seed, device=model.device,
                   attn_implementation=model.attn_implementation, progress=progress)
    m = result.metrics
    write_headline(headline, "sft", m)
    print(f"sft: {m['steps']} steps ({m['epochs']:.2f} epochs) in {m['train_time_s']:.1f}s, "
          f"final loss {m['final_loss']:.4f}, {m['skipped_steps']} skipped; "
          f"model in {result.out_dir / 'model'}")
    return m


@stage_main
def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--headline", default=None,
                        help="also write the headline metrics (DVC's metrics file) here")
    args = parser.parse_args(argv)
    cfg = load_section(SFTConfig, "sft", args.params)
    seed = cfg.seed if cfg.seed is not None else int(load_yaml(args.params).get("seed", 0))
    data = load_section(DataConfig, "data", args.params)
    frames = load_section(FramesConfig, "frames", args.params)
    model = load_section(ModelConfig, "model", args.params)
    with output_lock(cfg.out_dir):  # one run per output directory
        run(data, frames, model, cfg, seed, headline=args.headline)


if __name__ == "__main__":
    main()
