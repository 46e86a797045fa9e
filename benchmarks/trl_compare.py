"""One RL step of TRL's GRPOTrainer against ours, on identical work, on the CPU.

Both sides train the same random-init Qwen2.5-VL (``tiny`` and ``small`` presets of
``benchmarks/rl_step.py``; the vision tower frozen on both) on the same single-image prompts
(our chat prompt: system + image + question, the same image pixels), P prompts x G
generations, exactly ``--max-new-tokens`` sampled tokens per completion (no early stop: ours
with no stop token, TRL with ``min_new_tokens``), the same fixed reward pattern, and the same
loss family: DAPO's token-mean over the whole batch, clip-higher (0.2 / 0.28), no KL term (no
reference model), one update per rollout (mu = 1), AdamW at the same learning rate, gradient
clipping at 1.0, micro-batches of the same number of rows and no gradient checkpointing.

* ours: :meth:`appo.rl.trainer.RLTrainer.train_step` (prompt encoding, the rollout engine with
  one shared prefill per prompt, rewards, advantages, the update), fresh optimizer each step;
* TRL: ``GRPOTrainer.train()`` for one optimizer step; the step is timed from the trainer's
  ``on_step_begin`` to its ``on_step_end`` callback (generation of all P x G completions with
  ``model.generate``, rewards, loss, backward, optimizer step), which leaves out the per-call
  set-up of ``train()`` (reported separately).

Peak memory: the process's peak resident set over the step (``VmHWM`` reset at its start),
minus the resident set at its start. Repetitions alternate the two sides (the first side
rotates), every step starts from the same weights, medians are reported with our step time and
peak memory divided by TRL's.

    pip install -e '.[bench]'                               # TRL, pinned
    PYTHONPATH=. python benchmarks/trl_compare.py           # tiny and small, 3 repetitions
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rl_step as rb  # noqa: E402  (model presets, records, measuring helpers)

from appo.data.frames import CachedVideo  # noqa: E402
from appo.data.schema import VideoQA  # noqa: E402

COLUMNS = ("model", "side", "step s", "step peak MiB", "rollout s", "set-up s",
           "prompt tokens", "completion tokens")
# What TRL's GRPOTrainer cannot do like ours, said in every report.
TRL_LIMITS = (
    "TRL's GRPOTrainer takes image (not video) inputs: its processor call passes `images` "
    "only, so the comparison uses single-image prompts; our video path is not compared.",
    "TRL generates each prompt's G completions from G separate prefills (`model.generate` on "
    "the repeated prompts); ours prefills each prompt once and shares its KV cache.",
)


class RandomImages:
    """A FrameStore stand-in for image questions: one seeded random uint8 image per record."""

    def __init__(self, paths: Sequence[str], size: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.images = {p: rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for p in paths}

    def __contains__(self, path: str) -> bool:
        return path in self.images

    def image(self, path: str) -> np.ndarray:
        return self.images[path]

    def get(self, path: str) -> CachedVideo:
        return CachedVideo(self.images[path][None], [0], 0.0, 1)


def image_records(n: int) -> list[VideoQA]:
    """rl_step's questions as image records (the picture kept in ``video``, Video-R1 style)."""
    return [dataclasses.replace(qa, data_type="image", video=f"bench/image_{i:03d}.png")
            for i, qa in enumerate(rb.make_records(n))]


def pattern_rewards(n: int) -> list[float]:
    """rl_step's fixed reward pattern (row i: 0.9 * [i % 3 == 0] + 0.1 * [i % 2 == 0])."""
    return rb.bench_reward([""] * n, [None] * n)["total"]


# --------------------------------------------------------------------------------------------
# The two sides
# --------------------------------------------------------------------------------------------


class Ours:
    def __init__(self, model, processor, records, store, args) -> None:
        from appo.config import RLConfig, load_section
        from appo.train.common import prepare_for_training

        base = load_section(RLConfig, "rl", rb.REPO / "params.yaml")
        self.algo = dataclasses.replace(base.algorithm("dapo"), dynamic_sampling=False,
                                        overlong_buffer=0)
        self.cfg = dataclasses.replace(
            base, prompts_per_step=args.prompts, num_generations=args.generations,
            max_new_tokens=args.max_new_tokens, groups_per_micro_batch=args.groups_per_micro_batch,
            gradient_checkpointing=False, rollout_cache="dynamic", temperature=1.0, top_p=1.0,
            max_grad_norm=1.0, lr=args.lr, weight_decay=0.0, seed=args.seed, algorithms={})
        self.model = prepare_for_training(model, freeze_vision=True, gradient_checkpointing=False)
        self.processor, self.records, self.store = processor, records, store

    def step(self) -> dict[str, Any]:
        from appo.engine import rollout
        from appo.rl.trainer import RLTrainer

        def reward(texts, records):
            return {"total": pattern_rewards(len(texts))}

        t0 = time.perf_counter()
        trainer = RLTrainer(self.model, self.processor, self.cfg, self.algo, self.records,
                            self.store, reward_fn=reward)
        setup = time.perf_counter() - t0
        batches = []  # the step's rollout, kept for its token count
        original_collect = trainer.collect

        def collect():
            batches.append(original_collect())
            return batches[-1]

        trainer.collect = collect
        torch.manual_seed(self.cfg.seed)
        with mock.patch.object(rollout, "stop_token_ids", lambda processor: []), \
                rb.PeakMemory(torch.device("cpu")) as mem:
            seconds, metrics = rb.timed(torch.device("cpu"), trainer.train_step)
        done = batches[-1].rollout
        return {"step_s": seconds, "peak_mib": mem.mib, "rollout_s": metrics["rollout_time"],
                "setup_s": setup, "tokens": int(done.response_mask.sum()),
                "prompt_tokens": int(done.prompt_mask.sum()), "loss": metrics["loss"]}


