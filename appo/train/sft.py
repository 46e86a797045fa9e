"""Chain-of-thought SFT (the Video-R1 warm start before RL): teacher forcing on the targets.

Each question becomes its chat prompt (video + question) followed by the target
``<think>process</think><answer>X</answer><|im_end|>``; the loss is the token-mean cross-entropy
over the target tokens only (prompt and padding are masked by
:func:`appo.data.collate.append_targets`), exact across gradient accumulation (the sum over the
step's micro-batches is divided by the step's target-token count).

The run is resumable: every ``save_every`` optimizer steps a checkpoint of the trainable
weights, optimizer, scheduler, RNG states, step, data position and MLflow run id is written to
``<out_dir>/checkpoints/step-N``; rerunning the same configuration continues from the newest
one and ends with the same weights as an uninterrupted run. Outputs: ``<out_dir>/model`` (a
plain checkpoint, LoRA merged), ``<out_dir>/metrics.json`` and the per-step
``<out_dir>/metrics.jsonl``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from appo.config import SFTConfig
from appo.data.collate import append_targets, encode_prompts
from appo.data.frames import FrameStore
from appo.data.prompts import target_text
from appo.data.schema import VideoQA
from appo.io import atomic_write_json, remove_stale_temps
from appo.tracking import open_run, truncate_metrics
from appo.train import common

# Knobs that may change between a run and its resumption (they do not change the result).
RESUME_SAFE_KEYS = ("save_every", "keep_checkpoints", "resume", "out_dir")
RECENT = 10  # final_loss = mean over the last RECENT good steps


@dataclass
class SFTResult:
    model: torch.nn.Module  # the exported (LoRA-merged) model, eval mode
    processor: Any
    metrics: dict[str, Any]
    out_dir: Path


def make_batch(processor, records: Sequence[VideoQA], store: FrameStore) -> dict:
    """Left-padded prompt + target ids, labels (-100 outside targets) and visual inputs."""
    batch = encode_prompts(processor, records, store)
    return append_targets(batch, [target_text(qa) for qa in records], processor.tokenizer)


def count_targets(labels: torch.Tensor) -> int:
    """Tokens that are predicted (labels shifted by one, like the loss)."""
    return int((labels[:, 1:] != -100).sum())


def compute_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over the target tokens, their count) for one micro-batch.

    Only the logits at target positions are upcast to fp32 (memory stays O(targets x vocab)).
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits[:, :-1]
    labels = batch["labels"][:, 1:].to(logits.device)
    mask = labels != -100
    loss = F.cross_entropy(logits[mask].float(), labels[mask], reduction="sum")
    return loss, int(mask.sum())


def batch_order(num_records: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The epoch's seeded shuffle cut into micro-batches (the last one may be smaller)."""
    perm = np.random.default_rng([seed, epoch]).permutation(num_records)
    return [perm[i:i + batch_size] for i in range(0, num_records, batch_size)]


