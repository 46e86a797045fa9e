"""Run a policy over benchmark questions: batched greedy decoding, scored with the RL rules.

Decoding is greedy (deterministic) and batches keep the input order, so two runs of the same
checkpoint on the same records give identical predictions. A question whose video is not in
the frame cache (or whose observation image does not exist) is never silently dropped: by
default it is scored wrong (``missing="wrong"``), or left out of the metrics with
``missing="exclude"``; either way it is listed, with its id and the reason, in the report.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from appo.config import MISSING_POLICIES
from appo.data.collate import encode_prompts
from appo.data.frames import FrameStore
from appo.data.schema import VideoQA
from appo.engine.rollout import Rollout, generate
from appo.eval.metrics import score_prediction
from appo.eval.protocol import PROTOCOLS, Protocol

__all__ = ["MISSING_POLICIES", "HitRateFn", "evaluate", "missing_reason"]


# Perception hook: called once per batch with (model, processor, batch records, greedy rollout,
# frame store); returns one value per question: True if the policy's attention hit the key
# frames, False if not, None when it cannot tell (no key frames). Default: perception_hits.
HitRateFn = Callable[[Any, Any, Sequence[VideoQA], Rollout, FrameStore], Sequence[bool | None]]


def missing_reason(qa: VideoQA, store: FrameStore | None) -> str | None:
    """Why the question cannot be run (its media are unavailable), or None when it can.

    A video must be in the frame cache; an image may also be read from its file.
    """
    if store is None:
        return f"nothing cached for this benchmark: {qa.video}"
    if qa.video_file is not None and qa.video_file not in store:
        if not os.path.exists(qa.video_file):
            return f"video file not found: {qa.video_file}"
        return f"video not in the frame cache (unreadable or not extracted): {qa.video_file}"
    image = qa.image_file
    if image is not None and image not in store and not os.path.isfile(image):
        return f"image file not found: {image}"
    return None


def _row(qa: VideoQA, benchmark: str, response: str | None, scoring: str = "pipeline",
         **extra: Any) -> dict[str, Any]:
    scored = score_prediction(qa, response, scoring)
    return {
        "problem_id": qa.problem_id,
        "benchmark": benchmark,
        "family": qa.family,
        "problem_type": qa.problem_type,
        "dataset_name": qa.dataset_name,
        "video": qa.video,
        "gold": qa.answer,
        "response": response,
        **scored,
        **extra,
    }


def evaluate(
    model,
    processor,
    records: Sequence[VideoQA],
    store: FrameStore | None,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 64,
    benchmark_name: str = "test",
    missing: str = "wrong",
    hit_rate_fn: HitRateFn | None = None,
    progress: bool = True,
    cache: str = "auto",
    samples: int = 0,
    protocol: Protocol = PROTOCOLS["pipeline"],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Greedy-decode every question and score it; returns ``(rows, report)``.

    ``samples`` > 0 also draws that many responses per question at temperature 1 (the RL
    sampling distribution; seed torch's RNG first for reproducible numbers) and adds
    ``sampled_accuracy``, the fraction of them that are correct: RL first sharpens the sampled
    distribution, which greedy accuracy can hide.

    ``store`` is the frame cache holding the records' videos (None: nothing is cached, every
    question is missing). Each row has ``problem_id``, ``benchmark``, ``family``,
    ``problem_type``, ``dataset_name``, ``video``, ``gold``, ``response`` (raw text, None when
    missing), ``answer`` (extracted), ``choice`` (multiple choice), ``correct``, ``reward``,
    ``iou`` (None without gold time spans), ``pred_spans`` (with gold spans), ``truncated``
    (no end-of-turn within ``max_new_tokens``), ``missing`` and ``perception_hit`` (None
    unless ``hit_rate_fn`` is given). Rows follow the order of ``records``. ``cache``: the
    rollout engine's KV cache (:func:`appo.engine.rollout.resolve_cache`).

    ``protocol`` sets the decoding (greedy, or its temperature / top-p) and the scoring rules
    (:mod:`appo.eval.protocol`).

    ``report``: ``benchmark``, ``missing_policy``, ``n_records``, ``n_scored`` (rows returned),
    ``n_excluded`` and ``missing`` (a list of ``{"problem_id", "benchmark", "reason"}``).
    """
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing must be one of {', '.join(MISSING_POLICIES)}, got {missing!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    reasons = [missing_reason(qa, store) for qa in records]
    runnable = [i for i, reason in enumerate(reasons) if reason is None]
    rows: dict[int, dict[str, Any]] = {}

    batches = [runnable[s : s + batch_size] for s in range(0, len(runnable), batch_size)]
    iterator: Any = batches
    if progress and batches:
        from tqdm import tqdm

        iterator = tqdm(batches, desc=f"eval {benchmark_name}", unit="batch")
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        for idx in iterator:
            batch_records = [records[i] for i in idx]
            batch = encode_prompts(processor, batch_records, store)
            rollout = generate(model, processor, batch, num_samples=1,
                               max_new_tokens=max_new_tokens, greedy=protocol.greedy,
                               temperature=protocol.temperature, top_p=protocol.top_p,
                               cache=cache)
            hits: Sequence[bool | None] = [None] * len(idx)
            if hit_rate_fn is not None:
                hits = list(hit_rate_fn(model, processor, batch_records, rollout, store))
                if len(hits) != len(idx):
                    raise ValueError(f"hit_rate_fn returned {len(hits)} values for a batch of "
                                     f"{len(idx)} questions")
            sampled: list[float | None] = [None] * len(idx)
            if samples > 0:
                drawn = generate(model, processor, batch, num_samples=samples,
                                 max_new_tokens=max_new_tokens, temperature=1.0, cache=cache)
                sampled = [sum(score_prediction(qa, drawn.texts[j * samples + k],
                                                protocol.scoring)["correct"]
                               for k in range(samples)) / samples
                           for j, qa in enumerate(batch_records)]
            for j, i in enumerate(idx):
                hit = hits[j]
                extra = {} if sampled[j] is None else {"sampled_accuracy": sampled[j]}
                rows[i] = _row(records[i], benchmark_name, rollout.texts[j], protocol.scoring,
                               truncated=bool(rollout.truncated[j]), missing=False,
                               perception_hit=None if hit is None else bool(hit), **extra)
    finally:
        if was_training:
            model.train()

    missing_list = []
    for i, reason in enumerate(reasons):
        if reason is None:
            continue
        qa = records[i]
        missing_list.append({"problem_id": qa.problem_id, "benchmark": benchmark_name,
                             "reason": reason})
        if missing == "wrong":
            extra = {"sampled_accuracy": 0.0} if samples > 0 else {}
            rows[i] = _row(qa, benchmark_name, None, protocol.scoring, truncated=False, missing=True,
                           perception_hit=None, **extra)

    ordered = [rows[i] for i in sorted(rows)]
    report = {
        "benchmark": benchmark_name,
        "missing_policy": missing,
        "n_records": len(records),
        "n_scored": len(ordered),
        "n_excluded": len(records) - len(ordered),
        "missing": missing_list,
    }
    return ordered, report
