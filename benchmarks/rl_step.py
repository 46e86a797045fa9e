"""Benchmark one RL step of GRPO, DAPO and APPO on the shared trainer, against the authors' way.

Every variant works on the same seeded batch: P prompts (random uint8 frames, no decoding) x G
sampled responses. For each algorithm preset of ``params.yaml`` (``rl.algorithms``, dynamic
sampling switched off so every variant does exactly one rollout round of identical work):

* rollout: :meth:`RLTrainer.collect` (prompt encoding + the rollout engine: shared prefill,
  SDPA, the KV cache of ``rl.rollout_cache`` -- ``auto``: static + compiled decoding on CUDA,
  dynamic on CPU -- + rewards), its time, generated tokens/s and peak memory;
* step: the update phase of :meth:`RLTrainer.train_step` on the SAME collected batch (fresh
  optimizer; loss + backward over the micro-batches + optimizer step; GRPO's reference-model
  forward included, and its reference copy counted in the memory);
* APPO only, timed separately on the same batch: the frame-attention capture (the recorder's
  hooks inside the training forward) and the perception weights (:func:`perception_weights`
  through the trainer, lm_head log-probs at the selected tokens included).

Reference row "authors' approach": an eager-attention copy of the whole model (same weights:
every measured step is undone), ``generate(output_attentions=True,
return_dict_in_generate=True)`` over all layers on the same prompts (dynamic KV cache), then the
post-hoc per-step, per-frame Python loop that reads a[i, n, t] from the selected layers.

Repetitions are interleaved round-robin (the starting variant rotates) and medians reported.
Peak memory is the extra memory of a phase on top of what is resident when it starts (policy
weights + the cached batch): CUDA ``max_memory_allocated`` minus ``memory_allocated``; on CPU the
process's peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` after ``malloc_trim``)
minus its RSS at the start of the phase.

    PYTHONPATH=. python benchmarks/rl_step.py                      # tiny model on CPU
    PYTHONPATH=. python benchmarks/rl_step.py --model gpu-1b --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/rl_step.py` from anywhere
    sys.path.insert(0, str(REPO))

from appo.config import AlgorithmConfig, RLConfig, TinyModelConfig, load_section  # noqa: E402
from appo.data.frames import CachedVideo  # noqa: E402
from appo.data.schema import VideoQA  # noqa: E402
from appo.engine.frame_attention import FrameAttentionRecorder, frame_index_of_tokens  # noqa: E402
from appo.engine.rollout import (  # noqa: E402
    media_token_ids,
    repeat_prompts,
    stop_token_ids,
    token_logprobs,
)
from appo.rl.trainer import Batch, RLTrainer  # noqa: E402

# --------------------------------------------------------------------------------------------
# Model presets
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelPreset:
    """A random-init Qwen2.5-VL architecture plus the batch shape it is benchmarked with."""

    arch: TinyModelConfig
    prompts: int  # P
    generations: int  # G
    max_new_tokens: int
    frames: int  # sampled frames per video (2 frames per temporal patch)
    frame_size: int  # square frame side in pixels (multiple of 28)
    groups_per_micro_batch: int
    gradient_checkpointing: bool
    vocab_size: int | None = None  # None: the tiny tokenizer's vocabulary
    fullatt_blocks: tuple[int, ...] | None = None  # vision blocks with full attention
    tied_embeddings: bool = True  # lm_head shares the embedding matrix (3B); 7B has its own


PRESETS: dict[str, ModelPreset] = {
    # The embedded default (params.yaml model.tiny / rl / frames): 8 frames of 56x56.
    "tiny": ModelPreset(TinyModelConfig(), prompts=4, generations=8, max_new_tokens=40,
                        frames=8, frame_size=56, groups_per_micro_batch=2,
                        gradient_checkpointing=False),
    # ~24 M parameters: a model whose forward is not free on a CPU, with a real vocabulary size
    # (32k, lm_head tied) and 16 frames of 112x112 -> 8 temporal patches x 16 = 128 video tokens.
    "small": ModelPreset(
        TinyModelConfig(hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                        num_attention_heads=6, num_key_value_heads=2, vision_depth=4,
                        vision_hidden_size=128, vision_heads=4, vision_intermediate_size=256),
        prompts=2, generations=4, max_new_tokens=32, frames=16, frame_size=112,
        groups_per_micro_batch=1, gradient_checkpointing=False, vocab_size=32000),
    # Qwen2.5-1.5B language model shapes + Qwen2.5-VL's vision tower, Qwen's real vocabulary:
    # 16 frames of 448x448 -> 8 temporal patches x 256 = 2048 video tokens per prompt.
    "gpu-1b": ModelPreset(
        TinyModelConfig(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                        num_attention_heads=12, num_key_value_heads=2, vision_depth=32,
                        vision_hidden_size=1280, vision_heads=16,
                        vision_intermediate_size=3420),
        prompts=2, generations=8, max_new_tokens=256, frames=16, frame_size=448,
        groups_per_micro_batch=1, gradient_checkpointing=True, vocab_size=151936,
        fullatt_blocks=(7, 15, 23, 31)),
}

QUESTIONS = (
    ("What colour was the square that flashed?", ("A. red", "B. green", "C. blue", "D. yellow")),
    ("Which shape flashed in yellow?", ("A. square", "B. circle", "C. triangle", "D. cross")),
    ("Which colour flashed first?", ("A. red", "B. blue")),
    ("How many times did the white square flash?", ()),
)


class RandomFrames:
    """A FrameStore stand-in: seeded random uint8 frames per video, built in memory."""

    def __init__(self, videos: Sequence[str], frames: int, size: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.videos = {
            v: CachedVideo(rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8),
                           list(range(frames)), 4.0, frames)
            for v in videos
        }

    def __contains__(self, video: str) -> bool:
        return video in self.videos

    def get(self, video: str) -> CachedVideo:
        return self.videos[video]


def make_records(n: int) -> list[VideoQA]:
    out = []
    for i in range(n):
        problem, options = QUESTIONS[i % len(QUESTIONS)]
        kind = "multiple choice" if options else "numerical"
        answer = "ABCD"[i % len(options)] if options else str(1 + i % 3)
        out.append(VideoQA(problem_id=f"bench-{i}", problem=problem, problem_type=kind,
                           answer=answer, video=f"bench/video_{i:03d}.mp4", options=options))
    return out


def bench_reward(texts: Sequence[str], records: Sequence[VideoQA]) -> dict[str, list[float]]:
    """A fixed reward pattern (a random-init model never answers): mixed outcomes in every group,
    so advantages are non-zero and APPO sees both correct (S1) and wrong (S2) responses."""
    acc = [float(i % 3 == 0) for i in range(len(texts))]
    fmt = [float(i % 2 == 0) for i in range(len(texts))]
    return {"accuracy": acc, "format": fmt,
            "total": [0.9 * a + 0.1 * f for a, f in zip(acc, fmt)]}


def build_model(preset: ModelPreset, device: torch.device, dtype: torch.dtype):
    """(model, processor) of the preset's architecture, random init, SDPA, in memory."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from appo.models.tiny import build_config, build_processor, default_corpus, train_tokenizer

    tokenizer = train_tokenizer(default_corpus(), preset.arch.vocab_size)
    processor = build_processor(tokenizer, preset.arch, max_pixels=preset.frame_size ** 2)
    config = build_config(preset.arch, tokenizer)
    if preset.vocab_size is not None:
        config.text_config.vocab_size = preset.vocab_size
    if preset.fullatt_blocks is not None:
        config.vision_config.fullatt_block_indexes = list(preset.fullatt_blocks)
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = preset.tied_embeddings
    torch.manual_seed(preset.arch.seed)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(
            config, attn_implementation="sdpa", dtype=dtype)
    model.eval()
    gen = model.generation_config
    gen.eos_token_id = config.text_config.eos_token_id
    gen.pad_token_id = config.text_config.pad_token_id
    gen.bos_token_id = None
    return model, processor


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS, so a phase's RSS baseline is its live memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Extra peak memory (MiB) of the enclosed code over what is resident when it starts."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mib: float | None = None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            _malloc_trim()
            self._base = _proc_kib("VmRSS")
            self._ok = self._base is not None and _reset_peak_rss()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        elif self._ok:
            peak = _proc_kib("VmHWM")
            self.mib = None if peak is None else max(0, peak - self._base) / 1024


