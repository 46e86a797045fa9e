"""The one RL trainer that GRPO, DAPO and APPO share.

A step: sample G responses for each prompt -> rewards (+ DAPO overlong shaping) -> DAPO dynamic
sampling (optional) -> group advantages -> mu policy updates over micro-batches of whole groups
(so group statistics and APPO's intra-group weights stay exact) with the clipped surrogate.
The algorithms differ only in :class:`appo.config.AlgorithmConfig` values, which select the
pure functions in :mod:`appo.rl.objectives` and :mod:`appo.rl.perception`; there is no
``if algo == ...`` anywhere.

Data parallel (``accelerate launch``): every process collects and trains its own
``prompts_per_step / num_processes`` whole groups from one shared prompt stream, the wrapped
policy (DDP/FSDP) averages gradients, which equals the single-process update on the same global
batch because each process divides its loss by the global batch's token (or sequence) count and
multiplies it by the number of processes; metrics are combined across processes
(:mod:`appo.train.distributed`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from appo.config import AlgorithmConfig, RLConfig
from appo.data.collate import encode_prompts
from appo.data.frames import FrameStore
from appo.data.schema import VideoQA
from appo.engine.rollout import Rollout, concat_rollouts, generate, token_logprobs
from appo.rl import objectives, temporal
from appo.rl.perception import perception_weights, random_frame_attention, uniform_like
from appo.rl.rewards import RewardSpec, score_responses
from appo.train import distributed as dist
from appo.train.common import SkipCounter, clip_gradients, is_lora

# Scratch for APPO's full-vocabulary log-probs at the perception tokens: frames are evaluated
# as many at a time as fit (all of them for a small vocabulary, one for Qwen's 152k).
LOGP_BUDGET_BYTES = 256 * 2**20


@dataclass
class Batch:
    """A rollout with everything the update needs (group-major rows)."""

    rollout: Rollout
    records: list[VideoQA]  # one per row
    rewards: torch.Tensor  # [B*G] total (shaped) reward
    correct: torch.Tensor  # [B*G] bool, accuracy >= tau
    advantages: torch.Tensor  # [B*G]
    metrics: dict[str, float]

    def select(self, rows: torch.Tensor) -> Batch:
        """The batch restricted to ``rows`` (whole groups: e.g. one process's share)."""
        idx = rows.tolist()
        return Batch(self.rollout.select(rows), [self.records[i] for i in idx],
                     self.rewards[rows], self.correct[rows], self.advantages[rows],
                     dict(self.metrics))


class PromptSampler:
    """Seeded epoch-wise shuffling; the position is state, so a resumed run sees the same order."""

    def __init__(self, records: Sequence[VideoQA], seed: int) -> None:
        if not records:
            raise ValueError("the RL split is empty")
        self.records, self.seed, self.position = list(records), seed, 0

    def next(self, count: int) -> list[VideoQA]:
        out = []
        for _ in range(count):
            epoch, offset = divmod(self.position, len(self.records))
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.records))
            out.append(self.records[order[offset]])
            self.position += 1
        return out


RewardFn = Callable[[Sequence[str], Sequence[VideoQA]], dict[str, list[float]]]


