"""DVC stage ``rl@<algo>``: train the SFT checkpoint with GRPO, DAPO or APPO.

``python -m appo.stages.rl --algo appo`` reads params.yaml (sections seed, data, frames, model,
rl), trains ``rl.steps`` steps on the ``rl`` split and writes ``<rl.out_dir>/<algo>/model`` (a
checkpoint loadable like any other), ``metrics.json`` and ``metrics.jsonl``. Training state is
checkpointed every ``rl.save_every`` steps under ``<rl.out_dir>/<algo>/checkpoints``; the same
command after a crash resumes from the newest one (same weights, optimizer, RNG, data position
and MLflow run), provided the configuration is unchanged.

``rl.launch`` (or ``--launch``) other than ``none`` reruns this command under ``accelerate
launch`` with a DDP/FSDP config (``configs/accelerate/``): each process trains its share of
whole groups, the main process alone writes checkpoints, the model and the metrics.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import os
import sys
import time
from pathlib import Path

from appo.config import DataConfig, FramesConfig, ModelConfig, RLConfig, load_section, load_yaml
from appo.data.dataset import load_split, split_path
from appo.data.frames import FrameStore
from appo.headline import write_headline
from appo.io import atomic_write_json, output_lock, remove_stale_temps
from appo.mlflow_setup import provenance
from appo.models.loading import load_policy
from appo.rl.trainer import RLTrainer
from appo.stages import stage_main
from appo.tracking import open_run, truncate_metrics
from appo.train import common
from appo.train import distributed as dist

# Knobs that may change between a crash and its resume without invalidating the checkpoint.
RESUME_SAFE = {"steps", "save_every", "max_bad_steps"}
MODULE = "appo.stages.rl"


def _fingerprint(cfg: RLConfig, algo_name: str, seed: int) -> str:
    knobs = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUME_SAFE}
    knobs["algorithms"] = {algo_name: knobs["algorithms"][algo_name]}
    return common.config_fingerprint({"rl": knobs, "algo": algo_name, "seed": seed})


def cap_prompts(records: list, processor, cfg: RLConfig) -> list:
    """The records whose prompt fits ``rl.max_prompt_tokens``; ``rl.long_prompts`` says
    whether a longer one is dropped (with one warning naming the longest) or stops the run.

    Without a cap, one 10,000-character question makes every step that samples it ~200x
    slower, silently.
    """
    from appo.data.collate import prompt_lengths
    from appo.data.schema import DataError

    lengths = prompt_lengths(processor, records)
    long = [(n, qa.problem_id) for n, qa in zip(lengths, records) if n > cfg.max_prompt_tokens]
    if not long:
        return records
    n, pid = max(long)
    what = (f"question {pid} has a {n}-token prompt, over the limit of {cfg.max_prompt_tokens}"
            " (rl.max_prompt_tokens)")
    if cfg.long_prompts == "error" or len(long) == len(records):
        raise DataError(what)
    print(f"warning: dropped {len(long)} of {len(records)} rl questions with prompts over "
          f"{cfg.max_prompt_tokens} tokens; longest: {what}", file=sys.stderr)
    return [qa for qa, length in zip(records, lengths) if length <= cfg.max_prompt_tokens]


def run(params: str, algo_name: str, steps: int | None = None, progress: bool = True,
        headline: str | None = None) -> dict:
    """Train ``algo_name``; ``headline``: also write the headline metrics there
    (:mod:`appo.headline`)."""
    from tqdm import tqdm

    cfg = load_section(RLConfig, "rl", params)
    algo = cfg.algorithm(algo_name)
    model_cfg = load_section(ModelConfig, "model", params)
    data = load_section(DataConfig, "data", params)
    frames = load_section(FramesConfig, "frames", params)
    seed = int(load_yaml(params).get("seed", 0)) + cfg.seed
    total_steps = steps or cfg.steps
    out = Path(cfg.out_dir) / algo_name
    ckpt_root = out / "checkpoints"

    common.seed_everything(seed)
    accelerator = common.make_accelerator(cfg.mixed_precision, model_cfg.device,
                                          multi_process=True)
    main = accelerator.is_main_process
    model, processor = load_policy(cfg.init, model_cfg.dtype, model_cfg.attn_implementation,
                                   str(accelerator.device))
    ref_model = None
    if algo.beta > 0 and not cfg.lora:  # frozen copy of the start policy (bf16 on GPU), no grads
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    lora = dict(r=cfg.lora_r, alpha=cfg.lora_alpha) if cfg.lora else None
    model = common.prepare_for_training(model, freeze_vision=cfg.freeze_vision,
                                        gradient_checkpointing=cfg.gradient_checkpointing,
                                        lora=lora)
    optimizer = common.build_optimizer(model, cfg.lr, cfg.weight_decay)
    scheduler = common.build_scheduler(optimizer, cfg.warmup_steps, total_steps, min_lr_ratio=1.0)
    records = cap_prompts(load_split(split_path(data.out_dir, "rl")), processor, cfg)
    # device placement, bf16 autocast on CUDA, DDP/FSDP wrapping under a launch (the optimizer
    # and scheduler stay plain: one optimizer step per RL step on every process)
    policy = accelerator.prepare_model(model)
    trainer = RLTrainer(policy, processor, dataclasses.replace(cfg, seed=seed), algo, records,
                        FrameStore(frames.out_dir), ref_model=ref_model, optimizer=optimizer,
                        scheduler=scheduler, accelerator=accelerator)

    sharded = accelerator.distributed_type.name == "FSDP"
    if sharded and cfg.save_every > 0:
        print("rl: resumable checkpoints are not written under FSDP (sharded optimizer state); "
              "a crashed FSDP run restarts from the beginning")
    fingerprint = _fingerprint(cfg, algo_name, seed)
    start, run_id, elapsed = 0, None, 0.0
    if main:
        remove_stale_temps(ckpt_root)
        remove_stale_temps(out)
    found = common.latest_readable_checkpoint(ckpt_root)
    if found is not None:
        latest, loaded = found
        state = common.load_training_state(latest, model, optimizer, scheduler, loaded=loaded)
        if state.get("fingerprint") != fingerprint:
            raise RuntimeError(f"{latest}: checkpoint of a different rl configuration; delete "
                               f"{ckpt_root} to start over")
        start, run_id, elapsed = state["step"], state.get("run_id"), state.get("elapsed", 0.0)
        trainer.sampler.position = state["sampler_position"]
        trainer.skips.load_state_dict(state["skips"])
        trainer.steps_done = start
        print(f"rl {algo_name}: resuming from {latest} (step {start})")
    if main:  # rows after the checkpoint are redone; a fresh start (start 0) keeps none
        truncate_metrics(out / "metrics.jsonl", start - 1)

    history: list[dict] = []
    t0 = time.perf_counter() - elapsed
    tags = {"stage": f"rl@{algo_name}", "algorithm": algo_name, "seed": str(seed)}
    with open_run(out, f"rl-{algo_name}", run_id=run_id, tags=tags, main=main) as log:
        if run_id is None:
            log.log_params({"rl": {k: v for k, v in vars(cfg).items() if k != "algorithms"},
                            "algorithm": dataclasses.asdict(algo), "algo": algo_name,
                            "seed": seed})
        bar = tqdm(range(start, total_steps), desc=f"rl {algo_name}", unit="step",
                   initial=start, total=total_steps, disable=not (progress and main))
        for step in bar:
            metrics = trainer.train_step()
            history.append(metrics)
            log.log_metrics(metrics, step)
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", acc=f"{metrics['accuracy']:.2f}",
                            refresh=False)  # redraw at tqdm's interval, not every step
            done = step + 1
            if (main and not sharded and cfg.save_every > 0 and done % cfg.save_every == 0
                    and done < total_steps):
                common.save_training_state(ckpt_root / f"step-{done}", model, optimizer, scheduler, {
                    "step": done, "sampler_position": trainer.sampler.position,
                    "skips": trainer.skips.state_dict(), "run_id": log.run_id,
                    "fingerprint": fingerprint, "elapsed": time.perf_counter() - t0})
                common.prune_checkpoints(ckpt_root, keep=2)
        # FSDP: every process takes part in gathering the full weights; the main one saves them
        full = accelerator.get_state_dict(policy) if sharded else None
        accelerator.wait_for_everyone()
        if not main:
            return {}
        common.export_model(model, processor, out / "model", state_dict=full)
        tail = history[-5:] or [{"reward": float("nan"), "accuracy": float("nan")}]
        summary = {
            "algorithm": algo_name,
            "steps": total_steps,
            "train_time_s": round(time.perf_counter() - t0, 2),
            "final_reward": sum(m["reward"] for m in tail) / len(tail),
            "final_accuracy": sum(m["accuracy"] for m in tail) / len(tail),
            "skipped_steps": trainer.skips.total,
            "num_processes": accelerator.num_processes,
            "provenance": provenance(),
        }
        atomic_write_json(out / "metrics.json", summary)
        write_headline(headline, "rl", summary)
        log.log_metrics({f"final/{k}": v for k, v in summary.items()
                         if isinstance(v, (int, float))}, total_steps)
        log.log_artifact(out / "metrics.json")
    print(f"rl {algo_name}: {summary}")
    return summary


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--algo", required=True, help="a preset name under rl.algorithms")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--steps", type=int, default=None, help="override rl.steps")
    parser.add_argument("--launch", default=None,
                        help="override rl.launch: none, ddp, fsdp, cpu-ddp or an accelerate config")
    parser.add_argument("--headline", default=None,
                        help="also write the headline metrics (DVC's metrics file) here")
    args = parser.parse_args(argv)
    cfg = load_section(RLConfig, "rl", args.params)
    cfg.algorithm(args.algo)  # an unknown preset fails before anything is created
    # one run per output directory; a launch's parent holds the lock for its children
    launched = bool(os.environ.get(dist.LAUNCHED_ENV))
    with contextlib.nullcontext() if launched else output_lock(Path(cfg.out_dir) / args.algo):
        code = dist.relaunch(args.launch or cfg.launch, cfg.num_processes, MODULE,
                             sys.argv[1:] if argv is None else argv)
        if code is not None:
            if code:
                raise SystemExit(code)
            return
        run(args.params, args.algo, args.steps, headline=args.headline)


if __name__ == "__main__":
    main()
