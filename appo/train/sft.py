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
from appo.train import common
from appo.train.loop import Loop, find_checkpoint, resume_knobs
from appo.train.loop import run as run_loop

# Knobs that may change between a run and its resumption (they do not change the result).
RESUME_SAFE = {"save_every", "keep_checkpoints", "resume", "out_dir"}
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
    knobs = resume_knobs(cfg, RESUME_SAFE)
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


class SFTTask:
    """SFT's steps for :mod:`appo.train.loop`: ``grad_accum`` micro-batches of the seeded
    epoch order per optimizer step; a non-finite loss or gradient norm skips the step."""

    def __init__(self, cfg: SFTConfig, records: Sequence[VideoQA], store: FrameStore, model,
                 processor, optimizer, scheduler, accelerator, *, seed: int, steps: int,
                 parameters: tuple[int, int], resumed_from: int = 0,
                 export_dtype: torch.dtype | None = None) -> None:
        """``parameters``: (trainable, total) counts; ``resumed_from``: the step a resume
        starts at; ``export_dtype``: the dtype the model is exported in (the start's)."""
        self.cfg, self.records, self.store, self.seed = cfg, list(records), store, seed
        self.parameters, self.resumed_from, self.export_dtype = parameters, resumed_from, export_dtype
        self.model, self.processor, self.accelerator = model, processor, accelerator
        self.optimizer, self.scheduler, self.steps = optimizer, scheduler, steps
        self.params = [p for _, p in common.trainable_parameters(model)]
        self.per_epoch = math.ceil(len(self.records) / cfg.batch_size)
        self.skips = common.SkipCounter(cfg.max_bad_steps)
        self.step, self.micro, self.elapsed_s, self.target_tokens = 0, 0, 0.0, 0
        self.recent_losses: list[float] = []
        self._orders: dict[int, list[np.ndarray]] = {}
        self.exported: torch.nn.Module | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "micro": self.micro, "elapsed_s": self.elapsed_s,
                "target_tokens": self.target_tokens, "recent_losses": self.recent_losses,
                "skips": self.skips.state_dict(), "total_steps": self.steps,
                "epoch": self.micro / self.per_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.micro = state["step"], state["micro"]
        self.elapsed_s, self.target_tokens = state["elapsed_s"], state["target_tokens"]
        self.recent_losses = list(state["recent_losses"])
        self.skips.load_state_dict(state["skips"])

    def _micro_batch(self, index: int) -> dict:
        epoch, pos = divmod(index, self.per_epoch)
        if epoch not in self._orders:
            self._orders.clear()
            self._orders[epoch] = batch_order(len(self.records), self.cfg.batch_size,
                                              self.seed, epoch)
        return make_batch(self.processor, [self.records[i] for i in self._orders[epoch][pos]],
                          self.store)

    def train_step(self) -> dict[str, float]:
        cfg, optimizer = self.cfg, self.optimizer
        self.step += 1
        t0 = time.perf_counter()
        batches = [self._micro_batch(self.micro + i) for i in range(cfg.grad_accum)]
        self.micro += cfg.grad_accum
        n_targets = sum(count_targets(b["labels"]) for b in batches)
        n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        lr = optimizer.param_groups[0]["lr"]
        loss_value, ok = 0.0, True
        for batch in batches:
            batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
            loss_sum, _ = compute_loss(self.model, batch)
            loss = loss_sum / max(1, n_targets)
            if not torch.isfinite(loss):
                loss_value, ok = float(loss.detach()), False
                break
            self.accelerator.backward(loss)
            loss_value += float(loss.detach())
        grad_norm = common.clip_gradients(self.params, cfg.max_grad_norm) if ok else float("nan")
        ok = ok and math.isfinite(grad_norm)
        if ok:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # torch warns when a skipped step precedes any step
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()  # skipped steps advance the schedule too (indexed by step)
        dt = time.perf_counter() - t0
        self.elapsed_s += dt
        self.target_tokens += n_targets
        if ok:
            self.recent_losses = (self.recent_losses + [loss_value])[-RECENT:]
        else:
            print(f"sft: step {self.step}: non-finite loss or grad norm "
                  f"(loss={loss_value}, grad_norm={grad_norm}); step skipped")
        metrics = {
            "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
            "tokens_per_s": n_tokens / dt, "step_time_s": dt, "target_tokens": n_targets,
            "epoch": self.micro / self.per_epoch, "skipped": float(not ok),
            "skipped_total": self.skips.total + (not ok),
        }
        self.skips.update(ok, self.step)
        return metrics

    def export(self, path: Path) -> None:
        self.exported = common.export_model(self.accelerator.unwrap_model(self.model),
                                            self.processor, path, dtype=self.export_dtype)

    def summary(self, elapsed: float) -> dict[str, Any]:
        recent = self.recent_losses
        n_trainable, n_total = self.parameters
        return {
            "final_loss": float(np.mean(recent)) if recent else float("nan"),
            "last_loss": recent[-1] if recent else float("nan"),
            "steps": self.steps,
            "epochs": self.micro / self.per_epoch,
            "train_time_s": round(self.elapsed_s, 3),
            "skipped_steps": self.skips.total,
            "target_tokens": self.target_tokens,
            "trainable_params": n_trainable,
            "total_params": n_total,
            "resumed_from_step": self.resumed_from or None,
        }


def train(cfg: SFTConfig, records: Sequence[VideoQA], store: FrameStore, start: str | Path, *,
          seed: int = 0, attn_implementation: str = "sdpa", device: str = "auto",
          progress: bool = True) -> SFTResult:
    """Run (or resume) SFT from checkpoint ``start``; see the module docstring for outputs."""
    from appo.models.loading import load_policy, resolve_checkpoint

    records = list(records)
    if not records:
        raise ValueError("the SFT split is empty")
    out_dir = Path(cfg.out_dir)
    steps = total_steps(cfg, len(records))
    ckpt_root = out_dir / "checkpoints"
    loop = Loop(out_dir, "sft", steps, cfg.save_every, cfg.keep_checkpoints,
                _fingerprint(cfg, str(resolve_checkpoint(start)), records, seed),
                mismatch="this checkpoint was written with a different SFT configuration, "
                         f"start checkpoint or data; delete {ckpt_root} or set sft.resume: false",
                resume=cfg.resume, save_last=True, step_base=1, tags={"stage": "sft"})
    found = find_checkpoint(loop)

    common.seed_everything(seed)
    accelerator = common.make_accelerator(cfg.mixed_precision, device)
    model, processor = load_policy(start, dtype=cfg.train_dtype, device=str(accelerator.device),
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
    task = SFTTask(cfg, records, store, model, processor, optimizer, scheduler, accelerator,
                   seed=seed, steps=steps, parameters=(n_trainable, n_total),
                   resumed_from=found[1]["state"]["step"] if found is not None else 0,
                   export_dtype=_checkpoint_dtype(start))
    params = {"sft": dataclasses.asdict(cfg), "start": str(start), "seed": seed,
              "num_records": len(records), "total_steps": steps,
              "trainable_params": n_trainable, "total_params": n_total}
    metrics = run_loop(
        task, loop, found, model=accelerator.unwrap_model(model), optimizer=optimizer,
        scheduler=scheduler, params=params,
        final=lambda m: {k: m[k] for k in ("final_loss", "train_time_s", "skipped_steps")},
        postfix=lambda m: {"loss": f"{m['loss']:.4f}", "lr": f"{m['lr']:.2e}"},
        progress=progress)
    return SFTResult(model=task.exported, processor=processor, metrics=metrics, out_dir=out_dir)