class _StepWindow:
    """A TrainerCallback that times (and measures the peak memory of) each optimizer step."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Window(TrainerCallback):
            def __init__(self) -> None:
                self.rows: list[dict] = []
                self._mem = None

            def on_step_begin(self, args, state, control, **kwargs):
                self._mem = rb.PeakMemory(torch.device("cpu")).__enter__()
                self._t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                seconds = time.perf_counter() - self._t0
                self._mem.__exit__(None, None, None)
                self.rows.append({"step_s": seconds, "peak_mib": self._mem.mib})

        return Window()


class TRL:
    def __init__(self, model, processor, records, store, args, work: Path) -> None:
        from datasets import Dataset, Image
        from PIL import Image as PILImage

        from appo.data.prompts import messages

        for p in model.model.visual.parameters():  # frozen, as ours (rl.freeze_vision)
            p.requires_grad_(False)
        self.model, self.processor, self.args, self.work = model, processor, args, work
        rows = []
        for qa in records:
            prompt = messages(qa)
            # TRL's multimodal prompts are lists of typed blocks throughout (same rendering)
            prompt[0] = {"role": "system", "content": [{"type": "text", "text": prompt[0]["content"]}]}
            rows.append({"prompt": prompt,
                         "image": PILImage.fromarray(store.image(qa.image_file))})
        self.dataset = Dataset.from_list(rows).cast_column("image", Image())

    def _config(self):
        from trl import GRPOConfig

        a = self.args
        rows = a.prompts * a.generations
        micro = a.groups_per_micro_batch * a.generations
        return GRPOConfig(
            output_dir=str(self.work), use_cpu=True, bf16=False, fp16=False, seed=a.seed,
            max_steps=1, per_device_train_batch_size=micro,
            gradient_accumulation_steps=rows // micro, num_generations=a.generations,
            max_completion_length=a.max_new_tokens,
            generation_kwargs={"min_new_tokens": a.max_new_tokens},
            temperature=1.0, top_p=1.0, top_k=0, loss_type="dapo", beta=0.0, epsilon=0.2,
            epsilon_high=0.28, num_iterations=1, scale_rewards="group", learning_rate=a.lr,
            weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
            gradient_checkpointing=False, report_to="none", save_strategy="no",
            logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
            shuffle_dataset=False, log_completions=False, remove_unused_columns=False)

    def trainer(self, window):
        from trl import GRPOTrainer

        def reward(prompts, completions, **kwargs):
            return pattern_rewards(len(completions))

        return GRPOTrainer(model=self.model, reward_funcs=[reward], args=self._config(),
                           train_dataset=self.dataset, processing_class=self.processor,
                           callbacks=[window])

    def step(self) -> dict[str, Any]:
        window = _StepWindow()
        t0 = time.perf_counter()
        trainer = self.trainer(window)
        built = time.perf_counter() - t0
        tokens: list[int] = []
        real = trainer._generate_single_turn
        gen_time = [0.0]

        def generate(*a, **k):
            seconds, out = rb.timed(torch.device("cpu"), real, *a, **k)
            gen_time[0] += seconds
            tokens.extend(len(ids) for ids in out[0])
            return out

        trainer._generate_single_turn = generate
        prompt_tokens: list[int] = []
        tokenize = trainer._tokenize_prompts

        def tokenize_prompts(*a, **k):
            out = tokenize(*a, **k)
            prompt_tokens.extend(len(ids) for ids in out[0])
            return out

        trainer._tokenize_prompts = tokenize_prompts
        torch.manual_seed(self.args.seed)
        t1 = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - t1
        row = window.rows[0]
        del trainer
        return {"step_s": row["step_s"], "peak_mib": row["peak_mib"], "rollout_s": gen_time[0],
                "setup_s": built + total - row["step_s"], "tokens": sum(tokens),
                "prompt_tokens": sum(prompt_tokens)}


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,small",
                        help="comma-separated presets of benchmarks/rl_step.py")
    parser.add_argument("--prompts", type=int, default=2, help="P")
    parser.add_argument("--generations", type=int, default=4, help="G")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=112, help="square, multiple of 28")
    parser.add_argument("--groups-per-micro-batch", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--reps", type=int, default=3, help="measured repetitions per side")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured repetitions first")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.prompts % args.groups_per_micro_batch:
        parser.error("--prompts must be a multiple of --groups-per-micro-batch")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    try:
        import trl
    except ImportError:
        raise SystemExit("TRL is not installed: pip install -e '.[bench]'") from None
    previous = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        with tempfile.TemporaryDirectory(prefix="trl-compare-") as work:
            return _run(args, Path(work), trl.__version__)
    finally:
        torch.set_num_threads(previous)


def _run(args: argparse.Namespace, work: Path, trl_version: str) -> dict[str, Any]:
    import transformers

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    header = [
        f"device: {rb._device_name(torch.device('cpu'))}, float32, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, trl {trl_version}",
        f"work: P={args.prompts} single-image prompts x G={args.generations}, image "
        f"{args.image_size}x{args.image_size}, {args.max_new_tokens} new tokens per completion "
        f"(no early stop), micro-batches of {args.groups_per_micro_batch * args.generations} rows,"
        f" DAPO token-mean, clip 0.2/0.28, no KL, mu = 1, lr {args.lr}; {args.reps} repetitions "
        f"after {args.warmup} warm-up, sides alternating",
    ]
    for line in header:
        print(line, flush=True)
    records = image_records(args.prompts)
    store = RandomImages([qa.image_file for qa in records], args.image_size, args.seed)
    summary: dict[str, dict[str, dict]] = {}
    details: dict[str, dict] = {}
    for name in models:
        preset = dataclasses.replace(rb.PRESETS[name], frame_size=args.image_size)
        torch.manual_seed(args.seed)
        model, processor = rb.build_model(preset, torch.device("cpu"), torch.float32)
        params = sum(p.numel() for p in model.parameters())
        sides = {"ours": Ours(copy.deepcopy(model), processor, records, store, args),
                 "trl": TRL(copy.deepcopy(model), processor, records, store, args, work)}
        del model
        snapshots = {k: [p.detach().clone() for p in s.model.parameters()]
                     for k, s in sides.items()}
        samples: dict[str, list[dict]] = {k: [] for k in sides}
        order = list(sides)
        for rep in range(args.warmup + args.reps):
            k = rep % 2
            for side in order[k:] + order[:k]:
                row = sides[side].step()
                with torch.no_grad():  # every step starts from the same weights
                    for p, src in zip(sides[side].model.parameters(), snapshots[side]):
                        p.copy_(src)
                        p.grad = None
                if rep >= args.warmup:
                    samples[side].append(row)
                print(f"  [{name} {rep + 1}/{args.warmup + args.reps}"
                      f"{' warm-up' if rep < args.warmup else ''}] {side}: step "
                      f"{row['step_s']:.3g} s, peak {rb._fmt(row['peak_mib'])} MiB, "
                      f"{row['tokens']} tokens", file=sys.stderr, flush=True)
        summary[name] = {side: {key: _median(rows, key) for key in
                                ("step_s", "peak_mib", "rollout_s", "setup_s", "prompt_tokens",
                                 "tokens")}
                         for side, rows in samples.items()}
        details[name] = {"params": params, "samples": samples}
    table, ratios = [], {}
    for name, sides in summary.items():
        for side, m in sides.items():
            table.append([f"{name} ({details[name]['params'] / 1e6:.1f} M)",
                          "ours" if side == "ours" else "TRL GRPOTrainer",
                          rb._fmt(m["step_s"]), rb._fmt(m["peak_mib"]), rb._fmt(m["rollout_s"]),
                          rb._fmt(m["setup_s"]), rb._fmt(m["prompt_tokens"]),
                          rb._fmt(m["tokens"])])
        ours, trl = sides["ours"], sides["trl"]
        ratios[f"{name}: ours/TRL step time"] = rb._ratio(ours["step_s"], trl["step_s"])
        ratios[f"{name}: ours/TRL step peak memory"] = rb._ratio(ours["peak_mib"],
                                                                  trl["peak_mib"])
        for key in ("tokens", "prompt_tokens"):  # the same work, or say so
            if ours[key] != trl[key]:
                print(f"warning: {name}: {key} differ (ours {ours[key]}, TRL {trl[key]})",
                      file=sys.stderr)
    print()
    print(rb.markdown(COLUMNS, table))
    print()
    for key, value in ratios.items():
        print(f"- {key}: {rb._fmt(value)}x")
    print("- step: one optimizer step (rollout of all P x G completions + rewards + loss + "
          "backward + AdamW); rollout s: the generation inside it; set-up s: TRL's "
          "GRPOTrainer construction + the rest of train() (ours: RLTrainer construction)")
    for note in TRL_LIMITS:
        print(f"- {note}")
    result = {"header": header, "columns": list(COLUMNS), "table": table, "ratios": ratios,
              "summary": summary, "details": details, "limits": list(TRL_LIMITS),
              "config": vars(args)}
    if args.json:
        Path(args.json).write_text(json.dumps(rb._jsonable(result), indent=1, default=str))
    return result


def _median(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


with contextlib.suppress(Exception):  # quieter TRL/transformers on import
    from transformers.utils import logging as _hf_logging

    _hf_logging.set_verbosity_error()

if __name__ == "__main__":
    main()
