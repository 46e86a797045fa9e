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

# --------------------------------------------------------------------------------------------
# Allowed values and shared defaults: written once here, imported by the modules that use them
# (this module imports nothing of appo, so every layer can read it).

DATA_SOURCES: tuple[str, ...] = ("synthetic", "files")
#: ``sft.mixed_precision`` / ``rl.mixed_precision``: bf16 autocast on CUDA for ``auto``.
MIXED_PRECISIONS: tuple[str, ...] = ("auto", "no", "bf16")
#: Loss aggregation over tokens (:func:`appo.rl.objectives.aggregate`).
AGG_MODES: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
#: How APPO's token weights enter the loss (:func:`appo.rl.objectives.policy_loss`).
WEIGHT_MODES: tuple[str, ...] = ("multiply", "additive")
#: APPO crucial-frame selection (paper names; the authors' code calls ``all`` "force-all" and
#: ``soft`` "hard"; the paper's ``hard`` has no code path there).
SELECT_LEVELS: tuple[str, ...] = ("all", "soft", "hard")
SELECT_STRATEGIES: tuple[str, ...] = ("topk-union", "all")
#: Where APPO's frame attention comes from: the policy's own, or seeded random scores (control).
ATTENTION_SOURCES: tuple[str, ...] = ("policy", "random")
#: How APPO's weights are placed: by divergence (APPO), or the group's mean everywhere (control).
WEIGHT_PLACEMENTS: tuple[str, ...] = ("divergence", "uniform")
#: T-GRPO's bonus condition: ``ratio`` p >= ratio * p~ (published code), ``greater`` p > p~.
TEMPORAL_CONDITIONS: tuple[str, ...] = ("ratio", "greater")
#: Rollout KV cache: ``auto`` = static + compiled decoding on CUDA, dynamic elsewhere.
CACHE_MODES: tuple[str, ...] = ("auto", "static", "dynamic")
#: What the RL stage does with a question whose prompt is over ``rl.max_prompt_tokens``.
LONG_PROMPTS: tuple[str, ...] = ("drop", "error")
#: ``eval.missing``: a question whose video is missing scores 0, or is left out (still listed).
MISSING_POLICIES: tuple[str, ...] = ("wrong", "exclude")
#: ``eval.protocol`` names (their settings: :data:`appo.eval.protocol.PROTOCOLS`).
EVAL_PROTOCOLS: tuple[str, ...] = ("pipeline", "videor1", "appo")
#: Reward components a ``rl.reward_weights`` key may name (:mod:`appo.rl.rewards`).
REWARD_COMPONENTS: tuple[str, ...] = ("accuracy", "format", "iou")
#: The published APPO reward mix (``rl.reward_weights`` default).
DEFAULT_REWARD_WEIGHTS: dict[str, float] = {"accuracy": 0.9, "format": 0.1}
#: Language-model projections that get LoRA adapters.
LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                 "down_proj")
#: Variants evaluated once, independently of the RL seed (their own eval stages).
BASELINES: tuple[str, ...] = ("base", "sft")


class ConfigError(ValueError):
    """params.yaml is malformed: the message names the dotted key and what was expected.

    With ``key`` the message reads ``<what> (<key>)``; a key raised inside a section's
    ``__post_init__`` is relative to that section, and :func:`from_dict` prefixes the section's
    dotted path once (``lr`` -> ``rl.lr``), so each rule names its field only.
    """

    def __init__(self, what: str, key: str | None = None, qualified: bool = False) -> None:
        super().__init__(f"{what} ({key})" if key else what)
        self.what, self.key, self.qualified = what, key, qualified


def _require(ok: bool, key: str, value: Any, rule: str) -> None:
    """One validation rule: ``value`` of field ``key`` must be ``rule`` (a phrase)."""
    if not ok:
        raise ConfigError(f"{value!r} is not {rule}", key=key)