def resident_mib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    rss = _proc_kib("VmRSS")
    return None if rss is None else rss / 1024


def timed(device: torch.device, fn: Callable[..., Any], *args, **kwargs) -> tuple[float, Any]:
    """(seconds, fn(*args, **kwargs)), synchronising the device before and after."""
    _sync(device)
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    _sync(device)
    return time.perf_counter() - t0, out


# --------------------------------------------------------------------------------------------
# The phases
# --------------------------------------------------------------------------------------------


class Bench:
    """Model, data and per-algorithm trainers; each method runs (and measures) one phase."""

    def __init__(self, model, processor, cfg: RLConfig, algos: dict[str, AlgorithmConfig],
                 records: list[VideoQA], store: RandomFrames, device: torch.device,
                 gradient_checkpointing: bool, with_authors: bool = True) -> None:
        from appo.train.common import prepare_for_training

        self.model = prepare_for_training(model, freeze_vision=cfg.freeze_vision,
                                          gradient_checkpointing=gradient_checkpointing)
        self.processor, self.cfg, self.algos = processor, cfg, algos
        self.records, self.store, self.device = records, store, device
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # Every step starts from the same weights (kept on the CPU: no device memory).
        self.snapshot = [p.detach().to("cpu", copy=True) for p in self.params]
        # The authors' row runs on its own eager copy (made before anything is compiled), so
        # the policy's attention implementation, and any compiled decoding, stay untouched.
        self.eager = _frozen_copy(self.model) if with_authors else None
        if self.eager is not None:
            self.eager.set_attn_implementation("eager")
        # Rollout trainers never read the reference model; GRPO's step gets a real copy.
        self.rollout_trainers = {name: self._trainer(algo, ref_model=self.model)
                                 for name, algo in algos.items()}
        first = next(iter(self.rollout_trainers.values()))
        self.shared = self._collect(first)  # THE batch every update phase trains on
        self.batches = {name: self._batch_for(name) for name in algos}

    def _trainer(self, algo: AlgorithmConfig, ref_model=None) -> RLTrainer:
        return RLTrainer(self.model, self.processor, self.cfg, algo, self.records, self.store,
                         ref_model=ref_model, reward_fn=bench_reward)

    def _collect(self, trainer: RLTrainer) -> Batch:
        trainer.sampler.position = 0  # the same prompts, in the same order, every time
        torch.manual_seed(self.cfg.seed)
        return trainer.collect()

    def _batch_for(self, name: str) -> Batch:
        """This algorithm's rewards (overlong shaping) and advantages on the shared rollout.

        The algorithm's own seeded collect() samples the same responses; should sampling differ
        (non-deterministic kernels), its rewards are kept and the shared rollout swapped in
        (the fixed reward pattern depends on the row only)."""
        batch = self._collect(self.rollout_trainers[name])
        same = (batch.rollout.response_ids.shape == self.shared.rollout.response_ids.shape
                and torch.equal(batch.rollout.response_ids, self.shared.rollout.response_ids))
        if not same:
            batch = dataclasses.replace(batch, rollout=self.shared.rollout,
                                        records=self.shared.records)
        return batch

    def _restore(self) -> None:
        with torch.no_grad():
            for p, src in zip(self.params, self.snapshot):
                p.copy_(src, non_blocking=True)
                p.grad = None
        _sync(self.device)

    # -- (a) rollout -------------------------------------------------------------------------
    def rollout(self, name: str) -> dict[str, float]:
        trainer = self.rollout_trainers[name]
        with PeakMemory(self.device) as mem:
            seconds, batch = timed(self.device, self._collect, trainer)
        tokens = int(batch.rollout.lengths.sum())
        del batch
        return {"rollout_s": seconds, "rollout_tokens": tokens,
                "rollout_tok_per_s": tokens / seconds, "rollout_peak_mib": mem.mib}

    # -- (b) update phase on the shared batch --------------------------------------------------
    def step(self, name: str) -> dict[str, float]:
        algo, batch = self.algos[name], self.batches[name]
        with PeakMemory(self.device) as mem:
            ref = None
            if algo.beta > 0:  # what rl.run does: a frozen copy of the start policy
                ref = _frozen_copy(self.model)
            trainer = self._trainer(algo, ref_model=ref)
            trainer.collect = lambda: batch  # the update phase only, on the shared batch
            seconds, metrics = timed(self.device, trainer.train_step)
        del trainer, ref
        self._restore()
        if not np.isfinite(metrics["loss"]):
            raise RuntimeError(f"{name}: non-finite loss in the benchmark step")
        return {"step_s": seconds, "step_peak_mib": mem.mib}

    # -- (c) APPO overheads, timed separately -------------------------------------------------
    def appo_overheads(self, name: str) -> dict[str, float]:
        """Frame-attention capture (the recorder's hook work only) and perception-weight time,
        summed over the micro-batches of the shared batch, as the training step runs them."""
        algo, batch = self.algos[name], self.batches[name]
        p = algo.perception
        trainer = self.rollout_trainers[name]
        capture, weights, forward = 0.0, 0.0, 0.0
        self.model.eval()
        for rows in trainer.micro_batches(batch):
            part = batch.rollout.select(rows)
            inputs = {k: v.to(self.device) for k, v in part.model_inputs().items()}
            response = part.response_ids.to(self.device)
            mask = part.response_mask.to(self.device)
            recorder = FrameAttentionRecorder(self.model, p.layers, p.query_chunk)
            recorder.prepare(inputs["input_ids"], inputs["attention_mask"],
                             inputs["video_grid_thw"], part.prompt_ids.shape[1], response.shape[1])
            hook_time = [0.0]
            accumulate = recorder.accumulate

            def timed_accumulate(*args, _acc=accumulate, _t=hook_time):
                _t[0] += timed(self.device, _acc, *args)[0]

            recorder.accumulate = timed_accumulate  # the hooks look it up on the instance
            with recorder, torch.no_grad():
                seconds, (logp, hidden) = timed(self.device, token_logprobs, self.model, inputs,
                                                response, self.cfg.temperature)
            attn, _ = recorder.result()
            capture += hook_time[0]
            forward += seconds - hook_time[0]
            with torch.no_grad():
                group_records = [batch.records[i]
                                 for i in rows[:: trainer.cfg.num_generations].tolist()]
                seconds, _ = timed(self.device, trainer.weighter.weights, attn, mask,
                                   batch.correct[rows], hidden, logp, group_records)
            weights += seconds
            del logp, hidden, attn
        return {"capture_s": capture, "weights_s": weights, "scoring_forward_s": forward}

    # -- the authors' approach ----------------------------------------------------------------
    def authors(self, layers: Sequence[int]) -> dict[str, float]:
        """Eager generate with every layer's attention kept, then the per-step per-frame loop."""
        with PeakMemory(self.device) as mem:
            seconds, (out, inputs) = timed(self.device, self._authors_generate)
        prompt_len = inputs["input_ids"].shape[1]
        response = out.sequences[:, prompt_len:]
        stops = torch.tensor(stop_token_ids(self.processor), device=response.device)
        is_stop = torch.isin(response, stops)
        tokens = int(((is_stop.long().cumsum(1) - is_stop.long()) == 0).sum())
        loop_s, _ = timed(self.device, authors_frame_loop, out.attentions, inputs["input_ids"],
                          inputs["video_grid_thw"], self.eager.config, layers)
        del out, inputs
        return {"rollout_s": seconds, "rollout_tokens": tokens,
                "rollout_tok_per_s": tokens / seconds, "rollout_peak_mib": mem.mib,
                "capture_s": loop_s}

    def _authors_generate(self):
        from appo.data.collate import encode_prompts

        torch.manual_seed(self.cfg.seed)
        prompts = self.shared.records[:: self.cfg.num_generations]  # collect()'s prompt order
        batch = encode_prompts(self.processor, prompts, self.store)
        inputs = {k: v.to(self.device)
                  for k, v in repeat_prompts(batch, self.cfg.num_generations).items()}
        out = self.eager.generate(
            **inputs, do_sample=True, temperature=self.cfg.temperature, top_p=self.cfg.top_p,
            top_k=0, max_new_tokens=self.cfg.max_new_tokens,
            eos_token_id=stop_token_ids(self.processor),
            pad_token_id=self.processor.tokenizer.pad_token_id,
            suppress_tokens=media_token_ids(self.processor), return_dict_in_generate=True,
            output_logits=True, output_attentions=True)
        return out, inputs