def shaped_rewards(rollout: Rollout, records: Sequence[VideoQA], reward_fn: RewardFn,
                   algo: AlgorithmConfig, max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Total reward per response (weighted components + DAPO overlong penalty + T-GRPO length
    bonus) and the accuracy reward per response.

    ``reward_fn(texts, records)`` returns per-response component lists including "total"
    (and "accuracy", which decides correctness for APPO's S1/S2 split; else "total" does).
    """
    scores = reward_fn(rollout.texts, records)
    total = torch.tensor(scores["total"], dtype=torch.float32)
    accuracy = torch.tensor(scores.get("accuracy", scores["total"]), dtype=torch.float32)
    metrics = {f"reward/{k}": float(np.mean(v)) for k, v in scores.items()}
    if algo.overlong_buffer > 0:
        # Truncated responses count as longer than the budget (-> full penalty).
        lengths = rollout.lengths.cpu() + rollout.truncated.cpu().long()
        penalty = objectives.overlong_penalty(lengths, max_new_tokens, algo.overlong_buffer,
                                              algo.overlong_penalty)
        total = total + penalty
        metrics["reward/overlong"] = float(penalty.mean())
    t = algo.temporal
    if t.length_bonus > 0:
        extra = temporal.length_bonus(rollout.lengths.cpu(), accuracy, t.length_min,
                                      t.length_max, t.length_bonus)
        total = total + extra
        metrics["reward/length"] = float(extra.mean())
    return total, accuracy, metrics


class RLTrainer:
    """Composes rollout, rewards, advantages and the policy loss; owns no algorithm branches."""

    def __init__(self, model, processor, cfg: RLConfig, algo: AlgorithmConfig,
                 records: Sequence[VideoQA], store: FrameStore, *, ref_model=None,
                 optimizer=None, scheduler=None, reward_fn: RewardFn | None = None,
                 accelerator=None) -> None:
        """``model`` may be the accelerate-prepared policy (DDP/FSDP-wrapped, autocast): its
        forward trains, the unwrapped module generates and carries the attention hooks."""
        if cfg.num_generations < 2:
            raise ValueError("rl.num_generations must be >= 2 (group statistics need a group)")
        if algo.beta > 0 and ref_model is None and not is_lora(model):
            raise ValueError("beta > 0 needs a reference model (or a LoRA policy, whose base "
                             "with adapters disabled is the reference)")
        self.accelerator = accelerator
        self.rank, self.world = dist.rank_and_world(accelerator)
        self.local_prompts = dist.local_count(cfg.prompts_per_step, self.world,
                                              "rl.prompts_per_step")
        self.policy = model  # what the loss forward runs through (gradient sync)
        self.model = accelerator.unwrap_model(model) if accelerator is not None else model
        self.processor, self.cfg, self.algo = processor, cfg, algo
        self.ref_model, self.store = ref_model, store
        self.sampler = PromptSampler(records, cfg.seed)
        self.reward_fn = reward_fn or partial(
            score_responses, spec=RewardSpec(weights=dict(cfg.reward_weights)))
        self.optimizer = optimizer or torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=cfg.lr,
            weight_decay=cfg.weight_decay)
        self.scheduler = scheduler
        self.device = (accelerator.device if accelerator is not None
                       else next(self.model.parameters()).device)
        self.skips = SkipCounter(cfg.max_bad_steps)
        self.steps_done = 0

    # -- rollout phase -------------------------------------------------------------------
    def _rollout(self, records: list[VideoQA], num_samples: int,
                 shuffle_seed: int | None = None) -> tuple[Rollout, list[VideoQA]]:
        batch = encode_prompts(self.processor, records, self.store, shuffle_seed=shuffle_seed)
        self.model.eval()
        rollout = generate(self.model, self.processor, batch, num_samples=num_samples,
                           max_new_tokens=self.cfg.max_new_tokens,
                           temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                           cache=self.cfg.rollout_cache)
        rows = [qa for qa in records for _ in range(num_samples)]
        return rollout, rows

    def _temporal_bonus(self, records: list[VideoQA], accuracy: torch.Tensor) -> torch.Tensor:
        """T-GRPO: sample G' responses on shuffled frames; bonus if order helped (not trained)."""
        t, g = self.algo.temporal, self.cfg.num_generations
        g_shuffled = max(1, round(g * t.shuffled_fraction))
        seed = int(torch.randint(0, 2**31 - 1, (1,)))  # from the (checkpointed) torch RNG
        shuffled, rows = self._rollout(records, g_shuffled, shuffle_seed=seed)
        scores = self.reward_fn(shuffled.texts, rows)
        acc_shuffled = torch.tensor(scores.get("accuracy", scores["total"]), dtype=torch.float32)
        return temporal.temporal_bonus(accuracy, acc_shuffled, g, g_shuffled, t.bonus,
                                       t.condition, t.ratio)

    def collect(self) -> Batch:
        """Rollouts until this process's share of ``prompts_per_step`` groups are kept (DAPO
        dynamic sampling). Every process draws the same prompts per round and takes its own
        slice, so the prompt stream (and a resume's position in it) is process-independent."""
        cfg, algo, g = self.cfg, self.algo, self.cfg.num_generations
        tau = algo.perception.tau
        kept: list[Rollout] = []
        kept_rows: list[VideoQA] = []
        rewards, correct = [], []
        metrics: dict[str, list[float]] = {}
        generated_tokens, t0 = 0, time.perf_counter()
        rounds = algo.max_sampling_rounds if algo.dynamic_sampling else 1
        groups_seen = 0
        for _ in range(rounds):
            need = self.local_prompts - sum(r.prompt_ids.shape[0] // g for r in kept)
            most = dist.max_across(need, self.accelerator)
            if most <= 0:
                break
            drawn = self.sampler.next(most * self.world)
            prompts = drawn[self.rank * most: self.rank * most + need]
            if not prompts:  # this process is full; the others sample on
                continue
            rollout, rows = self._rollout(prompts, g)
            generated_tokens += int(rollout.lengths.sum())
            total, accuracy, m = shaped_rewards(rollout, rows, self.reward_fn, algo,
                                                cfg.max_new_tokens)
            if algo.temporal.enabled:
                bonus = self._temporal_bonus(prompts, accuracy)
                total = total + bonus
                m["reward/temporal"] = float(bonus.mean())
            ok = accuracy >= tau
            for k, v in m.items():
                metrics.setdefault(k, []).append(v)
            metrics.setdefault("accuracy", []).append(float(ok.float().mean()))
            metrics.setdefault("response_length", []).append(float(rollout.lengths.float().mean()))
            metrics.setdefault("truncated_frac", []).append(float(rollout.truncated.float().mean()))
            groups_seen += need
            if algo.dynamic_sampling:
                keep_groups = objectives.groups_with_signal(total, g)
                rows_mask = keep_groups.repeat_interleave(g)
                idx = rows_mask.nonzero().squeeze(1)
                if idx.numel() == 0:
                    continue
                rollout, total, ok = rollout.select(idx), total[idx], ok[idx]
                rows = [rows[i] for i in idx.tolist()]
            kept.append(rollout)
            kept_rows += rows
            rewards.append(total)
            correct.append(ok)
        if not kept:  # every group had equal rewards: fall back to the last rollout (zero advantage)
            kept, kept_rows, rewards, correct = [rollout], rows, [total], [ok]
        merged = concat_rollouts(kept, self.processor.tokenizer.pad_token_id)
        reward = torch.cat(rewards)
        n_groups = merged.prompt_ids.shape[0] // g
        if n_groups > self.local_prompts:  # a final round may overshoot; keep whole groups
            idx = torch.arange(self.local_prompts * g)
            merged, reward = merged.select(idx), reward[idx]
            kept_rows = kept_rows[: len(idx)]
            correct = [torch.cat(correct)[idx]]
        elapsed = time.perf_counter() - t0
        out = {k: float(np.mean(v)) for k, v in metrics.items()}
        out.update({
            "groups_kept": float(merged.prompt_ids.shape[0] // g),
            "groups_sampled": float(groups_seen),
            "rollout_tokens_per_s": generated_tokens / max(elapsed, 1e-9),
            "rollout_time": elapsed,
        })
        advantages = objectives.group_advantages(reward, g, scale_std=algo.scale_std)
        return Batch(merged, kept_rows, reward, torch.cat(correct), advantages, out)

    # -- update phase --------------------------------------------------------------------
    def _micro_batches(self, batch: Batch) -> list[torch.Tensor]:
        g = self.cfg.num_generations
        rows = torch.arange(batch.rollout.prompt_ids.shape[0])
        return list(rows.split(self.cfg.groups_per_micro_batch * g))

    def _loss(self, batch: Batch, rows: torch.Tensor, weights_cache: dict,
              denominator: float | None = None) -> tuple[torch.Tensor, dict]:
        """The policy loss of micro-batch ``rows``: its share of the step's loss when
        ``denominator`` is the step's :func:`objectives.aggregation_denominator` (see
        :meth:`update`), else the micro-batch's own mean."""
        cfg, algo = self.cfg, self.algo
        part = batch.rollout.select(rows)
        inputs = {k: v.to(self.device) for k, v in part.model_inputs().items()}
        response = part.response_ids.to(self.device)
        mask = part.response_mask.to(self.device)
        perception = algo.perception.enabled and int(rows[0]) not in weights_cache
        recorder = None
        if perception and algo.perception.attention == "policy":  # random scores need no capture
            from appo.engine.frame_attention import FrameAttentionRecorder

            recorder = FrameAttentionRecorder(self.model, algo.perception.layers,
                                              algo.perception.query_chunk)
            recorder.prepare(inputs["input_ids"], inputs["attention_mask"],
                             inputs.get("video_grid_thw"), part.prompt_ids.shape[1],
                             response.shape[1])
            with recorder:
                logp, hidden = token_logprobs(self.policy, inputs, response, cfg.temperature)
        else:
            logp, hidden = token_logprobs(self.policy, inputs, response, cfg.temperature)
        old = part.logprobs.to(self.device) if cfg.num_iterations > 1 else logp.detach()
        stats: dict[str, float] = {}
        weights = None
        if algo.perception.enabled:
            if perception:
                attn, frame_valid = (recorder.result() if recorder is not None else
                                     self._random_attention(mask, self._frames(inputs), rows))
                weights_cache[int(rows[0])], pstats = self._perception_weights(
                    attn, mask, batch.correct[rows], hidden, logp,
                    [batch.records[i] for i in rows[:: self.cfg.num_generations].tolist()],
                    frame_valid=frame_valid)
                stats.update(pstats)
            weights = weights_cache[int(rows[0])]
        ref = None
        if algo.beta > 0:
            ref = self._reference_logprobs(inputs, response)
        loss, lstats = objectives.policy_loss(
            logp, old, batch.advantages[rows].to(self.device), mask,
            clip_low=algo.clip_low, clip_high=algo.clip_high, agg_mode=algo.agg_mode,
            token_weights=weights, weight_mode=algo.weight_mode, logp_ref=ref, beta=algo.beta,
            max_len=cfg.max_new_tokens, denominator=denominator)
        stats.update({k: float(v) for k, v in lstats.items()})
        with torch.no_grad():
            stats["entropy_proxy"] = float(-(logp.detach() * mask).sum() / mask.sum().clamp(min=1))
        return loss, stats

    @torch.no_grad()
    def _reference_logprobs(self, inputs: dict, response: torch.Tensor) -> torch.Tensor:
        """log p_ref of the response tokens: the frozen copy, or the LoRA base (no second model)."""
        if self.ref_model is not None:
            return token_logprobs(self.ref_model, inputs, response, self.cfg.temperature)[0]
        with self.model.disable_adapter():
            return token_logprobs(self.model, inputs, response, self.cfg.temperature)[0]

    def _frames(self, inputs: dict) -> torch.Tensor:
        """Temporal patches of each row's video, 1 for an image-only row (``[B]``)."""
        from appo.engine.frame_attention import frames_per_row

        return frames_per_row(self.model, inputs["input_ids"], inputs.get("video_grid_thw"))

    def _random_attention(self, mask: torch.Tensor, frames: torch.Tensor,
                          rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``attention: random``: seeded random frame scores in place of the captured attention.

        Same ``([B, N, T], [B, T])`` as :meth:`FrameAttentionRecorder.result` (``T`` temporal
        patches of the longest row; ``frames`` holds each row's, see :meth:`_frames`). Each group
        draws from its own generator seeded by (rl seed, step, global group index), independent
        of torch's global RNG (the rollouts are untouched) and of the process count and
        micro-batching, so a run and its resume see the same scores.
        """
        g = self.cfg.num_generations
        frames = frames.long().to(mask.device)
        frame_valid = torch.arange(int(frames.max()), device=mask.device)[None] < frames[:, None]
        shape = (g, mask.shape[1], frame_valid.shape[1])
        parts = []
        for start in range(0, mask.shape[0], g):
            group = self.rank * self.local_prompts + (int(rows[start]) // g)
            seed = np.random.SeedSequence([self.cfg.seed, self.steps_done, group])
            gen = torch.Generator().manual_seed(int(seed.generate_state(1, np.uint64)[0] >> 1))
            parts.append(random_frame_attention(shape, mask[start:start + g].bool(), gen,
                                                frame_valid[start:start + g]))
        return torch.cat(parts), frame_valid

    def _perception_weights(self, attn, mask, correct, hidden, logp,
                            group_records: list[VideoQA],
                            frame_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """APPO token weights for each group of the micro-batch (one call per group).

        ``frame_valid`` ``[B, T]``: each row's existing frames (``attn`` is padded to the
        micro-batch's longest video); a shorter video's padded frames are never crucial."""
        p, g = self.algo.perception, self.cfg.num_generations
        lm_head = self.model.get_output_embeddings()
        K = p.tokens_per_frame(self.cfg.max_new_tokens)
        per_frame = g * min(K, attn.shape[1]) * lm_head.out_features * 8  # f64 divergence copy
        frame_chunk = max(1, LOGP_BUDGET_BYTES // per_frame)
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
                logits = lm_head(picked).float() / self.cfg.temperature
                return torch.log_softmax(logits, -1).view(f, gg, kc, -1)

            w, info = perception_weights(
                attn[sl].to(self.device), mask[sl].bool(), correct[sl].to(self.device), logp_fn,
                k_avg=p.k_avg, k_f=p.k_f, K=K, w_max=p.w_max, select_level=p.select_level,
                select_strategy=p.select_strategy, weights_grad=p.weights_grad,
                frame_chunk=frame_chunk,
                frame_valid=None if frame_valid is None else frame_valid[sl].to(self.device))
            if p.weights == "uniform":  # control: same total emphasis, spread evenly
                w = uniform_like(w, mask[sl].bool().to(w.device))
                info["weight_max"] = info["weight_mean"]  # every valid token has the mean
            weights.append(w.to(hidden.dtype) if not p.weights_grad else w)
            infos.append(info)
        stats = {
            f"appo/{k}": float(np.mean([float(i[k]) for i in infos]))
            for k in ("num_crucial_frames", "perception_token_frac", "weight_mean", "weight_max")
        }
        self.last_crucial_frames = [i["crucial_frames"].tolist() for i in infos]
        hits = [self._key_frame_share(qa, frames)
                for qa, frames in zip(group_records, self.last_crucial_frames)]
        hits = [h for h in hits if h is not None]
        if hits:
            stats["appo/perception_hit_rate"] = float(np.mean(hits))
        return torch.cat(weights), stats

    def _key_frame_share(self, qa: VideoQA, crucial: list[int]) -> float | None:
        """Share of crucial temporal patches that cover an annotated key frame.

        Diagnostics only (logged, never fed back): ``key_frames`` exist on synthetic data.
        """
        if not qa.key_frames or not crucial:
            return None
        indices = self.store.get(qa.video).indices
        keys = set(qa.key_frames)
        return float(np.mean([bool(keys & set(indices[2 * t: 2 * t + 2])) for t in crucial]))

    def train_step(self) -> dict[str, float]:
        """One RL step: collect, then mu passes of accumulated micro-batch updates.

        Torch's RNG is seeded from (seed, step, process) first, so sampling is reproducible
        on resume and differs between processes.
        """
        t0 = time.perf_counter()
        torch.manual_seed(dist.step_seed(self.cfg.seed, self.steps_done, self.rank))
        batch = self.collect()
        self.last_batch = batch
        metrics = self.update(batch)
        metrics["step_time"] = time.perf_counter() - t0
        return dist.combine_metrics(metrics, self.accelerator)

    def update(self, batch: Batch) -> dict[str, float]:
        """mu passes of gradient-accumulated updates on this process's part of the batch.

        The step's loss is ONE aggregate over the global batch (e.g. token-mean: the mean over
        all valid tokens of all processes), whatever the micro-batching: every micro-batch sums
        its terms and divides by the global :func:`objectives.aggregation_denominator` (valid
        tokens, or sequences for the seq-mean modes; summed over processes), times the number
        of processes because the data-parallel wrapper averages their gradients. The update is
        skipped everywhere if any process saw a non-finite loss or the (synchronised) gradient
        norm is not finite.

        APPO's token weights are computed once per group and reused by the mu passes, unless
        ``perception.weights_grad``: weights that carry gradient are recomputed by every pass
        (a pass's backward frees the graph they hang on).
        """
        micro = self._micro_batches(batch)
        self.policy.train()
        weights_cache: dict = {}
        stats_all: list[dict] = []
        grad_norm = 0.0
        params = [p for p in self.model.parameters() if p.requires_grad]
        local = objectives.aggregation_denominator(
            [batch.rollout.response_mask[rows] for rows in micro], self.algo.agg_mode)
        denominator = dist.sum_across(local, self.accelerator)
        step_losses = []
        for _ in range(self.cfg.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            if self.algo.perception.weights_grad:
                weights_cache = {}
            step_loss = 0.0
            for i, rows in enumerate(micro):
                with dist.no_sync(self.policy, self.accelerator, last=i == len(micro) - 1):
                    loss, stats = self._loss(batch, rows, weights_cache, denominator)
                    (loss * self.world).backward()
                stats["loss"] = float(loss.detach()) * self.world
                step_loss += stats["loss"]
                stats_all.append(stats)
            step_losses.append(step_loss)  # the process mean of these is the global loss
            grad_norm = clip_gradients(params, self.cfg.max_grad_norm)
            ok = dist.all_true(np.isfinite(grad_norm)
                               and all(np.isfinite(s["loss"]) for s in stats_all),
                               self.accelerator)
            self.skips.update(ok, self.steps_done)  # raises after max_bad_steps in a row
            if not ok:  # skip the update: a non-finite step must never reach the weights
                self.optimizer.zero_grad(set_to_none=True)
                break
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.steps_done += 1
        metrics = dict(batch.metrics)
        keys = {k for s in stats_all for k in s}
        metrics.update({k: float(np.mean([s[k] for s in stats_all if k in s])) for k in keys})
        metrics["loss"] = float(np.mean(step_losses))
        metrics["grad_norm"] = float(grad_norm)
        metrics["skipped_steps"] = float(self.skips.total)
        metrics["reward"] = float(batch.rewards.mean())
        metrics["lr"] = float(self.optimizer.param_groups[0]["lr"])
        return metrics
