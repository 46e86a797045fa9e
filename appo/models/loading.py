"""Load a policy + processor from a local Qwen2/2.5-VL checkpoint directory (tiny or real).

One code path for every checkpoint: the tiny default, an SFT output, an RL output, or a real
Qwen2.5-VL-3B/7B directory. Nothing is fetched from a hub (``local_files_only``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

SUPPORTED_MODEL_TYPES = ("qwen2_5_vl", "qwen2_vl")


class ModelError(ValueError):
    """The checkpoint directory is missing or is not a usable Qwen2/2.5-VL model."""


def resolve_checkpoint(path: str | Path) -> Path:
    """Follow the ``checkpoint.json`` pointer the init_model stage writes for real checkpoints."""
    pointer = Path(path) / "checkpoint.json"
    if pointer.is_file():
        return Path(json.loads(pointer.read_text())["path"])
    return Path(path)


#: A Qwen2/2.5-VL processor needs one of these (older transformers wrote the first).
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def check_checkpoint(path: str | Path) -> dict:
    """Validate ``path`` as a Qwen2/2.5-VL checkpoint directory; returns its config dict."""
    path = resolve_checkpoint(path)
    if not path.is_dir():
        raise ModelError(f"{path}: checkpoint directory not found")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{path}: no config.json, so this is not a Hugging Face checkpoint")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{config_file}: not valid JSON ({exc})") from exc
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"{config_file}: model_type is {model_type!r}; expected one of "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (a Qwen2-VL or Qwen2.5-VL checkpoint)"
        )
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ModelError(f"{path}: no weight files (*.safetensors or *.bin)")
    if not (path / "tokenizer.json").is_file() and not (path / "vocab.json").is_file():
        raise ModelError(f"{path}: no tokenizer files (tokenizer.json or vocab.json)")
    if not any((path / name).is_file() for name in PROCESSOR_FILES):
        raise ModelError(f"{path}: no processor config ({' or '.join(PROCESSOR_FILES)}); copy "
                         "it from the checkpoint the model was fine-tuned from")
    for weights in sorted(path.glob("*.safetensors")):
        _check_safetensors(weights)
    return config


def _check_safetensors(path: Path) -> None:
    """A truncated or corrupt ``.safetensors`` file is a :class:`ModelError` naming it.

    Reads only the header (its length, its JSON and the end of the last tensor), so a
    copy cut short is reported before transformers fails deep inside loading.
    """
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"),
                  default=0)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise ModelError(f"{path}: not a readable safetensors file ({exc})") from exc
    if 8 + n + end > size:
        raise ModelError(f"{path}: truncated ({size} bytes, the header needs {8 + n + end})")


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` means bf16 on CUDA (the published recipes) and fp32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ModelError(f"model.dtype {dtype!r} is not one of auto, {', '.join(table)}")
    return table[dtype]


def load_processor(path: str | Path):
    from transformers import AutoProcessor

    check_checkpoint(path)
    return AutoProcessor.from_pretrained(str(resolve_checkpoint(path)), local_files_only=True)


def load_policy(
    path: str | Path,
    dtype: str = "auto",
    attn_implementation: str = "sdpa",
    device: str = "auto",
):
    """(model, processor) from a local checkpoint; the model is on ``device`` in eval mode."""
    from transformers import AutoModelForImageTextToText

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    check_checkpoint(path)
    dev = resolve_device(device)
    model = AutoModelForImageTextToText.from_pretrained(
        str(resolve_checkpoint(path)),
        dtype=resolve_dtype(dtype, dev),
        attn_implementation=attn_implementation,
        local_files_only=True,
    ).to(dev)
    model.eval()
    return model, load_processor(path)


def save_checkpoint(model, processor, out_dir: str | Path, state_dict: dict | None = None) -> Path:
    """Write a checkpoint directory loadable by :func:`load_policy` (weights + processor).

    ``state_dict`` replaces the model's own tensors (e.g. the full weights gathered from FSDP
    shards)."""
    from appo.io import atomic_dir

    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        processor.save_pretrained(tmp)
    return Path(out_dir)
