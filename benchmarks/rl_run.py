"""A short RL run at a benchmark shape through the RL stage's own code: steps, a checkpoint, a
crash, a resume.

:func:`appo.stages.rl.run` runs unchanged (accelerate placement and bf16 autocast on CUDA,
gradient checkpointing, the optimizer and scheduler, training-state checkpoints every
``--save-every`` steps, the resume from the newest one, the model export) on what
``benchmarks/rl_step.py`` builds in memory: a random-init Qwen2.5-VL of the chosen preset,
seeded random uint8 frames and the fixed reward pattern (a random model never answers, so the
stage's reward rules would give every group zero advantage). Only the stage's loaders are
swapped: ``load_policy`` builds the preset, the ``rl`` split and the frame store are the
benchmark's records and frames. Dynamic sampling is off (one rollout round per step).

The first run raises a simulated crash when it reaches step ``--crash-at``; the second run,
the same call, must resume from the newest checkpoint and finish all ``--steps``. Reported:
seconds and loss of every step of both runs, checkpoint write seconds and size, the resumed
step, peak memory, and the exported model.

    PYTHONPATH=. python benchmarks/rl_run.py                         # tiny model on CPU
    PYTHONPATH=. python benchmarks/rl_run.py --model gpu-1b --device cuda --json rl_run.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rl_step as rb  # noqa: E402  (model presets, random frames, records, fixed rewards)

COLUMNS = ("run", "step", "step s", "rollout s", "loss", "reward", "mean response tokens")


class SimulatedCrash(RuntimeError):
    """Raised inside the first run's training loop at ``--crash-at``."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(rb.PRESETS), default="tiny")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU) | ...")
    parser.add_argument("--algo", default="appo", help="a preset of params.yaml rl.algorithms")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--crash-at", type=int, default=2,
                        help="the first run dies when it reaches this step (0: no crash)")
    parser.add_argument("--save-every", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=None, help="P (preset default)")
    parser.add_argument("--generations", type=int, default=None, help="G (preset default)")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--frame-size", type=int, default=None)
    parser.add_argument("--groups-per-micro-batch", type=int, default=None)
    parser.add_argument("--gradient-checkpointing", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--rollout-cache", choices=("auto", "static", "dynamic"), default="auto",
                        help="rl.rollout_cache (auto: static + compiled decoding on CUDA; each "
                        "run, the resumed one too, compiles it once)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--work-dir", default=None, help="run folder (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    args.layers = args.vision_depth = None  # rl_step's _preset reads these
    return args


def write_params(args, preset: rb.ModelPreset, work: Path) -> Path:
    """The repository's params.yaml with the run's shape, outputs under ``work``."""
    params = yaml.safe_load((rb.REPO / "params.yaml").read_text())
    params["seed"] = args.seed
    params["model"].update(device=args.device, dtype=args.dtype)
    params["data"]["out_dir"] = str(work / "data")
    params["frames"]["out_dir"] = str(work / "frames")
    algos = params["rl"]["algorithms"]
    for algo in algos.values():
        algo["dynamic_sampling"] = False
        if algo.get("overlong_buffer", 0) > preset.max_new_tokens:
            algo["overlong_buffer"] = preset.max_new_tokens
    params["rl"].update(
        out_dir=str(work / "rl"), init=str(work / "init"), steps=args.steps,
        save_every=args.save_every, prompts_per_step=preset.prompts,
        num_generations=preset.generations, max_new_tokens=preset.max_new_tokens,
        groups_per_micro_batch=preset.groups_per_micro_batch,
        gradient_checkpointing=preset.gradient_checkpointing, rollout_cache=args.rollout_cache,
        seed=0, algorithms=algos)
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@contextlib.contextmanager
def stage_on_memory(preset: rb.ModelPreset, seed: int, log: list[dict], crash_at: list[int]):
    """Patch the RL stage's loaders onto the in-memory model, records and frames, and time
    every training step and checkpoint write into ``log``."""
    from appo.models.loading import resolve_device, resolve_dtype
    from appo.rl.trainer import RLTrainer
    from appo.stages import rl
    from appo.train import common

    records = rb.make_records(preset.prompts)
    store = rb.RandomFrames([qa.video for qa in records], preset.frames, preset.frame_size, seed)
    real_step, real_save = RLTrainer.train_step, common.save_training_state

    def load_policy(path, dtype="auto", attn_implementation="sdpa", device="auto"):
        dev = resolve_device(device)
        return rb.build_model(preset, dev, resolve_dtype(dtype, dev))

    def train_step(self):
        if crash_at and self.steps_done == crash_at[0]:
            crash_at.clear()
            raise SimulatedCrash(f"simulated crash at step {self.steps_done}")
        step = self.steps_done
        seconds, metrics = rb.timed(self.device, real_step, self)
        log.append({"kind": "step", "step": step, "seconds": seconds, **metrics})
        return metrics

    def save_training_state(ckpt_dir, *a, **k):
        seconds, out = rb.timed(torch.device("cpu"), real_save, ckpt_dir, *a, **k)
        size = sum(f.stat().st_size for f in Path(ckpt_dir).rglob("*") if f.is_file())
        log.append({"kind": "checkpoint", "path": str(ckpt_dir), "seconds": seconds,
                    "mib": size / 2**20})
        return out

    with contextlib.ExitStack() as stack:
        for target, new in (
            (rl, dict(load_policy=load_policy, load_split=lambda path: list(records),
                      split_path=lambda data_dir, split: Path(data_dir) / f"{split}.json",
                      FrameStore=lambda cache_dir: store,
                      RLTrainer=functools.partial(RLTrainer, reward_fn=rb.bench_reward))),
            (RLTrainer, dict(train_step=train_step)),
            (common, dict(save_training_state=save_training_state)),
        ):
            for name, value in new.items():
                stack.enter_context(mock.patch.object(target, name, value))
        yield


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    previous = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        with contextlib.ExitStack() as stack:
            work = Path(args.work_dir) if args.work_dir else Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="appo-rl-run-")))
            work.mkdir(parents=True, exist_ok=True)
            return _run(args, work)
    finally:
        torch.set_num_threads(previous)