def _frozen_copy(model):
    """A no-grad eval copy of the policy (GRPO's reference model, the authors' eager model).

    A compiled decoding step that ``generate`` caches on the policy is left out of the copy."""
    compiled = model.__dict__.pop("_compiled_call", None)
    try:
        return copy.deepcopy(model).eval().requires_grad_(False)
    finally:
        if compiled is not None:
            model._compiled_call = compiled


def authors_frame_loop(attentions, input_ids: torch.Tensor, video_grid_thw: torch.Tensor,
                       config, layers: Sequence[int]) -> np.ndarray:
    """a[i, n, t] the authors' way: for every decoding step, the selected layers' attention of
    the newest query (head mean, layer mean) moved to numpy, then a Python loop over rows and
    frames averaging it over each frame's visual tokens."""
    frame_of = frame_index_of_tokens(input_ids, video_grid_thw, config.video_token_id,
                                     config.vision_config.spatial_merge_size).cpu()
    n_layers = len(attentions[0])
    chosen = sorted({int(i) % n_layers for i in layers})
    rows, n_steps, n_frames = frame_of.shape[0], len(attentions), int(frame_of.max()) + 1
    positions = [[(frame_of[b] == t).nonzero().squeeze(1).numpy() for t in range(n_frames)]
                 for b in range(rows)]
    out = np.zeros((rows, n_steps, n_frames), dtype=np.float32)
    for n, step in enumerate(attentions):
        att = torch.stack([step[j][:, :, -1, :].float() for j in chosen]).mean(0).mean(1)
        att = att.cpu().numpy()  # [rows, keys so far]
        for b in range(rows):
            for t in range(n_frames):
                out[b, n, t] = att[b, positions[b][t]].mean()
    return out


