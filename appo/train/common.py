"""Training utilities shared by the SFT loop and the RL trainer.

Everything a training loop needs besides its loss: seeding and RNG state capture/restore,
freezing the vision tower, LoRA wrapping and merging, AdamW with linear warmup + cosine decay,
gradient clipping with a counter of non-finite (skipped) steps, the accelerate ``Accelerator``
(bf16 autocast on CUDA, none on CPU) and resumable checkpoints of the training state.

A resumable checkpoint ``<root>/step-N`` holds the *trainable* parameters
(``trainable.safetensors``; frozen ones are re-read from the start checkpoint on resume), the
optimizer and scheduler states, every RNG state and a free-form ``state.json`` (step, data
position, MLflow run id, ...). It is written atomically, so a killed run leaves complete
checkpoints only. The final model is exported separately with :func:`export_model`, as a plain
checkpoint directory that :func:`appo.models.loading.load_policy` loads.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import shutil
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from appo.config import LORA_TARGETS, MIXED_PRECISIONS
from appo.io import atomic_dir

__all__ = [
    "LORA_TARGETS",
    "CheckpointError",
    "SkipCounter",
    "apply_lora",
    "build_optimizer",
    "build_scheduler",
    "capture_rng_state",
    "clip_gradients",
    "config_fingerprint",
    "count_parameters",
    "export_model",
    "freeze_vision_tower",
    "is_lora",
    "latest_checkpoint",
    "latest_readable_checkpoint",
    "list_checkpoints",
    "load_training_state",
    "lr_factor",
    "make_accelerator",
    "prepare_for_training",
    "prune_checkpoints",
    "read_training_state",
    "resolve_mixed_precision",
    "restore_rng_state",
    "save_training_state",
    "seed_everything",
    "trainable_parameters",
]

TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


# --------------------------------------------------------------------------------------------
# Seeding and RNG state
# --------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every CUDA device too)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def capture_rng_state() -> dict[str, Any]:
    """Every global RNG state, in a form ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states only when the device count matches)."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# --------------------------------------------------------------------------------------------
# Model preparation: freezing, LoRA, gradient checkpointing
# --------------------------------------------------------------------------------------------


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) pairs with ``requires_grad`` (tied weights once)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _vision_module(model: torch.nn.Module) -> torch.nn.Module | None:
    for name, module in model.named_modules():
        if name.split(".")[-1] == "visual":
            return module
    return None


def freeze_vision_tower(model: torch.nn.Module) -> int:
    """Freeze the whole vision tower (``visual``: ViT blocks and merger); returns #params frozen."""
    visual = _vision_module(model)
    if visual is None:
        raise ValueError(f"{type(model).__name__} has no 'visual' module to freeze")
    frozen = 0
    for p in visual.parameters():
        if p.requires_grad:
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


def apply_lora(model: torch.nn.Module, r: int = 16, alpha: int = 32, dropout: float = 0.0,
               target_modules: Iterable[str] = LORA_TARGETS, include_vision: bool = False):
    """Wrap ``model`` in peft LoRA adapters on the named linear layers (all else frozen).

    With ``include_vision`` false (the default) the vision tower gets no adapters even where
    its layers share a name (its MLP also has ``gate_proj``/``up_proj``/``down_proj``).
    """
    from peft import LoraConfig, get_peft_model

    names = "|".join(re.escape(m) for m in target_modules)
    if not names:
        raise ValueError("LoRA needs at least one target module name")
    pattern = rf".*\.({names})" if include_vision else rf"^(?!.*\bvisual\b).*\.({names})"
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern,
                        bias="none")
    with warnings.catch_warnings():  # peft reads transformers' deprecated checkpointing alias
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return get_peft_model(model, config)


def is_lora(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def prepare_for_training(model: torch.nn.Module, *, freeze_vision: bool = True,
                         gradient_checkpointing: bool = False, lora: dict | None = None):
    """Train mode, vision freezing, gradient checkpointing and optional LoRA, in that order.

    ``lora`` holds :func:`apply_lora` keyword arguments (None = full fine-tuning). Returns the
    model to train (a ``PeftModel`` with LoRA).
    """
    model.train()
    if freeze_vision:
        freeze_vision_tower(model)
    if gradient_checkpointing:
        # Non-reentrant checkpointing needs no input grads, so frozen embeddings/ViT are fine.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora is not None:
        model = apply_lora(model, **lora)
        model.train()
    if not trainable_parameters(model):
        raise ValueError("nothing to train: every parameter is frozen")
    return model


def export_model(model: torch.nn.Module, processor, out_dir: str | Path,
                 dtype: torch.dtype | None = None,
                 state_dict: dict | None = None) -> torch.nn.Module:
    """Save a plain checkpoint loadable by ``load_policy``; returns the exported module.

    LoRA adapters are merged into the base weights first (the returned module is the merged
    base model), gradient checkpointing is switched off, and the weights are cast to ``dtype``
    when given (e.g. back to the start checkpoint's bf16 after fp32 training). ``state_dict``
    (full weights gathered from FSDP shards) is written instead of the module's own tensors.
    """
    from appo.models.loading import save_checkpoint

    if is_lora(model):
        model = model.merge_and_unload()
    if hasattr(type(model), "is_activation_checkpointing"):  # transformers >= 5.2x
        checkpointing = model.is_activation_checkpointing
    else:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if checkpointing:
        model.gradient_checkpointing_disable()
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    if state_dict is not None and dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v
                      for k, v in state_dict.items()}
    save_checkpoint(model, processor, out_dir, state_dict=state_dict)
    return model