def total_steps(cfg: SFTConfig, num_records: int) -> int:
    """Optimizer steps of the run: ``max_steps`` if > 0, else ``epochs`` passes (at least 1)."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_epoch = math.ceil(num_records / cfg.batch_size)
    return max(1, int(cfg.epochs * per_epoch) // cfg.grad_accum)


def freeze_vision(cfg: SFTConfig, model: torch.nn.Module) -> bool:
    """``sft.freeze_vision`` resolved: ``auto`` trains the tower only of the embedded tiny model.

    A real Qwen2.5-VL's vision tower is pretrained and the APPO recipe keeps it frozen; the tiny
    default's tower is random, so without training it nothing in the video can be perceived.
    """
    if isinstance(cfg.freeze_vision, bool):
        return cfg.freeze_vision
    return not getattr(model.config, "appo_embedded_tiny", False)


def _fingerprint(cfg: SFTConfig, start: str, records: Sequence[VideoQA], seed: int) -> str:
    knobs = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUME_SAFE_KEYS}
    ids = hashlib.sha256("\n".join(qa.problem_id for qa in records).encode()).hexdigest()
    return common.config_fingerprint({"cfg": knobs, "start": str(start), "data": ids, "seed": seed})


def _checkpoint_dtype(path: str | Path) -> torch.dtype | None:
    """The dtype the start checkpoint was saved in (exports go back to it)."""
    from appo.models.loading import check_checkpoint

    config = check_checkpoint(path)
    name = config.get("dtype") or config.get("torch_dtype")
    if name is None:
        name = (config.get("text_config") or {}).get("dtype")
    return getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else None


def train(cfg: SFTConfig, records: Sequence[VideoQA], store: FrameStore, start: str | Path, *,
          seed: int = 0, attn_implementation: str = "sdpa", device: str = "auto",
          progress: bool = True) -> SFTResult:
    """Run (or resume) SFT from checkpoint ``start``; see the module docstring for outputs."""
    from tqdm import tqdm

    from appo.models.loading import load_policy, resolve_checkpoint

    records = list(records)
    if not records:
        raise ValueError("the SFT split is empty")
    out_dir = Path(cfg.out_dir)
    ckpt_root = out_dir / "checkpoints"
    fingerprint = _fingerprint(cfg, str(resolve_checkpoint(start)), records, seed)
    steps = total_steps(cfg, len(records))

    remove_stale_temps(ckpt_root)
    remove_stale_temps(out_dir)
    found = common.latest_readable_checkpoint(ckpt_root) if cfg.resume else None
    resume_from, loaded = found if found is not None else (None, None)
    if resume_from is not None:
        if loaded["state"].get("fingerprint") != fingerprint:
            raise RuntimeError(
                f"{resume_from}: this checkpoint was written with a different SFT configuration, "
                f"start checkpoint or data; delete {ckpt_root} or set sft.resume: false")
    else:
        shutil.rmtree(ckpt_root, ignore_errors=True)
        (out_dir / "metrics.jsonl").unlink(missing_ok=True)

    common.seed_everything(seed)
    accelerator = common.make_accelerator(cfg.mixed_precision, device)
    dev = accelerator.device
    model, processor = load_policy(start, dtype=cfg.train_dtype, device=str(dev),
                                   attn_implementation=attn_implementation)
    lora = None
    if cfg.lora:
        lora = dict(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                    target_modules=cfg.lora_target_modules)
    model = common.prepare_for_training(model, freeze_vision=freeze_vision(cfg, model),
                                        gradient_checkpointing=cfg.gradient_checkpointing,
                                        lora=lora)
    n_trainable, n_total = common.count_parameters(model)
    optimizer = common.build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps)
    scheduler = common.build_scheduler(optimizer, cfg.warmup_steps, steps, cfg.min_lr_ratio)
    model, optimizer = accelerator.prepare(model, optimizer)
    params = [p for _, p in common.trainable_parameters(model)]

    state: dict[str, Any] = {"step": 0, "micro": 0, "elapsed_s": 0.0, "target_tokens": 0,
                             "recent_losses": [], "skips": {"total": 0, "consecutive": 0},
                             "run_id": None}
    if resume_from is not None:
        state = common.load_training_state(resume_from, accelerator.unwrap_model(model),
                                           optimizer, scheduler, loaded=loaded)
        print(f"sft: resuming from {resume_from} (step {state['step']}/{steps})")
    resumed_step = state["step"]
    skips = common.SkipCounter(cfg.max_bad_steps)
    skips.load_state_dict(state["skips"])
    truncate_metrics(out_dir / "metrics.jsonl", resumed_step)

    logger = open_run(out_dir, "sft", run_id=state["run_id"], tags={"stage": "sft"})
    state["run_id"] = logger.run_id
    per_epoch = math.ceil(len(records) / cfg.batch_size)
    orders: dict[int, list[np.ndarray]] = {}

    def micro_batch(index: int) -> dict:
        epoch, pos = divmod(index, per_epoch)
        if epoch not in orders:
            orders.clear()
            orders[epoch] = batch_order(len(records), cfg.batch_size, seed, epoch)
        return make_batch(processor, [records[i] for i in orders[epoch][pos]], store)

    def save(step: int) -> None:
        state.update(step=step, skips=skips.state_dict(), fingerprint=fingerprint,
                     total_steps=steps, epoch=state["micro"] / per_epoch)
        common.save_training_state(ckpt_root / f"step-{step}", accelerator.unwrap_model(model),
                                   optimizer, scheduler, state)
        common.prune_checkpoints(ckpt_root, cfg.keep_checkpoints)

    bar = tqdm(total=steps, initial=resumed_step, desc="sft", unit="step", disable=not progress)
    status = "FAILED"
    try:
        if resume_from is None:
            logger.log_params({"sft": dataclasses.asdict(cfg), "start": str(start), "seed": seed,
                               "num_records": len(records), "total_steps": steps,
                               "trainable_params": n_trainable, "total_params": n_total})
        for step in range(resumed_step + 1, steps + 1):
            t0 = time.perf_counter()
            batches = [micro_batch(state["micro"] + i) for i in range(cfg.grad_accum)]
            state["micro"] += cfg.grad_accum
            n_targets = sum(count_targets(b["labels"]) for b in batches)
            n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
            lr = optimizer.param_groups[0]["lr"]
            loss_value, ok = 0.0, True
            for batch in batches:
                batch = {k: v.to(dev) for k, v in batch.items()}
                loss_sum, _ = compute_loss(model, batch)
                loss = loss_sum / max(1, n_targets)
                if not torch.isfinite(loss):
                    loss_value, ok = float(loss.detach()), False
                    break
                accelerator.backward(loss)
                loss_value += float(loss.detach())
            grad_norm = common.clip_gradients(params, cfg.max_grad_norm) if ok else float("nan")
            ok = ok and math.isfinite(grad_norm)
            if ok:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with warnings.catch_warnings():  # torch warns when a skipped step precedes any step
                warnings.simplefilter("ignore", UserWarning)
                scheduler.step()  # skipped steps advance the schedule too (it is indexed by step)
            dt = time.perf_counter() - t0
            state["elapsed_s"] += dt
            state["target_tokens"] += n_targets
            if ok:
                state["recent_losses"] = (state["recent_losses"] + [loss_value])[-RECENT:]
            else:
                print(f"sft: step {step}: non-finite loss or grad norm "
                      f"(loss={loss_value}, grad_norm={grad_norm}); step skipped")
            logger.log_metrics({
                "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                "tokens_per_s": n_tokens / dt, "step_time_s": dt, "target_tokens": n_targets,
                "epoch": state["micro"] / per_epoch, "skipped": float(not ok),
                "skipped_total": skips.total + (not ok),
            }, step=step)
            skips.update(ok, step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", refresh=False)
            if cfg.save_every and (step % cfg.save_every == 0 or step == steps):
                save(step)
        bar.close()
        recent = state["recent_losses"]
        metrics = {
            "final_loss": float(np.mean(recent)) if recent else float("nan"),
            "last_loss": recent[-1] if recent else float("nan"),
            "steps": steps,
            "epochs": state["micro"] / per_epoch,
            "train_time_s": round(state["elapsed_s"], 3),
            "skipped_steps": skips.total,
            "target_tokens": state["target_tokens"],
            "trainable_params": n_trainable,
            "total_params": n_total,
            "resumed_from_step": resumed_step or None,
        }
        exported = common.export_model(accelerator.unwrap_model(model), processor,
                                       out_dir / "model", dtype=_checkpoint_dtype(start))
        atomic_write_json(out_dir / "metrics.json", metrics)
        logger.log_metrics({"final_loss": metrics["final_loss"],
                            "train_time_s": metrics["train_time_s"],
                            "skipped_steps": metrics["skipped_steps"]}, step=steps)
        logger.log_artifact(out_dir / "metrics.json")
        status = "FINISHED"
    finally:
        bar.close()
        logger.close(status)
    return SFTResult(model=exported, processor=processor, metrics=metrics, out_dir=out_dir)