@dataclass
class SyntheticConfig:
    """Difficulty knobs of the generated key-frame video-QA benchmark."""

    num_frames: int = 16  # frames written per video
    fps: float = 4.0
    size: int = 56  # square frame side in pixels
    object_size: int = 14  # side of the flashed squares and the grey distractors
    shape_size: int = 28  # side of the flashed shape (flash_shape): a shape needs more pixels
    # flash_shape is placed at multiples of this many pixels (0: anywhere). A shape cut at a
    # random offset across the tiny model's 14-pixel patches stayed at chance after SFT.
    shape_grid: int = 14
    count_max: int = 4  # count: the white square flashes 1..count_max times
    noise: float = 6.0  # std of per-pixel Gaussian noise (0-255 scale)
    distractors: int = 1  # grey distractor shapes per frame
    event_frames: int = 2  # a flash lasts this many frames (starts at a multiple of it)
    families: list[str] = field(
        default_factory=lambda: ["flash_color", "flash_shape", "count", "order"]
    )
    # Families of the sft split (None: ``families``). A family left out of the warm start is
    # one only RL's outcome reward can teach: the headroom the algorithms are compared on.
    sft_families: list[str] | None = None
    # The sft split's chains of thought come from a simulated teacher that misperceives: on a
    # question of appo.data.synthetic.TEACHER_CONFUSIONS (3 or 4 count flashes) it reports one
    # flash fewer with this probability. Above 0.5 the warm start inherits the error, and RL's
    # verified reward can correct it.
    teacher_error: float = 0.0
    sft: int = 512  # questions per split (splits use disjoint seeds)
    rl: int = 256
    val: int = 64
    test: int = 128

    def __post_init__(self) -> None:
        _require(0.0 <= self.teacher_error <= 1.0, "teacher_error", self.teacher_error,
                 "a probability in [0, 1]")


@dataclass
class FileSpec:
    """One annotation file with its own path layout: ``{path: ..., video_root: ...}``.

    A ``data.files`` or ``eval.benchmarks`` entry is a plain path or this mapping; its unset
    roots fall back to the section's, so files laid out differently (Video-R1's
    ``./Evaluation/...``, SEED-Bench-R1's ``videos/<source>/...``) live in one config.
    """

    path: str = ""
    video_root: str | None = None
    image_root: str | None = None
    strip_prefix: str | None = None

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("'path' is missing (the annotation file of this entry)")


#: A ``data.files`` / ``eval.benchmarks`` value: an annotation file path or a :class:`FileSpec`.
AnnotationFile = str | FileSpec


@dataclass
class DataConfig:
    """Which dataset the pipeline trains and evaluates on."""

    source: str = "synthetic"  # synthetic | files
    out_dir: str = "data/dataset"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    # source == files: split -> annotation file (Video-R1 JSON/JSONL, NExT-GQA JSON or CSV,
    # SEED-Bench-R1), a path or {path, video_root, image_root, strip_prefix}
    files: dict[str, AnnotationFile] = field(default_factory=dict)
    video_root: str | None = None
    image_root: str | None = None
    strip_prefix: str | None = None

    def __post_init__(self) -> None:
        _require(self.source in DATA_SOURCES, "source", self.source,
                 f"one of {', '.join(DATA_SOURCES)}")


