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
from pathlib import Path

from appo.config import DataConfig, FramesConfig, ModelConfig, RLConfig, load_section, load_yaml
from appo.data.dataset import load_split, split_path
from appo.data.frames import FrameStore
from appo.headline import write_headline
from appo.io import output_lock
from appo.mlflow_setup import provenance
from appo.models.loading import load_policy
from appo.rl.trainer import RLTrainer
from appo.stages import stage_main
from appo.train import common
from appo.train import distributed as dist
from appo.train.loop import Loop, find_checkpoint, resume_knobs
from appo.train.loop import run as run_loop

# Knobs that may change between a crash and its resume without invalidating the checkpoint.
RESUME_SAFE = {"steps", "save_every", "keep_checkpoints", "max_bad_steps"}
MODULE = "appo.stages.rl"


def _fingerprint(cfg: RLConfig, algo_name: str, seed: int) -> str:
    knobs = resume_knobs(cfg, RESUME_SAFE)
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


class RLRun:
    """The RL trainer as a :class:`appo.train.loop.Task`: its steps and state, the final
    model (gathered from every process under FSDP) and the summary (``metrics.json``)."""

    def __init__(self, trainer: RLTrainer, algo_name: str, total_steps: int, model, processor,
                 accelerator) -> None:
        self.trainer, self.algo_name, self.total_steps = trainer, algo_name, total_steps
        self.model, self.processor, self.accelerator = model, processor, accelerator
        self.history: list[dict] = []  # this process run's steps (after a resume: the new ones)
        self.state_dict, self.load_state_dict = trainer.state_dict, trainer.load_state_dict

    def train_step(self) -> dict[str, float]:
        metrics = self.trainer.train_step()
        self.history.append(metrics)
        return metrics

    def export(self, path: Path) -> None:
        # FSDP: every process takes part in gathering the full weights; the main one saves them
        acc = self.accelerator
        full = acc.get_state_dict(self.trainer.policy) if _sharded(acc) else None
        acc.wait_for_everyone()
        if acc.is_main_process:
            common.export_model(self.model, self.processor, path, state_dict=full)

    def summary(self, elapsed: float) -> dict:
        tail = self.history[-5:] or [{"reward": float("nan"), "accuracy": float("nan")}]
        return {
            "algorithm": self.algo_name,
            "steps": self.total_steps,
            "train_time_s": round(elapsed, 2),
            "final_reward": sum(m["reward"] for m in tail) / len(tail),
            "final_accuracy": sum(m["accuracy"] for m in tail) / len(tail),
            "skipped_steps": self.trainer.skips.total,
            "num_processes": self.accelerator.num_processes,
            "provenance": provenance(),
        }


def _sharded(accelerator) -> bool:
    return accelerator.distributed_type.name == "FSDP"


def run(params: str, algo_name: str, steps: int | None = None, progress: bool = True,
        headline: str | None = None) -> dict:
    """Train ``algo_name``; ``headline``: also write the headline metrics there
    (:mod:`appo.headline`)."""
    cfg = load_section(RLConfig, "rl", params)
    algo = cfg.algorithm(algo_name)
    model_cfg = load_section(ModelConfig, "model", params)
    data = load_section(DataConfig, "data", params)
    frames = load_section(FramesConfig, "frames", params)
    seed = int(load_yaml(params).get("seed", 0)) + cfg.seed
    total_steps = steps or cfg.steps
    out = Path(cfg.out_dir) / algo_name

    common.seed_everything(seed)
    accelerator = common.make_accelerator(cfg.mixed_precision, model_cfg.device,
                                          multi_process=True)
    sharded = _sharded(accelerator)
    if sharded and cfg.save_every > 0:
        print("rl: resumable checkpoints are not written under FSDP (sharded optimizer state); "
              "a crashed FSDP run restarts from the beginning")
    loop = Loop(out, f"rl-{algo_name}", total_steps, 0 if sharded else cfg.save_every,
                cfg.keep_checkpoints, _fingerprint(cfg, algo_name, seed),
                mismatch=f"checkpoint of a different rl configuration; delete "
                         f"{out / 'checkpoints'} to start over",
                main=accelerator.is_main_process, label=f"rl {algo_name}",
                tags={"stage": f"rl@{algo_name}", "algorithm": algo_name, "seed": str(seed)})
    found = find_checkpoint(loop)
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
    task = RLRun(trainer, algo_name, total_steps, model, processor, accelerator)
    summary = run_loop(
        task, loop, found, model=model, optimizer=optimizer, scheduler=scheduler,
        params={"rl": {k: v for k, v in vars(cfg).items() if k != "algorithms"},
                "algorithm": dataclasses.asdict(algo), "algo": algo_name, "seed": seed},
        final=lambda s: {f"final/{k}": v for k, v in s.items() if isinstance(v, (int, float))},
        postfix=lambda m: {"reward": f"{m['reward']:.3f}", "acc": f"{m['accuracy']:.2f}"},
        progress=progress)
    if summary:  # the main process
        write_headline(headline, "rl", summary)
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
    machines = parser.add_argument_group(
        "across machines", "the same command on every machine, each with its own rank; "
        "defaults from APPO_NUM_MACHINES, APPO_MACHINE_RANK, APPO_MAIN_PROCESS_IP, "
        "APPO_MAIN_PROCESS_PORT (README: Running on a cluster)")
    machines.add_argument("--num-machines", type=int, default=None)
    machines.add_argument("--machine-rank", type=int, default=None)
    machines.add_argument("--main-process-ip", default=None, help="address of machine 0")
    machines.add_argument("--main-process-port", type=int, default=None)
    args = parser.parse_args(argv)
    cfg = load_section(RLConfig, "rl", args.params)
    cfg.algorithm(args.algo)  # an unknown preset fails before anything is created
    where = dist.Machines.from_args(args.num_machines, args.machine_rank, args.main_process_ip,
                                    args.main_process_port)
    # one run per output directory; a launch's parent on machine 0 (which writes the outputs)
    # holds the lock for its children and for the other machines
    launched = bool(os.environ.get(dist.LAUNCHED_ENV))
    unlocked = launched or not where.is_main_machine
    with contextlib.nullcontext() if unlocked else output_lock(Path(cfg.out_dir) / args.algo):
        code = dist.relaunch(args.launch or cfg.launch, cfg.num_processes, MODULE,
                             sys.argv[1:] if argv is None else argv, where)
        if code is not None:
            if code:
                raise SystemExit(code)
            return
        run(args.params, args.algo, args.steps, headline=args.headline)


if __name__ == "__main__":
    main()
