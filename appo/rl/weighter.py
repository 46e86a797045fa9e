"""APPO as one object: capture frame attention in the loss forward, turn it into token weights.

:class:`PerceptionWeighter` is built from ``perception`` (:class:`appo.config.PerceptionConfig`)
and the policy. The trainer holds one (None for an algorithm without perception weighting) and
asks two things of it per micro-batch, knowing none of its knobs::

    with weighter.capture(key, inputs, prompt_len, response_len):
        logp, hidden = token_logprobs(policy, inputs, response, temperature)  # the loss forward
    weights, stats = weighter.token_weights(key, inputs=..., mask=..., ...)    # [B*G, N]

The maths is the pure functions of :mod:`appo.rl.perception` (docs/method.md, APPO steps 1-6);
this class only wires them to the model: which layers to read, the log-probs at the selected
tokens from the final hidden states and the output head, memory-bounded frame chunks, the
``attention: random`` and ``weights: uniform`` controls, and the diagnostics it logs.

The weights of a micro-batch are computed once per step and reused by the mu passes
(:meth:`start_pass`), unless ``weights_grad``: weights that carry gradient hang on one pass's
graph, which that pass's backward frees, so every pass recomputes them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from appo.config import AlgorithmConfig, PerceptionConfig, RLConfig
from appo.data.frames import FrameStore
from appo.data.schema import VideoQA
from appo.engine import frame_attention
from appo.engine.frame_attention import TEMPORAL_PATCH
from appo.rl.perception import perception_weights, random_frame_attention, uniform_like

# Scratch for APPO's full-vocabulary log-probs at the perception tokens: frames are evaluated
# as many at a time as fit (all of them for a small vocabulary, one for Qwen's 152k).
LOGP_BUDGET_BYTES = 256 * 2**20
#: The per-group diagnostics averaged into the step's metrics (``appo/<name>``).
LOGGED = ("num_crucial_frames", "perception_token_frac", "weight_mean", "weight_max")


class PerceptionWeighter:
    """APPO's token weights for the groups of a micro-batch (``group_size`` rows each)."""

    def __init__(self, cfg: PerceptionConfig, model: torch.nn.Module, *, group_size: int,
                 max_new_tokens: int, temperature: float, seed: int,
                 store: FrameStore | None = None) -> None:
        """``model``: the unwrapped policy (its decoder layers carry the capture hooks, its
        output head gives the log-probs); ``seed`` seeds ``attention: random``; ``store``
        (optional) gives the sampled frame indices for the perception hit rate."""
        self.cfg, self.model, self.group_size = cfg, model, group_size
        self.temperature, self.seed, self.store = temperature, seed, store
        self.tokens_per_frame = cfg.tokens_per_frame(max_new_tokens)
        self.last_crucial_frames: list[list[int]] = []  # per group of the last computed batch
        self._cache: dict[int, torch.Tensor] = {}
        self._recorder: Any = None

    @classmethod
    def for_algorithm(cls, algo: AlgorithmConfig, model: torch.nn.Module, rl: RLConfig,
                      store: FrameStore | None = None) -> PerceptionWeighter | None:
        """The weighter of ``algo`` (None when its perception weighting is off)."""
        if not algo.perception.enabled:
            return None
        return cls(algo.perception, model, group_size=rl.num_generations,
                   max_new_tokens=rl.max_new_tokens, temperature=rl.temperature, seed=rl.seed,
                   store=store)

    def start_pass(self, index: int) -> None:
        """Pass ``index`` (0 .. mu-1) of a step begins: a new step computes its weights afresh,
        and so does every pass when the weights carry gradient."""
        if index == 0 or self.cfg.weights_grad:
            self._cache.clear()

    def cached(self, key: int) -> torch.Tensor | None:
        """The weights computed for micro-batch ``key`` in this step (None when not yet)."""
        return self._cache.get(key)

    def capture(self, key: int, inputs: dict, prompt_len: int, response_len: int):
        """Context for the loss forward of micro-batch ``key``: records the frame attention
        of its response tokens when the weights are still to be computed from the policy's
        attention; otherwise a no-op."""
        self._recorder = None
        if key in self._cache or self.cfg.attention != "policy":
            return contextlib.nullcontext()
        recorder = frame_attention.FrameAttentionRecorder(self.model, self.cfg.layers,
                                                          self.cfg.query_chunk)
        recorder.prepare(inputs["input_ids"], inputs["attention_mask"],
                         inputs.get("video_grid_thw"), prompt_len, response_len)
        self._recorder = recorder
        return recorder

    def token_weights(self, key: int, *, inputs: dict, mask: torch.Tensor,
                      correct: torch.Tensor, hidden: torch.Tensor, logp: torch.Tensor,
                      records: Sequence[VideoQA], groups: Sequence[int],
                      step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """``[B*G, N]`` weights of micro-batch ``key`` and its diagnostics (empty when reused).

        ``records``: one per group; ``groups``: each group's global index in the step (seeds
        the random control, independently of processes and micro-batching); ``step``: the
        step index (the same, with the RL seed, on a resume)."""
        if key in self._cache:
            return self._cache[key], {}
        if self._recorder is not None:
            attn, frame_valid = self._recorder.result()
            self._recorder = None
        else:
            frames = frame_attention.frames_per_row(self.model, inputs["input_ids"],
                                                    inputs.get("video_grid_thw"))
            attn, frame_valid = self.random_attention(mask, frames, groups, step)
        weights, stats = self.weights(attn, mask, correct, hidden, logp, records,
                                      frame_valid=frame_valid)
        self._cache[key] = weights
        return weights, stats

    def random_attention(self, mask: torch.Tensor, frames: torch.Tensor, groups: Sequence[int],
                         step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``attention: random``: seeded random frame scores in place of the captured attention.

        Same ``([B, N, T], [B, T])`` as :meth:`FrameAttentionRecorder.result` (``T`` temporal
        patches of the longest row; ``frames`` holds each row's). Each group draws from its own
        generator seeded by (seed, step, global group index), independent of torch's global RNG
        (the rollouts are untouched) and of the process count and micro-batching, so a run and
        its resume see the same scores.
        """
        g = self.group_size
        frames = frames.long().to(mask.device)
        frame_valid = torch.arange(int(frames.max()), device=mask.device)[None] < frames[:, None]
        shape = (g, mask.shape[1], frame_valid.shape[1])
        parts = []
        for start, group in zip(range(0, mask.shape[0], g), groups):
            seed = np.random.SeedSequence([self.seed, step, group])
            gen = torch.Generator().manual_seed(int(seed.generate_state(1, np.uint64)[0] >> 1))
            parts.append(random_frame_attention(shape, mask[start:start + g].bool(), gen,
                                                frame_valid[start:start + g]))
        return torch.cat(parts), frame_valid

    def weights(self, attn: torch.Tensor, mask: torch.Tensor, correct: torch.Tensor,
                hidden: torch.Tensor, logp: torch.Tensor, records: Sequence[VideoQA],
                frame_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """APPO token weights for each group of the micro-batch (one call per group), from the
        frame attention ``attn`` ``[B, N, T]``.

        ``frame_valid`` ``[B, T]``: each row's existing frames (``attn`` is padded to the
        micro-batch's longest video); a shorter video's padded frames are never crucial."""
        p, g = self.cfg, self.group_size
        lm_head = self.model.get_output_embeddings()
        K = self.tokens_per_frame
        per_frame = g * min(K, attn.shape[1]) * lm_head.out_features * 8  # f64 divergence copy
        frame_chunk = max(1, LOGP_BUDGET_BYTES // per_frame)
        device = hidden.device
        weights, infos = [], []
        h_source = hidden if p.weights_grad else hidden.detach()
        for start in range(0, attn.shape[0], g):
            sl = slice(start, start + g)
            h = h_source[sl]

            def logp_fn(index, h=h):
                # index [F, G, Kc] -> full-vocab log-probs at those positions only
                f, gg, kc = index.shape
                rows = torch.arange(gg, device=index.device).view(1, gg, 1).expand_as(index)
                picked = h[rows.reshape(-1), index.reshape(-1)]
                logits = lm_head(picked).float() / self.temperature
                return torch.log_softmax(logits, -1).view(f, gg, kc, -1)

            w, info = perception_weights(
                attn[sl].to(device), mask[sl].bool(), correct[sl].to(device), logp_fn,
                k_avg=p.k_avg, k_f=p.k_f, K=K, w_max=p.w_max, select_level=p.select_level,
                select_strategy=p.select_strategy, weights_grad=p.weights_grad,
                frame_chunk=frame_chunk,
                frame_valid=None if frame_valid is None else frame_valid[sl].to(device))
            if p.weights == "uniform":  # control: same total emphasis, spread evenly
                w = uniform_like(w, mask[sl].bool().to(w.device))
                info["weight_max"] = info["weight_mean"]  # every valid token has the mean
            weights.append(w.to(hidden.dtype) if not p.weights_grad else w)
            infos.append(info)
        stats = {f"appo/{k}": float(np.mean([float(i[k]) for i in infos])) for k in LOGGED}
        self.last_crucial_frames = [i["crucial_frames"].tolist() for i in infos]
        hits = [self.key_frame_share(qa, frames)
                for qa, frames in zip(records, self.last_crucial_frames)]
        hits = [h for h in hits if h is not None]
        if hits:
            stats["appo/perception_hit_rate"] = float(np.mean(hits))
        return torch.cat(weights), stats

    def key_frame_share(self, qa: VideoQA, crucial: list[int]) -> float | None:
        """Share of crucial temporal patches that cover an annotated key frame.

        Diagnostics only (logged, never fed back): ``key_frames`` exist on synthetic data.
        """
        if not qa.key_frames or not crucial or self.store is None:
            return None
        indices = self.store.get(qa.video).indices
        keys = set(qa.key_frames)
        return float(np.mean([bool(keys & set(indices[TEMPORAL_PATCH * t:
                                                      TEMPORAL_PATCH * (t + 1)]))
                              for t in crucial]))