def _run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import os

    from appo.models.loading import resolve_device, resolve_dtype
    from appo.stages import rl

    os.environ.setdefault("APPO_MLFLOW", "0")  # metrics.jsonl only: no MLflow store needed
    preset = rb._preset(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    params = write_params(args, preset, work)
    log: list[dict] = []
    crash = [args.crash_at] if 0 < args.crash_at < args.steps else []
    crashing = bool(crash)  # the list empties when the crash fires
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    runs: list[dict] = []
    with stage_on_memory(preset, args.seed, log, crash):
        for attempt in ("first", "resumed") if crashing else ("first",):
            start = len(log)
            t1 = time.perf_counter()
            try:
                summary = rl.run(str(params), args.algo, progress=False)
                outcome = "finished"
            except SimulatedCrash as exc:
                summary, outcome = {}, str(exc)
            runs.append({"run": attempt, "outcome": outcome, "seconds": time.perf_counter() - t1,
                         "events": log[start:], "summary": summary})
    total = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
            else rb.resident_mib(device))
    out = work / "rl" / args.algo
    resumed_steps = [e["step"] for e in runs[-1]["events"] if e["kind"] == "step"]
    checkpoints = [e for r in runs for e in r["events"] if e["kind"] == "checkpoint"]
    final = runs[-1]["summary"]
    ok = (bool(final) and (out / "model").is_dir() and final.get("skipped_steps") == 0
          and math.isfinite(final.get("final_reward", float("nan")))
          and (not crashing or (len(runs) == 2 and runs[0]["outcome"] != "finished"
                                and resumed_steps[:1] == [args.crash_at])))

    header = [
        f"device: {rb._device_name(device)}, dtype {str(dtype).replace('torch.', '')}, "
        f"torch {torch.__version__}, transformers {rb._transformers_version()}",
        f"model: {args.model}, random-init Qwen2.5-VL; P={preset.prompts} x G="
        f"{preset.generations}, {preset.frames} frames {preset.frame_size}x{preset.frame_size},"
        f" max_new_tokens {preset.max_new_tokens}, gradient checkpointing "
        f"{'on' if preset.gradient_checkpointing else 'off'}",
        f"run: rl.run --algo {args.algo}, {args.steps} steps, checkpoint every "
        f"{args.save_every}, crash at step {args.crash_at if crashing else '-'}",
    ]
    table = []
    for r in runs:
        for e in r["events"]:
            if e["kind"] == "step":
                table.append([r["run"], str(e["step"]), rb._fmt(e["seconds"]),
                              rb._fmt(e.get("rollout_time")), f"{e['loss']:.4g}",
                              f"{e['reward']:.3g}", rb._fmt(e.get("response_length"))])
            else:
                table.append([r["run"], f"checkpoint {Path(e['path']).name}",
                              rb._fmt(e["seconds"]), "-", "-", "-", f"{rb._fmt(e['mib'])} MiB"])
    result = {
        "header": header, "columns": list(COLUMNS), "table": table, "ok": ok,
        "runs": [{k: v for k, v in r.items() if k != "events"} for r in runs],
        "events": log, "total_s": total, "peak_mib": peak,
        "resumed_from": resumed_steps[0] if crashing and resumed_steps else None,
        "checkpoints": len(checkpoints),
        "exported_model": (out / "model").is_dir(),
        "config": {"model": args.model, "device": str(device), "dtype": str(dtype),
                   "algo": args.algo, "steps": args.steps, "crash_at": args.crash_at,
                   "save_every": args.save_every,
                   "preset": rb._jsonable(dataclasses.asdict(preset))},
    }
    for line in header:
        print(line)
    print()
    print(rb.markdown(COLUMNS, table))
    print()
    print(f"- total {total:.1f} s, peak memory {rb._fmt(peak)} MiB "
          f"({'CUDA allocated' if device.type == 'cuda' else 'process RSS at the end'}), "
          f"resumed from step {result['resumed_from']}, {len(checkpoints)} checkpoints, "
          f"model exported: {result['exported_model']}, {'OK' if ok else 'FAILED'}")
    if args.json:
        Path(args.json).write_text(json.dumps(rb._jsonable(result), indent=1, default=str))
    if not ok:
        raise SystemExit("rl_run: the run did not finish, resume or export as expected")
    return result


if __name__ == "__main__":
    main()