# TRL's GRPOTrainer takes images, not videos: it cannot run this batch; the comparison with it
# is benchmarks/trl_compare.py, on single-image prompts.
TRL_NOTE = ("TRL: its GRPOTrainer takes images, not videos, so it has no row here; "
            "benchmarks/trl_compare.py compares it with ours on single-image prompts")


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

COLUMNS = ("variant", "rollout s", "rollout tok/s", "rollout peak MiB", "step s",
           "step peak MiB", "frame-attn s", "weights s")


def _median(samples: list[dict], key: str) -> float | None:
    vals = [s[key] for s in samples if s.get(key) is not None]
    return statistics.median(vals) if vals else None


def _fmt(x: float | None) -> str:
    """3 significant digits below 100 (0.0841, 1.27, 68.1), whole numbers with commas above."""
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}" if abs(x) >= 1 else f"{x:.3g}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def summarise(samples: dict[str, list[dict]]) -> dict[str, dict[str, float | None]]:
    keys = ("rollout_s", "rollout_tok_per_s", "rollout_peak_mib", "step_s", "step_peak_mib",
            "capture_s", "weights_s", "scoring_forward_s", "rollout_tokens")
    return {name: {k: _median(rows, k) for k in keys} for name, rows in samples.items()}


def render_table(summary: dict[str, dict], labels: dict[str, str]) -> list[list[str]]:
    table = []
    for name, m in summary.items():
        table.append([labels.get(name, name), _fmt(m["rollout_s"]), _fmt(m["rollout_tok_per_s"]),
                      _fmt(m["rollout_peak_mib"]), _fmt(m["step_s"]), _fmt(m["step_peak_mib"]),
                      _fmt(m["capture_s"]), _fmt(m["weights_s"])])
    return table


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def ratios(summary: dict[str, dict]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    appo = summary.get("appo")
    for other in ("grpo", "dapo"):
        if appo is None or other not in summary:
            continue
        out[f"appo/{other} step time"] = _ratio(appo["step_s"], summary[other]["step_s"])
        out[f"appo/{other} step peak memory"] = _ratio(appo["step_peak_mib"],
                                                       summary[other]["step_peak_mib"])
    if appo is not None and "authors" in summary:
        a = summary["authors"]
        out["authors/ours rollout time"] = _ratio(a["rollout_s"], appo["rollout_s"])
        out["authors/ours rollout peak memory"] = _ratio(a["rollout_peak_mib"],
                                                         appo["rollout_peak_mib"])
        ours = (appo["rollout_s"] or 0) + (appo["capture_s"] or 0)
        theirs = (a["rollout_s"] or 0) + (a["capture_s"] or 0)
        out["authors/ours rollout + frame attention time"] = _ratio(theirs, ours)
    return out


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="auto",
                        help="auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16")
    parser.add_argument("--params", default=None,
                        help="params.yaml with rl.algorithms (default: the repository's)")
    parser.add_argument("--algos", default="grpo,dapo,appo",
                        help="comma-separated presets of rl.algorithms")
    parser.add_argument("--prompts", type=int, default=None, help="P (preset default)")
    parser.add_argument("--generations", type=int, default=None, help="G (preset default)")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--frames", type=int, default=None, help="frames per video (even)")
    parser.add_argument("--frame-size", type=int, default=None, help="frame side, multiple of 28")
    parser.add_argument("--layers", type=int, default=None, help="override the decoder depth")
    parser.add_argument("--vision-depth", type=int, default=None,
                        help="override the vision tower depth")
    parser.add_argument("--groups-per-micro-batch", type=int, default=None)
    parser.add_argument("--gradient-checkpointing", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--rollout-cache", choices=("auto", "static", "dynamic"), default=None,
                        help="KV cache of our rollouts (default: params.yaml rl.rollout_cache; "
                        "auto = static + compiled decoding on CUDA, dynamic on CPU)")
    parser.add_argument("--reps", type=int, default=5, help="measured repetitions (medians)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured repetitions first")
    parser.add_argument("--no-authors", action="store_true", help="skip the authors' row")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 for the tiny model on CPU, whose "
                        "ops are too small to gain from threads and which a shared machine "
                        "slows down badly when oversubscribed; otherwise torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results here")
    return parser.parse_args(argv)