# --------------------------------------------------------------------------------------------
# Optimizer, schedule, clipping, skipped steps
# --------------------------------------------------------------------------------------------


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.0,
                    betas: Iterable[float] = (0.9, 0.999), eps: float = 1e-8
                    ) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on biases and norm weights (1-D)."""
    decay, no_decay = [], []
    for _, p in trainable_parameters(model):
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    b1, b2 = tuple(betas)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(b1, b2), eps=eps)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based).

    Linear warmup (step+1)/warmup over the first ``warmup_steps`` steps (the last warmup step
    reaches the peak, the first does not waste a step at lr 0), then cosine decay from 1 at
    step ``warmup_steps`` to ``min_lr_ratio`` at the last step ``total_steps - 1``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = total_steps - 1 - warmup_steps
    if span <= 0:
        return 1.0  # no step left to decay over
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR with :func:`lr_factor`; call ``step()`` once per optimizer step (skipped too)."""

    def factor(step: int) -> float:
        return lr_factor(step, warmup_steps, total_steps, min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clip_gradients(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> float:
    """Total L2 grad norm (before clipping); clips to ``max_norm`` when it is > 0.

    Returns ``nan``/``inf`` for non-finite gradients (nothing is raised): the caller skips the
    step. Parameters without a gradient are ignored.
    """
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    limit = max_norm if max_norm > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, limit, error_if_nonfinite=False)
    return float(norm)


@dataclass
class SkipCounter:
    """Counts skipped (non-finite) steps; too many in a row is an error naming the step."""

    max_consecutive: int
    total: int = 0
    consecutive: int = 0

    def update(self, ok: bool, step: int) -> None:
        if ok:
            self.consecutive = 0
            return
        self.total += 1
        self.consecutive += 1
        if self.consecutive > self.max_consecutive:
            raise RuntimeError(
                f"step {step}: {self.consecutive} non-finite steps in a row (loss or grad norm "
                f"is nan/inf), more than max_bad_steps={self.max_consecutive}; lower the lr, "
                "check the data, or raise max_bad_steps"
            )

    def state_dict(self) -> dict[str, int]:
        return {"total": self.total, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.total, self.consecutive = int(state["total"]), int(state["consecutive"])


# --------------------------------------------------------------------------------------------
# Accelerator
# --------------------------------------------------------------------------------------------


def resolve_mixed_precision(mixed_precision: str, device_type: str) -> str:
    """``auto`` -> bf16 autocast on CUDA, none elsewhere; ``no`` and ``bf16`` pass through."""
    if mixed_precision == "auto":
        return "bf16" if device_type == "cuda" else "no"
    if mixed_precision not in MIXED_PRECISIONS:
        raise ValueError(f"mixed_precision {mixed_precision!r} is not one of auto, no, bf16")
    return mixed_precision


def make_accelerator(mixed_precision: str = "auto", device: str = "auto",
                     multi_process: bool = False):
    """An ``accelerate.Accelerator`` on ``device`` (auto: CUDA when present).

    ``prepare(model, ...)`` then places the model, wraps its forward in bf16 autocast (on CUDA
    by default) and, under ``accelerate launch``, in DDP/FSDP. Loops that shard no data (SFT)
    pass ``multi_process=False`` and refuse a multi-process launch.
    """
    from accelerate import Accelerator

    from appo.models.loading import resolve_device

    dev = resolve_device(device)
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(mixed_precision, dev.type),
                              cpu=dev.type == "cpu")
    if accelerator.num_processes > 1 and not multi_process:
        raise RuntimeError("multi-process (data-parallel) training is not supported here; "
                           "run one process per GPU job")
    return accelerator


# --------------------------------------------------------------------------------------------
# Resumable checkpoints
# --------------------------------------------------------------------------------------------


def config_fingerprint(obj: Any) -> str:
    """Short stable hash of a JSON-able object (to refuse resuming a different configuration)."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a Python file: a full disk is then an OSError (ENOSPC), not the
    RuntimeError torch's own writer raises for any failed write."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def save_training_state(ckpt_dir: str | Path, model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                        state: dict[str, Any] | None = None) -> Path:
    """Write a resumable checkpoint directory atomically (see the module docstring)."""
    from safetensors.torch import save_file

    with atomic_dir(ckpt_dir) as tmp:
        weights = {n: p.detach().cpu().contiguous() for n, p in trainable_parameters(model)}
        save_file(weights, str(tmp / TRAINABLE_FILE))
        if optimizer is not None:
            _torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
        if scheduler is not None:
            _torch_save(scheduler.state_dict(), tmp / "scheduler.pt")
        _torch_save(capture_rng_state(), tmp / "rng.pt")
        (tmp / STATE_FILE).write_text(json.dumps(state or {}, indent=2, sort_keys=True) + "\n")
    return Path(ckpt_dir)


class CheckpointError(RuntimeError):
    """A checkpoint's files cannot be read (truncated or corrupt): resume from an older one."""


def read_training_state(ckpt_dir: str | Path) -> dict[str, Any]:
    """Every file of a :func:`save_training_state` checkpoint, read into memory.

    Reading all files before applying any of them means a torn checkpoint is noticed before
    the live model or optimizer is touched; any read failure is a :class:`CheckpointError`
    naming the file.
    """
    from safetensors.torch import load_file

    ckpt_dir = Path(ckpt_dir)
    readers = {
        "weights": (TRAINABLE_FILE, lambda p: load_file(str(p))),
        "optimizer": ("optimizer.pt", lambda p: torch.load(p, weights_only=True)),
        "scheduler": ("scheduler.pt", lambda p: torch.load(p, weights_only=True)),
        "rng": ("rng.pt", lambda p: torch.load(p, weights_only=True)),
        "state": (STATE_FILE, lambda p: json.loads(p.read_text())),
    }
    loaded: dict[str, Any] = {}
    for key, (name, read) in readers.items():
        path = ckpt_dir / name
        if not path.exists() and key in ("optimizer", "scheduler"):
            continue  # saved without one (optional in save_training_state)
        try:
            loaded[key] = read(path)
        except Exception as exc:  # safetensors, torch's zip reader and json raise their own
            raise CheckpointError(f"{path}: unreadable ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else 'truncated'})"
                                  ) from exc
    if not isinstance(loaded["state"], dict):
        raise CheckpointError(f"{ckpt_dir / STATE_FILE}: not a JSON object")
    return loaded


def load_training_state(ckpt_dir: str | Path, model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                        restore_rng: bool = True, loaded: dict[str, Any] | None = None
                        ) -> dict[str, Any]:
    """Load a checkpoint from :func:`save_training_state` into live objects; returns its state.

    ``loaded`` is the checkpoint as :func:`read_training_state` (or
    :func:`latest_readable_checkpoint`) already read it. The model must be prepared exactly as
    when saving (same frozen parts, same LoRA wrapping): a missing or extra trainable tensor is
    an error naming it.
    """
    ckpt_dir = Path(ckpt_dir)
    loaded = read_training_state(ckpt_dir) if loaded is None else loaded
    weights = loaded["weights"]
    params = dict(trainable_parameters(model))
    missing, extra = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if missing or extra:
        raise RuntimeError(
            f"{ckpt_dir}: trainable parameters differ from the model being resumed "
            f"(missing {missing[:3]}, unexpected {extra[:3]}); freeze_vision/lora changed?")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name].to(p.device, p.dtype))
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(loaded["scheduler"])
    if restore_rng:
        restore_rng_state(loaded["rng"])
    return loaded["state"]


def latest_readable_checkpoint(root: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint under ``root`` whose files all read, with its contents.

    A checkpoint torn outside the atomic write (a full disk on a later sync, a truncated copy)
    is skipped with a warning naming the file, so the rerun continues from the previous
    complete one instead of stopping with a traceback. None when no checkpoint reads.
    """
    for _, path in reversed(list_checkpoints(root)):
        try:
            return path, read_training_state(path)
        except CheckpointError as exc:
            print(f"warning: {exc}; falling back to the previous checkpoint", file=sys.stderr)
    return None


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete ``step-N`` checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    checkpoints = list_checkpoints(root)
    return checkpoints[-1][1] if checkpoints else None


def prune_checkpoints(root: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (keep <= 0 keeps all); returns deleted."""
    if keep <= 0:
        return []
    old = [path for _, path in list_checkpoints(root)[:-keep]]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old
