"""Typed, validated view of ``params.yaml``: one dataclass per stage section.

Every knob of the pipeline lives in ``params.yaml``; this module is the only place that reads
it. Loading is strict on purpose: an unknown key (usually a typo) or a wrong type fails with a
message naming the dotted key, because a silently ignored knob makes an ablation lie.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """params.yaml is malformed: the message names the dotted key and what was expected."""


@dataclass
class SyntheticConfig:
    """Difficulty knobs of the generated key-frame video-QA benchmark."""

    num_frames: int = 16  # frames written per video
    fps: float = 4.0
    size: int = 56  # square frame side in pixels
    object_size: int = 14  # side of the flashed square/shape
    noise: float = 6.0  # std of per-pixel Gaussian noise (0-255 scale)
    distractors: int = 1  # grey distractor shapes per frame
    families: list[str] = field(
        default_factory=lambda: ["flash_color", "flash_shape", "count", "order"]
    )
    sft: int = 512  # questions per split (splits use disjoint seeds)
    rl: int = 256
    val: int = 64
    test: int = 128


@dataclass
class DataConfig:
    """Which dataset the pipeline trains and evaluates on."""

    source: str = "synthetic"  # synthetic | files
    out_dir: str = "data/dataset"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    # source == files: split -> annotation file (Video-R1 JSON/JSONL, NExT-GQA, SEED-Bench-R1)
    files: dict[str, str] = field(default_factory=dict)
    video_root: str | None = None
    image_root: str | None = None
    strip_prefix: str | None = None


@dataclass
class FramesConfig:
    """Frame sampling for the decord extraction stage (Qwen merges 2 frames per temporal patch)."""

    out_dir: str = "data/frames"
    num_frames: int = 8  # uniform sampling; must be even
    fps: float | None = None  # sample by fps instead (capped at max_frames)
    max_frames: int = 16
    max_pixels: int = 56 * 56  # per-frame pixel budget; frames are resized to fit
    workers: int = 2


@dataclass
class TinyModelConfig:
    """Size of the embedded, randomly initialised Qwen2.5-VL-architecture model."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vision_depth: int = 2
    vision_hidden_size: int = 64
    vision_heads: int = 2
    vision_intermediate_size: int = 128
    patch_size: int = 14
    spatial_merge_size: int = 2
    vocab_size: int = 640  # BPE trained on the synthetic corpus, special tokens included
    seed: int = 0


@dataclass
class ModelConfig:
    """The policy: a local Qwen2.5-VL checkpoint directory or the tiny default."""

    path: str | None = None  # local checkpoint dir; null -> the tiny model is built
    out_dir: str = "models/init"
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2
    device: str = "auto"


def _check_dataclass(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'params'}: expected a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown key '{key}' (known: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, f"{where}.{name}" if where else name)
              for name, value in raw.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _check_dataclass(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"'{where}': {value!r} fits none of {tp}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"'{where}' must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{where}' must be a mapping, got {value!r}")
        key_tp, val_tp = typing.get_args(tp)
        return {_coerce(key_tp, k, where): _coerce(val_tp, v, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"'{where}' must be {tp.__name__}, got a boolean {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"'{where}' must be {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type, raw: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    return _check_dataclass(cls, raw, where)


def load_section(cls: type, section: str, path: str | Path = "params.yaml") -> Any:
    """Load and validate one top-level section of params.yaml (missing section -> defaults)."""
    params = load_yaml(path)
    return from_dict(cls, params.get(section) or {}, section)


def load_yaml(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read params.yaml with a clear error for a missing file or YAML syntax error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of stage sections")
    return data