@dataclass
class FramesConfig:
    """Frame sampling for the decord extraction stage (Qwen merges 2 frames per temporal patch)."""

    out_dir: str = "data/frames"
    num_frames: int = 8  # uniform sampling; must be even
    fps: float | None = None  # sample by fps instead (capped at max_frames)
    max_frames: int = 16
    max_pixels: int = 56 * 56  # per-frame pixel budget; frames are resized to fit
    workers: int = 2

    def __post_init__(self) -> None:
        for name in ("num_frames", "max_frames"):  # Qwen2.5-VL merges 2 frames per patch
            value = getattr(self, name)
            _require(value >= 2 and value % 2 == 0, name, value, "an even number >= 2")
        _require(self.fps is None or self.fps > 0, "fps", self.fps, "> 0 (or null)")
        _require(self.max_pixels >= 1, "max_pixels", self.max_pixels, ">= 1")


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
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        if exc.key is not None and not exc.qualified:
            key = f"{where}.{exc.key}" if where else exc.key
            raise ConfigError(exc.what, key=key, qualified=True) from None
        if exc.key is None and where and not str(exc).startswith(where):
            raise ConfigError(f"{where}: {exc}") from exc
        raise


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _check_dataclass(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        structured = [arg for arg in args if dataclasses.is_dataclass(arg)]
        if isinstance(value, dict) and len(structured) == 1:
            return _coerce(structured[0], value, where)  # its error names the wrong key
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


def cpu_threads(params: dict[str, Any], path: str | Path = "params.yaml") -> int:
    """The top-level ``threads`` knob: torch CPU threads per stage process (0 = torch's default).

    Pinned because results depend on it: the order of floating-point reductions follows the
    thread count, and the tiny default's SFT amplifies a last-bit difference into a different
    warm start (docs/calibration.md). With a fixed count a run reproduces on any machine with
    as many cores and the same CPU kernels.
    """
    value = params.get("threads", 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{path}: must be an integer >= 0 (0 = torch's default), got "
                          f"{value!r}", key="threads")
    return value


#: The published number of perception tokens per crucial frame and response (SEED-Bench-R1,
#: answers of up to 384 tokens); NExT-GQA uses 512.
DEFAULT_K = 128


@dataclass
class PerceptionConfig:
    """APPO's token weighting (docs/method.md, with the authors' defaults).

    Perception tokens per crucial frame and response: set at most one of ``K`` (absolute; keep
    the paper's 128, or 512 for NExT-GQA, with a real model and long answers) and
    ``K_fraction`` (of ``rl.max_new_tokens``; the paper's 128 of 384 tokens is 1/3). Both set is
    an error (an override of one must not be silently ignored); neither set means ``K = 128``.
    :meth:`tokens_per_frame` is the one place that resolves the effective K. With ``K`` at or
    above the response length every valid token is a perception token of every crucial frame,
    so the weights no longer depend on where the tokens look.

    ``k_avg`` (15) is capped at a response's valid tokens by :func:`frame_scores`; with short
    answers (the default 40 tokens) a frame score averages over a good share of the response.

    Controls for the attention signal: ``attention: random`` replaces the policy's frame
    attention by seeded random scores (no capture forward hooks); ``weights: uniform`` gives
    every valid token of a group the group's mean APPO weight (same total emphasis, placed by
    neither attention nor divergence).
    """

    enabled: bool = False
    layers: list[int] = field(default_factory=lambda: [-1, -2, -3])  # decoder layers read
    k_avg: int = 15  # top-k tokens averaged into a frame score (capped at the response length)
    k_f: int = 3  # top frames per response
    K: int | None = None  # perception tokens per crucial frame and response (None: see below)
    K_fraction: float | None = None  # K = max(1, round(K_fraction * rl.max_new_tokens)), (0, 1]
    w_max: float = 1.7  # weights lie in [1, w_max]
    select_level: str = "all"  # all (code: force-all) | soft (code: hard) | hard (paper only)
    select_strategy: str = "topk-union"  # topk-union | all
    attention: str = "policy"  # policy (captured frame attention) | random (seeded control)
    weights: str = "divergence"  # divergence (APPO) | uniform (the group's mean weight, control)
    tau: float = 0.5  # accuracy threshold splitting the group into S1 / S2
    weights_grad: bool = False  # authors' code lets gradient flow through the weights
    query_chunk: int = 128

    def __post_init__(self) -> None:
        _one_of("attention", self.attention, ATTENTION_SOURCES)
        _one_of("weights", self.weights, WEIGHT_PLACEMENTS)
        if self.K is not None and self.K_fraction is not None:
            raise ConfigError(f"'K' ({self.K}) and 'K_fraction' ({self.K_fraction}) are both "
                              "set; set one of them and the other to null")
        if self.K is not None and self.K < 1:
            raise ConfigError(f"'K' must be >= 1, got {self.K}")
        if self.K_fraction is not None and not 0 < self.K_fraction <= 1:
            raise ConfigError(f"'K_fraction' must be in (0, 1], got {self.K_fraction}")
        for name in ("k_avg", "k_f", "query_chunk"):
            _require(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        _require(0 <= self.tau <= 1, "tau", self.tau, "in [0, 1]")

    def tokens_per_frame(self, max_new_tokens: int) -> int:
        """The effective K: ``max(1, round(K_fraction * max_new_tokens))`` when ``K_fraction``
        is set, else ``K`` (default :data:`DEFAULT_K`)."""
        if self.K_fraction is not None:
            return max(1, round(self.K_fraction * max_new_tokens))
        return DEFAULT_K if self.K is None else self.K


@dataclass
class TemporalConfig:
    """Video-R1's T-GRPO reward terms (temporal contrast on shuffled frames, length bonus)."""

    enabled: bool = False
    shuffled_fraction: float = 0.5  # G' = G * fraction responses on shuffled frames
    bonus: float = 0.3
    condition: str = "ratio"  # ratio: p >= ratio * p~ (published code) | greater: p > p~ (paper)
    ratio: float = 0.8
    length_bonus: float = 0.0  # Video-R1's optional +0.2 for correct answers of suitable length
    length_min: int = 320
    length_max: int = 512


@dataclass
class AlgorithmConfig:
    """The objective knobs; GRPO, DAPO and APPO are presets of these (params.yaml rl.algorithms)."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    agg_mode: str = "seq-mean-token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm
    beta: float = 0.04  # KL(k3) to the frozen reference policy; 0 = no reference model
    scale_std: bool = True  # false = Dr. GRPO advantages
    dynamic_sampling: bool = False  # DAPO: drop groups with equal rewards, resample
    max_sampling_rounds: int = 3
    overlong_buffer: int = 0  # DAPO soft overlong punishment window (tokens)
    overlong_penalty: float = 1.0
    weight_mode: str = "multiply"  # APPO: multiply | additive
    perception: PerceptionConfig = field(default_factory=PerceptionConfig)
    temporal: TemporalConfig = field(default_factory=TemporalConfig)

    def __post_init__(self) -> None:
        _one_of("agg_mode", self.agg_mode, AGG_MODES)
        _one_of("weight_mode", self.weight_mode, WEIGHT_MODES)
        _one_of("perception.select_level", self.perception.select_level, SELECT_LEVELS)
        _one_of("perception.select_strategy", self.perception.select_strategy, SELECT_STRATEGIES)
        _one_of("temporal.condition", self.temporal.condition, TEMPORAL_CONDITIONS)
        if not 0 < self.temporal.shuffled_fraction <= 1:
            raise ConfigError("temporal.shuffled_fraction must be in (0, 1]")
        if not 0 <= self.clip_low < 1 or not 0 <= self.clip_high:
            raise ConfigError(f"clip_low must be in [0, 1) and clip_high >= 0, got "
                              f"{self.clip_low} / {self.clip_high}")
        if self.clip_high < self.clip_low:
            raise ConfigError(f"clip_high ({self.clip_high}) < clip_low ({self.clip_low}): "
                              "clip-higher means clip_high >= clip_low")
        if self.beta < 0 or self.perception.w_max < 1:
            raise ConfigError("beta must be >= 0 and perception.w_max >= 1")

    @property
    def correct_threshold(self) -> float:
        """Accuracy reward at which a response counts as correct: the training accuracy
        logged for every algorithm, and APPO's split of a group into S1 / S2
        (``perception.tau``)."""
        return self.perception.tau


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"'{name}' is {value!r}; expected one of {', '.join(allowed)}")


@dataclass
class RLConfig:
    """Shared RL knobs: every algorithm sees the same data order, batch, G, lr and steps."""

    out_dir: str = "outputs/rl"
    init: str = "outputs/sft/model"  # checkpoint the policy starts from
    steps: int = 20
    prompts_per_step: int = 4
    num_generations: int = 8  # G
    groups_per_micro_batch: int = 2  # gradient accumulation over whole groups
    num_iterations: int = 1  # mu: policy updates per rollout batch
    max_new_tokens: int = 40
    # text tokens of a prompt (system prompt, question, options, instruction; video tokens not
    # counted): one very long question makes its whole step many times slower
    max_prompt_tokens: int = 1024
    long_prompts: str = "drop"  # drop (with a warning naming them) | error (stop, naming one)
    temperature: float = 1.0
    top_p: float = 1.0
    rollout_cache: str = "auto"  # auto (static + compiled decoding on CUDA) | static | dynamic
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    reward_weights: dict[str, float] = field(
        default_factory=lambda: dict(DEFAULT_REWARD_WEIGHTS))
    freeze_vision: bool = True
    gradient_checkpointing: bool = False
    lora: bool = False  # LoRA on the language model; the reference policy = adapters disabled
    lora_r: int = 16
    lora_alpha: int = 32
    save_every: int = 10
    keep_checkpoints: int = 2  # newest checkpoints kept under <out_dir>/<algo>/checkpoints
    max_bad_steps: int = 5
    seed: int = 0
    mixed_precision: str = "auto"  # auto (bf16 autocast on CUDA, none on CPU) | no | bf16
    # none: one process | ddp | fsdp | cpu-ddp (configs/accelerate/<name>.yaml) | a config path
    launch: str = "none"
    num_processes: int = 0  # processes of a launch; 0 = the launch config's value
    algorithms: dict[str, AlgorithmConfig] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_generations < 2:
            raise ConfigError(f"'rl.num_generations' is {self.num_generations}; GRPO-family "
                              "advantages need a group of at least 2")
        for name in ("steps", "prompts_per_step", "groups_per_micro_batch", "num_iterations",
                     "max_new_tokens", "max_prompt_tokens"):
            _require(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ConfigError(f"'rl.mixed_precision' is {self.mixed_precision!r}; expected "
                              "auto, no or bf16")
        if self.num_processes < 0:
            raise ConfigError("'rl.num_processes' must be >= 0 (0 = the launch config's value)")
        _require(self.temperature > 0, "temperature", self.temperature,
                 "> 0 (sampling needs a positive temperature)")
        _require(0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        _require(self.rollout_cache in CACHE_MODES, "rollout_cache", self.rollout_cache,
                 f"one of {', '.join(CACHE_MODES)}")
        _require(self.long_prompts in LONG_PROMPTS, "long_prompts", self.long_prompts,
                 f"one of {', '.join(LONG_PROMPTS)}")
        for name in ("lr", "weight_decay", "warmup_steps", "save_every", "keep_checkpoints",
                     "max_bad_steps"):
            _require(getattr(self, name) >= 0, name, getattr(self, name), ">= 0")

    def algorithm(self, name: str) -> AlgorithmConfig:
        if name not in self.algorithms:
            raise ConfigError(f"rl.algorithms has no preset '{name}' "
                              f"(presets: {', '.join(sorted(self.algorithms)) or 'none'})")
        return self.algorithms[name]


@dataclass
class EvalConfig:
    """Evaluation of a checkpoint: greedy decoding over the test split and extra benchmarks."""

    batch_size: int = 16
    max_new_tokens: int = 64
    missing: str = "wrong"  # wrong (a missing video scores 0) | exclude (left out, still listed)
    splits: list[str] = field(default_factory=lambda: ["test"])  # from data.out_dir
    # extra benchmarks: name -> annotation file (Video-R1 / NExT-GQA / SEED-Bench-R1, auto),
    # a path or {path, video_root, image_root, strip_prefix}
    benchmarks: dict[str, AnnotationFile] = field(default_factory=dict)
    video_root: str | None = None
    image_root: str | None = None
    strip_prefix: str | None = None
    seed: int = 0
    # decoder layers whose attention decides the most-attended frame (perception hit rate);
    # [] turns the hit rate off
    perception_layers: list[int] = field(default_factory=lambda: [-1, -2, -3])
    # > 0: also sample this many answers per question at temperature 1 and report
    # sampled_accuracy (what RL optimises; greedy accuracy moves later)
    samples: int = 0
    # pipeline (greedy, frames.* pixels, the RL reward rules) | videor1 (Video-R1's published
    # evaluation) | appo (the APPO paper's); see appo/eval/protocol.py
    protocol: str = "pipeline"


@dataclass
class SFTConfig:
    """Video-R1-style chain-of-thought SFT warm start (loss on the assistant target tokens only)."""

    out_dir: str = "outputs/sft"  # <out_dir>/model is the checkpoint RL starts from
    split: str = "sft"  # split of data.out_dir with the CoT (``process``) targets
    init: str | None = None  # start checkpoint; null -> model.out_dir (the init_model output)
    epochs: float = 10.0  # passes over the split (used when max_steps is 0)
    max_steps: int = 0  # > 0: optimizer steps to run, overriding epochs
    batch_size: int = 16  # questions per micro-batch (padded)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    warmup_steps: int = 20  # linear warmup (optimizer steps)
    weight_decay: float = 0.0  # AdamW; never applied to biases and norm weights
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # <= 0: no clipping (the norm is still logged and checked)
    max_bad_steps: int = 3  # more non-finite steps in a row than this -> error
    # vision tower (ViT + merger): true = frozen (the APPO recipe for real checkpoints), false =
    # trained, auto = trained only for the embedded tiny model, whose tower starts random
    freeze_vision: bool | str = "auto"
    gradient_checkpointing: bool = False
    lora: bool = False  # LoRA adapters on the language model, merged into the saved weights
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    mixed_precision: str = "auto"  # auto (bf16 on CUDA, none on CPU) | no | bf16
    train_dtype: str = "float32"  # trained (master) weights: float32 | bfloat16 | auto (bf16 on CUDA)
    save_every: int = 100  # optimizer steps between resumable checkpoints (0 = never)
    keep_checkpoints: int = 2  # newest checkpoints kept under <out_dir>/checkpoints
    resume: bool = True  # continue from the newest checkpoint of an identical config
    seed: int | None = None  # data order and init RNG; null -> the top-level seed

    def __post_init__(self) -> None:
        if not isinstance(self.freeze_vision, bool) and self.freeze_vision != "auto":
            raise ConfigError(f"'sft.freeze_vision' is {self.freeze_vision!r}; expected true, "
                              "false or auto")
        for name in ("batch_size", "grad_accum"):
            _require(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        for name in ("warmup_steps", "max_bad_steps", "save_every", "weight_decay"):
            _require(getattr(self, name) >= 0, name, getattr(self, name), ">= 0")
        _require(self.lr > 0, "lr", self.lr, "> 0")
        _require(self.max_steps > 0 or self.epochs > 0, "epochs", self.epochs,
                 "> 0 (or set max_steps > 0)")
        _require(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", self.min_lr_ratio, "in [0, 1]")
        _require(len(self.betas) == 2, "betas", self.betas, "two numbers [beta1, beta2]")
