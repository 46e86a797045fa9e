"""One RL update of a saved global batch in 1 or N processes (run by tests/test_distributed.py).

``python tests/dist_update.py ...`` (one process) or ``accelerate launch --config_file
configs/accelerate/cpu-ddp.yaml tests/dist_update.py ...`` (each process updates its share of
whole groups under DDP). Every process writes its trainable weights to
``<out>/rank<r>.safetensors``; the main process writes the combined metrics to
``<out>/metrics.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from appo.config import DataConfig, FramesConfig, RLConfig, load_section
from appo.data.dataset import load_split, split_path
from appo.data.frames import FrameStore
from appo.models.loading import load_policy
from appo.rl.trainer import RLTrainer
from appo.train import common
from appo.train import distributed as dist


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", required=True)
    parser.add_argument("--algo", required=True)
    parser.add_argument("--batch", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_section(RLConfig, "rl", args.params)
    data = load_section(DataConfig, "data", args.params)
    frames = load_section(FramesConfig, "frames", args.params)
    common.seed_everything(0)
    accelerator = common.make_accelerator("no", "cpu", multi_process=True)
    model, processor = load_policy(cfg.init, "float32", "sdpa", "cpu")
    model = common.prepare_for_training(model, freeze_vision=True)
    # plain SGD: the weight change is lr x the averaged gradient, so it shows any gradient
    # difference linearly (Adam's first step is ~lr x sign(g) and flips on rounding noise)
    optimizer = torch.optim.SGD([p for _, p in common.trainable_parameters(model)], lr=cfg.lr)
    policy = accelerator.prepare_model(model)
    trainer = RLTrainer(policy, processor, cfg, cfg.algorithm(args.algo),
                        load_split(split_path(data.out_dir, "rl")), FrameStore(frames.out_dir),
                        optimizer=optimizer, accelerator=accelerator)
    batch = torch.load(args.batch, weights_only=False)
    rank, world = trainer.rank, trainer.world
    rows = batch.rollout.prompt_ids.shape[0] // world  # whole groups per process
    metrics = dist.combine_metrics(trainer.update(batch.select(
        torch.arange(rank * rows, (rank + 1) * rows))), accelerator)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({n: p.detach().contiguous() for n, p in common.trainable_parameters(model)},
              str(out / f"rank{rank}.safetensors"))
    if accelerator.is_main_process:
        (out / "metrics.json").write_text(json.dumps(metrics))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
