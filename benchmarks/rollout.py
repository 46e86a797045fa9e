"""Benchmark the rollout engine: decoding throughput, dynamic vs static + compiled KV cache.

The paper's rollout shape by default: one prompt x G = 8 samples, 16 frames at 64*28*28 pixels
(512 video tokens), 384 new tokens, every row generating all of them (no stop tokens), on a
random-initialised Qwen2.5-VL of the chosen size (cost depends on shapes, not weight values).

Variants (same model, same prompt):

* ``HF generate``: ``model.generate`` with the dynamic cache, the G copies of the prompt each
  prefilled (what the pipeline did before its own engine);
* ``HF generate, static``: the same with ``cache_implementation="static"`` (transformers
  compiles its decoding step on CUDA);
* ``ours, dynamic``: :func:`appo.engine.rollout.generate`'s engine, each prompt prefilled once and
  its KV cache shared by the G samples, growing cache, no compilation (the CPU default);
* ``ours, static + compiled``: the same with a preallocated static cache and the compiled
  one-token step (CUDA graphs on CUDA; the GPU default).

Columns: seconds per rollout (median), generated tokens/s, time to first token (the prefill:
a 1-token rollout), ms per decoding step ((rollout - prefill) / (new tokens - 1)), the
weights-bandwidth bound per decoding step (language-model weights read once at the device's
memory bandwidth; ``--bandwidth-gbs``, known for H100/H200), extra peak memory, and the
compile time (first call minus the median). Repetitions interleave the variants.

    PYTHONPATH=. python benchmarks/rollout.py                        # tiny model on CPU
    PYTHONPATH=. python benchmarks/rollout.py --model 7b --device cuda --json rollout_7b.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rl_step as rb  # noqa: E402  (shared model presets and measuring helpers)

from appo.config import TinyModelConfig  # noqa: E402
from appo.data.collate import encode_prompts  # noqa: E402
from appo.engine import decoding  # noqa: E402
from appo.engine.rollout import media_token_ids, pad_to_bucket, repeat_prompts  # noqa: E402


@dataclasses.dataclass(frozen=True)
class RolloutPreset:
    arch: TinyModelConfig
    vocab_size: int | None = None  # None: the tiny tokenizer's vocabulary
    tied_embeddings: bool = True
    fullatt_blocks: tuple[int, ...] | None = None


_VISION = dict(vision_depth=32, vision_hidden_size=1280, vision_heads=16,
               vision_intermediate_size=3420)
PRESETS: dict[str, RolloutPreset] = {
    "tiny": RolloutPreset(TinyModelConfig()),
    # Qwen2.5-VL-3B / -7B shapes (text model, vision tower, vocabulary, embedding tying)
    "3b": RolloutPreset(TinyModelConfig(hidden_size=2048, intermediate_size=11008,
                                        num_hidden_layers=36, num_attention_heads=16,
                                        num_key_value_heads=2, **_VISION),
                        vocab_size=151936, fullatt_blocks=(7, 15, 23, 31)),
    "7b": RolloutPreset(TinyModelConfig(hidden_size=3584, intermediate_size=18944,
                                        num_hidden_layers=28, num_attention_heads=28,
                                        num_key_value_heads=4, **_VISION),
                        vocab_size=152064, tied_embeddings=False,
                        fullatt_blocks=(7, 15, 23, 31)),
}
# Peak memory bandwidth (GB/s) by device name, for the weights-bandwidth bound.
BANDWIDTH_GBS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0}

VARIANTS = {
    "hf": "HF generate (G prefills, dynamic cache)",
    "hf-static": "HF generate, static cache",
    "dynamic": "ours: shared prefill, dynamic cache",
    "static": "ours: shared prefill, static cache + compiled step",
}
COLUMNS = ("variant", "rollout s", "tok/s", "prefill s", "ms/step", "bound ms/step",
           "x bound", "peak MiB", "compile s")


def build(preset: RolloutPreset, device: torch.device, dtype: torch.dtype, frame_size: int):
    return rb.build_model(rb.ModelPreset(
        preset.arch, prompts=1, generations=1, max_new_tokens=1, frames=2, frame_size=frame_size,
        groups_per_micro_batch=1, gradient_checkpointing=False, vocab_size=preset.vocab_size,
        fullatt_blocks=preset.fullatt_blocks, tied_embeddings=preset.tied_embeddings),
        device, dtype)


class Runner:
    """One prompt batch and a callable per variant that returns the generated token count."""

    def __init__(self, model, processor, batch: dict, samples: int, new_tokens: int) -> None:
        self.model, self.processor, self.samples = model, processor, samples
        self.new_tokens = new_tokens
        self.pad = processor.tokenizer.pad_token_id
        self.batch = batch
        self.suppress = media_token_ids(processor)
        self.decoders = {"dynamic": decoding.Decoder(model, "dynamic"),
                         "static": decoding.Decoder(model, "static")}

    def run(self, variant: str, new_tokens: int) -> int:
        if variant.startswith("hf"):
            return self._hf(new_tokens, static=variant == "hf-static")
        prompts = self.batch if variant == "dynamic" else pad_to_bucket(self.batch, 64, self.pad)
        tokens, _ = self.decoders[variant].sample(
            prompts, num_samples=self.samples, max_new_tokens=new_tokens,
            sampling=decoding.Sampling(temperature=1.0), stop_ids=[], pad_id=self.pad,
            suppress_ids=self.suppress)
        return tokens.numel()

    @torch.no_grad()
    def _hf(self, new_tokens: int, static: bool) -> int:
        inputs = repeat_prompts(self.batch, self.samples)
        out = self.model.generate(
            **inputs, do_sample=True, temperature=1.0, top_p=None, top_k=0,
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=self.pad,
            suppress_tokens=self.suppress, cache_implementation="static" if static else None)
        return (out.shape[1] - inputs["input_ids"].shape[1]) * out.shape[0]


def _bandwidth(device: torch.device, override: float | None) -> float | None:
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in BANDWIDTH_GBS.items() if key in name), None)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU) | ...")
    parser.add_argument("--prompts", type=int, default=1)
    parser.add_argument("--generations", type=int, default=8, help="G samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=384)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--frame-size", type=int, default=224, help="224 = 64*28*28 pixels")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--bandwidth-gbs", type=float, default=None,
                        help="device memory bandwidth for the bound (default: known GPUs)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from appo.models.loading import resolve_device, resolve_dtype

    args = parse_args(argv)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"--variants: unknown {sorted(unknown)}; choose from {list(VARIANTS)}")
    previous = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        torch.manual_seed(args.seed)
        preset = PRESETS[args.model]
        model, processor = build(preset, device, dtype, args.frame_size)
        records = rb.make_records(args.prompts)
        store = rb.RandomFrames([qa.video for qa in records], args.frames, args.frame_size,
                                args.seed)
        batch = {k: v.to(device) for k, v in encode_prompts(processor, records, store).items()}
        runner = Runner(model, processor, batch, args.generations, args.max_new_tokens)
        return _measure(args, device, dtype, model, batch, runner, variants)
    finally:
        torch.set_num_threads(previous)


def _measure(args, device, dtype, model, batch, runner: Runner, variants: list[str]) -> dict:
    text = model.config.text_config
    # named_parameters lists a tied lm_head once: it is the embedding matrix, read once a step
    lm_params = sum(p.numel() for n, p in model.named_parameters() if "visual" not in n)
    weight_bytes = lm_params * torch.finfo(dtype).bits // 8
    bandwidth = _bandwidth(device, args.bandwidth_gbs)
    bound_ms = None if bandwidth is None else weight_bytes / (bandwidth * 1e9) * 1e3
    video_tokens = int((batch["input_ids"][0] == model.config.video_token_id).sum())
    header = [
        f"device: {rb._device_name(device)}, dtype {str(dtype).replace('torch.', '')}, torch "
        f"{torch.__version__}, transformers {rb._transformers_version()}",
        f"model: {args.model}, random-init Qwen2.5-VL, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:,.1f} M params "
        f"({lm_params / 1e6:,.1f} M language model = {weight_bytes / 1e6:,.1f} MB read per step); "
        f"text hidden {text.hidden_size} x {text.num_hidden_layers} layers, vocab {text.vocab_size}",
        f"rollout: {args.prompts} prompt(s) x G={args.generations}, {args.frames} frames "
        f"{args.frame_size}x{args.frame_size} -> {video_tokens} video tokens, prompt length "
        f"{batch['input_ids'].shape[1]}, {args.max_new_tokens} new tokens per sample (no stops)",
    ]
    for line in header:
        print(line, flush=True)

    def timed_run(variant: str, new_tokens: int) -> tuple[float, int, float | None]:
        with rb.PeakMemory(device) as mem:
            seconds, tokens = rb.timed(device, runner.run, variant, new_tokens)
        return seconds, tokens, mem.mib

    first: dict[str, float] = {}
    prefill: dict[str, float] = {}
    for v in variants:  # warm-up: compilation happens here (1 token, then the full length)
        first[v] = timed_run(v, args.max_new_tokens)[0]
        prefill[v] = min(timed_run(v, 1)[0] for _ in range(2))
        print(f"  warm-up {v}: {first[v]:.3g} s", file=sys.stderr, flush=True)
    samples: dict[str, list[tuple[float, int, float | None]]] = {v: [] for v in variants}
    for rep in range(args.reps):
        k = rep % len(variants)
        for v in variants[k:] + variants[:k]:
            samples[v].append(timed_run(v, args.max_new_tokens))
            print(f"  [{rep + 1}/{args.reps}] {v}: {samples[v][-1][0]:.3g} s", file=sys.stderr,
                  flush=True)

    summary: dict[str, dict[str, float | None]] = {}
    for v in variants:
        seconds = statistics.median(s[0] for s in samples[v])
        tokens = samples[v][0][1]
        peaks = [s[2] for s in samples[v] if s[2] is not None]
        step_ms = max(seconds - prefill[v], 0.0) / max(args.max_new_tokens - 1, 1) * 1e3
        compiled = v == "static" and runner.decoders["static"].compiled
        summary[v] = {
            "rollout_s": seconds, "tokens_per_s": tokens / seconds, "prefill_s": prefill[v],
            "ms_per_step": step_ms, "bound_ms": bound_ms,
            "x_bound": None if bound_ms is None else step_ms / bound_ms,
            "peak_mib": statistics.median(peaks) if peaks else None,
            "compile_s": max(first[v] - seconds, 0.0) if compiled or v == "hf-static" else None,
        }
    table = [[VARIANTS[v]] + [rb._fmt(summary[v][k]) for k in (
        "rollout_s", "tokens_per_s", "prefill_s", "ms_per_step", "bound_ms", "x_bound",
        "peak_mib", "compile_s")] for v in variants]
    ratios = {}
    if "hf" in summary:
        for v in ("dynamic", "static", "hf-static"):
            if v in summary:
                ratios[f"{v} / HF generate throughput"] = (summary[v]["tokens_per_s"]
                                                         / summary["hf"]["tokens_per_s"])
    print()
    print(f"Rollout engine ({args.model}, {rb._device_name(device)}): medians of {args.reps} "
          "repetitions after a warm-up call that absorbs compilation.")
    print()
    print(rb.markdown(COLUMNS, table))
    print()
    for key, value in ratios.items():
        print(f"- {key}: {rb._fmt(value)}x")
    if bound_ms is None:
        print("- bound: no memory bandwidth known for this device (--bandwidth-gbs)")
    result = {"header": header, "columns": list(COLUMNS), "table": table, "summary": summary,
              "ratios": ratios, "config": {**vars(args), "device": str(device),
                                           "dtype": str(dtype), "video_tokens": video_tokens}}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
