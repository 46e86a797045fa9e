"""DVC stage ``eval``: greedy evaluation of one checkpoint on the test split and extra benchmarks.

``python -m appo.stages.eval --checkpoint DIR --name NAME [--params params.yaml] [--out DIR]``

Benchmarks: every split in ``eval.splits`` (default ``test``) of ``data.out_dir``, with frames
from the ``frames`` stage cache, plus each ``eval.benchmarks`` entry (name -> annotation file in
any supported format, paths remapped with ``eval.video_root``/``image_root``/``strip_prefix``
or the entry's own roots), whose videos and images are extracted into
``<out>/frames/<name>`` (at the pixel budget of ``eval.protocol``, if it sets one). Writes, atomically, to ``<out>``
(default ``outputs/eval/<name>``):

* ``predictions.jsonl``: one scored row per question (see :func:`appo.eval.runner.evaluate`);
* ``metrics.json``: ``{"checkpoint", "name", "overall", "benchmarks", "by_family",
  "by_problem_type", "missing", "missing_policy", "settings", "provenance"}`` (provenance: the
  DVC experiment and params fingerprint, :func:`appo.mlflow_setup.provenance`);
* ``metrics.md``: the same as markdown tables;
* with ``--headline PATH``: accuracy, CI and hit rate there (:mod:`appo.headline`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from appo.config import (
    EVAL_PROTOCOLS,
    MISSING_POLICIES,
    ConfigError,
    DataConfig,
    EvalConfig,
    FramesConfig,
    ModelConfig,
    load_section,
)
from appo.data.dataset import load_split, split_path
from appo.data.formats import PathRemap, load_source
from appo.data.frames import FrameError, FrameStore, extract_records
from appo.data.schema import VideoQA
from appo.eval.metrics import aggregate, markdown_table
from appo.eval.protocol import PROTOCOLS
from appo.eval.runner import HitRateFn, evaluate
from appo.headline import write_headline
from appo.io import atomic_write_json, atomic_write_text
from appo.mlflow_setup import provenance
from appo.stages import stage_main

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


def check_config(cfg: EvalConfig) -> None:
    if cfg.missing not in MISSING_POLICIES:
        raise ConfigError(f"'eval.missing' must be one of {', '.join(MISSING_POLICIES)}, "
                          f"got {cfg.missing!r}")
    if cfg.batch_size < 1:
        raise ConfigError(f"'eval.batch_size' must be >= 1, got {cfg.batch_size}")
    if cfg.max_new_tokens < 1:
        raise ConfigError(f"'eval.max_new_tokens' must be >= 1, got {cfg.max_new_tokens}")
    if cfg.protocol not in EVAL_PROTOCOLS:
        raise ConfigError(f"'eval.protocol' must be one of {', '.join(EVAL_PROTOCOLS)}, "
                          f"got {cfg.protocol!r}")
    if cfg.samples < 0:
        raise ConfigError(f"'eval.samples' must be >= 0 (0 = greedy only), got {cfg.samples}")
    for name in [*cfg.splits, *cfg.benchmarks]:
        if not _NAME_RE.match(name):
            raise ConfigError(f"eval benchmark name {name!r} may only use letters, digits, "
                              "'_', '-' and '.'")
    clash = sorted(set(cfg.splits) & set(cfg.benchmarks))
    if clash:
        raise ConfigError(f"'eval.benchmarks.{clash[0]}' has the same name as a split in "
                          "'eval.splits'; rename it")


def load_benchmarks(
    data: DataConfig, frames: FramesConfig, cfg: EvalConfig, out_dir: Path
) -> list[tuple[str, list[VideoQA], FrameStore | None, list[str]]]:
    """(name, records, frame store, load problems) for every split and extra benchmark."""
    out: list[tuple[str, list[VideoQA], FrameStore | None, list[str]]] = []
    if cfg.splits:
        store = FrameStore(frames.out_dir)
        for split in cfg.splits:
            out.append((split, load_split(split_path(data.out_dir, split)), store, []))
    remap = PathRemap(cfg.video_root, cfg.image_root, cfg.strip_prefix)
    pixels = PROTOCOLS[cfg.protocol].max_pixels
    bench_frames = dataclasses.replace(frames, max_pixels=pixels) if pixels else frames
    for name, entry in cfg.benchmarks.items():
        path, records, report = load_source(entry, remap, seed=cfg.seed)
        for problem in report.problems:
            print(f"warning: {name}: {problem}")
        cache = out_dir / "frames" / name
        try:
            extract_records(records, cache, bench_frames)
        except FrameError as exc:  # nothing decodable: a broken download, not a 0% benchmark
            raise FrameError(f"{path}: {exc}") from exc
        out.append((name, records, FrameStore(cache), report.problems))
    return out


def _flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Numeric metrics for the tracker: ``overall/accuracy``, ``<bench>/mIoU``, ``family/..``.

    Keys may carry names from the data; :func:`appo.tracking.metric_key` cleans them on logging.
    """
    keys = ("accuracy", "sampled_accuracy", "reward", "mIoU", "perception_hit_rate", "n",
            "missing")

    def put(out: dict[str, float], prefix: str, stats: dict[str, Any]) -> None:
        for key in keys:
            if stats.get(key) is not None:
                out[f"{prefix}/{key}"] = float(stats[key])
        lo, hi = stats.get("ci95") or (None, None)
        if lo is not None and hi is not None:
            out[f"{prefix}/accuracy_ci_lo"] = float(lo)
            out[f"{prefix}/accuracy_ci_hi"] = float(hi)

    flat: dict[str, float] = {}
    put(flat, "overall", metrics["overall"])
    for name, stats in metrics["benchmarks"].items():
        put(flat, f"bench/{name}", stats)
    for name, stats in metrics["by_family"].items():
        put(flat, f"family/{name}", stats)
    for name, stats in metrics["by_problem_type"].items():
        put(flat, f"type/{name}", stats)
    return flat