def _preset(args: argparse.Namespace) -> ModelPreset:
    preset = PRESETS[args.model]
    arch = preset.arch
    if args.layers is not None:
        arch = dataclasses.replace(arch, num_hidden_layers=args.layers)
    fullatt = preset.fullatt_blocks
    if args.vision_depth is not None:
        arch = dataclasses.replace(arch, vision_depth=args.vision_depth)
        if fullatt is not None:
            fullatt = tuple(i for i in fullatt if i < args.vision_depth) or (args.vision_depth - 1,)
    over = {k: v for k, v in dict(
        prompts=args.prompts, generations=args.generations, max_new_tokens=args.max_new_tokens,
        frames=args.frames, frame_size=args.frame_size,
        groups_per_micro_batch=args.groups_per_micro_batch).items() if v is not None}
    if args.gradient_checkpointing != "auto":
        over["gradient_checkpointing"] = args.gradient_checkpointing == "on"
    return dataclasses.replace(preset, arch=arch, fullatt_blocks=fullatt, **over)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the report, return it (``table`` rows, ``summary``, ...)."""
    from appo.models.loading import resolve_device

    args = parse_args(argv)
    device = resolve_device(args.device)
    threads = args.threads
    if threads is None and device.type == "cpu" and args.model == "tiny":
        threads = 1
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(args, device)
    finally:  # callers (tests) keep their thread count
        torch.set_num_threads(previous)


def _run(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from appo.models.loading import resolve_dtype
    from appo.train.common import count_parameters, seed_everything

    preset = _preset(args)
    dtype = resolve_dtype(args.dtype, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    params = Path(args.params) if args.params else REPO / "params.yaml"
    base = load_section(RLConfig, "rl", params)
    names = [n.strip() for n in args.algos.split(",") if n.strip()]
    algos = {n: dataclasses.replace(base.algorithm(n), dynamic_sampling=False) for n in names}
    notes: list[str] = []
    for n, a in algos.items():  # a tiny --max-new-tokens must not break DAPO's shaping
        if a.overlong_buffer > preset.max_new_tokens:
            algos[n] = dataclasses.replace(a, overlong_buffer=preset.max_new_tokens)
            notes.append(f"{n}: overlong_buffer capped at max_new_tokens "
                         f"({preset.max_new_tokens})")
    cfg = dataclasses.replace(
        base, prompts_per_step=preset.prompts, num_generations=preset.generations,
        max_new_tokens=preset.max_new_tokens,
        groups_per_micro_batch=preset.groups_per_micro_batch,
        gradient_checkpointing=preset.gradient_checkpointing, seed=args.seed, algorithms={})
    if args.rollout_cache is not None:
        cfg = dataclasses.replace(cfg, rollout_cache=args.rollout_cache)
    seed_everything(args.seed)

    model, processor = build_model(preset, device, dtype)
    total_params = count_parameters(model)[1]
    vision_params = sum(p.numel() for p in model.model.visual.parameters())
    records = make_records(preset.prompts)
    store = RandomFrames([qa.video for qa in records], preset.frames, preset.frame_size,
                         args.seed)
    bench = Bench(model, processor, cfg, algos, records, store, device,
                  preset.gradient_checkpointing, with_authors=not args.no_authors)
    trainable = count_parameters(bench.model)[0]
    shared = bench.shared.rollout
    video_tokens = int((shared.prompt_ids[0] == model.config.video_token_id).sum())
    perception_layers = next((a.perception.layers for a in algos.values()
                              if a.perception.enabled), [-1, -2, -3])

    text, vision = model.config.text_config, model.config.vision_config
    header = [
        f"device: {_device_name(device)}, dtype {str(dtype).replace('torch.', '')}, "
        f"torch {torch.__version__}, transformers {_transformers_version()}, "
        f"python {platform.python_version()}",
        f"model: {args.model}, random-init Qwen2.5-VL, {total_params / 1e6:,.1f} M params "
        f"({vision_params / 1e6:,.1f} M vision, frozen; {trainable / 1e6:,.1f} M trainable); "
        f"text hidden {text.hidden_size} x {text.num_hidden_layers} layers, "
        f"{text.num_attention_heads} heads / {text.num_key_value_heads} KV, intermediate "
        f"{text.intermediate_size}, vocab {text.vocab_size}; vision depth {vision.depth}, "
        f"hidden {vision.hidden_size}, {vision.num_heads} heads",
        f"batch: P={preset.prompts} prompts x G={preset.generations}, {preset.frames} frames "
        f"{preset.frame_size}x{preset.frame_size} -> {video_tokens} video tokens/prompt, prompt "
        f"length {shared.prompt_ids.shape[1]}, max_new_tokens {preset.max_new_tokens} "
        f"(generated {int(shared.lengths.sum())} tokens, mean {float(shared.lengths.float().mean()):.1f}"
        f", truncated {float(shared.truncated.float().mean()):.0%}); micro-batch "
        f"{preset.groups_per_micro_batch * preset.generations} rows, gradient checkpointing "
        f"{'on' if preset.gradient_checkpointing else 'off'}, rollout KV cache "
        f"{getattr(cfg, 'rollout_cache', 'dynamic')} (authors: dynamic)",
        f"repetitions: {args.reps} measured after {args.warmup} warm-up, variants interleaved "
        f"round-robin; resident before the phases: {_fmt(resident_mib(device))} MiB",
    ]
    for line in header:
        print(line, flush=True)

    variants = list(algos) + ([] if args.no_authors else ["authors"])
    samples: dict[str, list[dict]] = {v: [] for v in variants}
    failed: dict[str, str] = {}
    for rep in range(args.warmup + args.reps):
        k = rep % len(variants)
        for name in variants[k:] + variants[:k]:
            if name in failed:
                continue
            try:
                if name == "authors":
                    row = bench.authors(perception_layers)
                else:
                    row = bench.rollout(name)
                    row.update(bench.step(name))
                    if algos[name].perception.enabled:
                        row.update(bench.appo_overheads(name))
            except torch.cuda.OutOfMemoryError as exc:  # e.g. eager attention at long prompts
                failed[name] = f"CUDA out of memory ({str(exc).splitlines()[0][:120]})"
            if name in failed:  # outside the handler: the traceback no longer pins tensors
                gc.collect()
                torch.cuda.empty_cache()
                bench._restore()
                continue
            if rep >= args.warmup:
                samples[name].append(row)
            times = ", ".join(f"{k} {v:.3g}" for k, v in row.items() if k.endswith("_s"))
            print(f"  [{rep + 1}/{args.warmup + args.reps}"
                  f"{' warm-up' if rep < args.warmup else ''}] {name}: {times}",
                  file=sys.stderr, flush=True)

    summary = summarise({k: v for k, v in samples.items() if v})
    labels = {n: n.upper() for n in algos}
    labels["authors"] = "authors' approach (eager generate + attentions, post-hoc loop)"
    table = render_table(summary, labels)
    for name, why in failed.items():
        table.append([labels.get(name, name), why] + ["-"] * (len(COLUMNS) - 2))
    notes.append(TRL_NOTE)
    caption = (f"RL step on one fixed batch ({args.model}, {_device_name(device)}): medians of "
               f"{args.reps} repetitions. Dynamic sampling is disabled for every preset so all "
               "variants do the same work (one rollout round, same prompts, same responses); "
               "rewards are a fixed pattern (random-init model).")
    rat = ratios(summary)
    print()
    print(caption)
    print()
    print(markdown(COLUMNS, table))
    print()
    for key, value in rat.items():
        print(f"- {key}: {_fmt(value)}")
    print("- rollout: collect() = prompt encoding + rollout engine + rewards; step: update phase "
          "on the shared batch (loss + backward + optimizer, GRPO's reference forward "
          "included); peak MiB: extra over the resident policy + batch; frame-attn: APPO's "
          "capture hooks (authors: the post-hoc per-step, per-frame loop); weights: APPO's "
          "perception weights.")
    for note in notes:
        print(f"- {note}")

    result = {
        "header": header, "caption": caption, "columns": list(COLUMNS), "table": table,
        "summary": summary, "ratios": rat, "samples": samples, "failed": failed,
        "notes": notes,
        "config": {"model": args.model, "device": str(device), "dtype": str(dtype),
                   "torch": torch.__version__, "transformers": _transformers_version(),
                   "params": total_params, "vision_params": vision_params,
                   "trainable_params": trainable, "video_tokens_per_prompt": video_tokens,
                   "prompt_length": int(shared.prompt_ids.shape[1]),
                   "preset": _jsonable(dataclasses.asdict(preset)), "reps": args.reps,
                   "warmup": args.warmup,
                   "algorithms": {n: dataclasses.asdict(a) for n, a in algos.items()}},
    }
    if args.json:
        Path(args.json).write_text(json.dumps(_jsonable(result), indent=1))
    return result


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    n = torch.get_num_threads()
    return f"cpu ({n} thread{'' if n == 1 else 's'})"


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


if __name__ == "__main__":
    main()