def run(
    checkpoint: str | Path,
    name: str,
    data: DataConfig,
    frames: FramesConfig,
    model_cfg: ModelConfig,
    cfg: EvalConfig,
    out_dir: str | Path | None = None,
    *,
    hit_rate_fn: HitRateFn | None = None,
    model_and_processor: tuple[Any, Any] | None = None,
    headline: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` and write the three files; returns the metrics dict.

    ``headline``: also write the few headline numbers DVC shows there (:mod:`appo.headline`).

    ``model_and_processor`` reuses an already loaded policy (tests, in-process flows) instead
    of loading ``checkpoint`` again; ``checkpoint`` is then only recorded.
    """
    import torch

    from appo.tracking import RunLogger

    check_config(cfg)
    out = Path(out_dir) if out_dir is not None else Path("outputs/eval") / name
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    benchmarks = load_benchmarks(data, frames, cfg, out)

    if model_and_processor is None:
        from appo.models.loading import load_policy

        model, processor = load_policy(checkpoint, model_cfg.dtype,
                                       model_cfg.attn_implementation, model_cfg.device)
    else:
        model, processor = model_and_processor

    if hit_rate_fn is None and cfg.perception_layers:
        from functools import partial

        from appo.eval.perception import perception_hits

        hit_rate_fn = partial(perception_hits, layers=cfg.perception_layers)
    rows: list[dict[str, Any]] = []
    missing: list[dict[str, Any]] = []
    for bench, records, store, _ in benchmarks:
        bench_rows, report = evaluate(
            model, processor, records, store, batch_size=cfg.batch_size,
            max_new_tokens=cfg.max_new_tokens, benchmark_name=bench, missing=cfg.missing,
            hit_rate_fn=hit_rate_fn, samples=cfg.samples, protocol=PROTOCOLS[cfg.protocol])
        rows.extend(bench_rows)
        missing.extend(report["missing"])
        if report["missing"]:
            print(f"eval: {bench}: {len(report['missing'])} question(s) with missing media "
                  f"({'scored wrong' if cfg.missing == 'wrong' else 'excluded'})")

    metrics: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "name": name,
        **aggregate(rows),
        "missing": missing,
        "missing_policy": cfg.missing,
        "settings": dataclasses.asdict(cfg),
        "provenance": provenance(),
    }
    atomic_write_text(out / "predictions.jsonl",
                      "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_text(out / "metrics.md", markdown_table(metrics))
    write_headline(headline, "eval", metrics)

    with RunLogger(out, f"eval-{name}", tags={"stage": "eval"}) as logger:
        logger.log_params({"checkpoint": str(checkpoint), "name": name,
                           "eval": dataclasses.asdict(cfg)})
        logger.log_metrics(_flat_metrics(metrics), step=0)
        for file in ("metrics.json", "metrics.md", "predictions.jsonl"):
            logger.log_artifact(out / file)

    overall = metrics["overall"]
    acc = "-" if overall["accuracy"] is None else f"{100 * overall['accuracy']:.1f}%"
    print(f"eval: {name}: {overall['n']} questions, accuracy {acc}; wrote {out}")
    return metrics


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory to evaluate")
    parser.add_argument("--name", required=True, help="run name (default out: outputs/eval/NAME)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default=None, help="output directory")
    parser.add_argument("--headline", default=None,
                        help="also write the headline metrics (DVC's metrics file) here")
    args = parser.parse_args(argv)
    run(
        args.checkpoint,
        args.name,
        load_section(DataConfig, "data", args.params),
        load_section(FramesConfig, "frames", args.params),
        load_section(ModelConfig, "model", args.params),
        load_section(EvalConfig, "eval", args.params),
        args.out,
        headline=args.headline,
    )


if __name__ == "__main__":
    main()
