"""The one RL trainer that GRPO, DAPO, APPO and T-GRPO share (docs/method.md).

A step: sample G responses for each prompt -> rewards (+ DAPO overlong shaping) -> DAPO dynamic
sampling (optional) -> group advantages -> mu policy updates over micro-batches of whole groups
(so group statistics and APPO's intra-group weights stay exact) with the clipped surrogate.
Algorithms differ only in :class:`appo.config.AlgorithmConfig` values and in whether the trainer
holds a :class:`~appo.rl.weighter.PerceptionWeighter` (APPO); no ``if algo == ...``, no APPO knob.
:meth:`RLTrainer.state_dict` is what a resume needs besides weights, optimizer and RNG states.

Data parallel (``accelerate launch``): each process trains its ``prompts_per_step /
num_processes`` whole groups of one shared prompt stream; dividing each loss by the global
token (or sequence) count times the process count makes the averaged gradient the
single-process one (:mod:`appo.train.distributed`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
import torch

from appo.config import AlgorithmConfig, RLConfig
from appo.data.collate import encode_prompts
from appo.data.frames import FrameStore
from appo.data.schema import VideoQA
from appo.engine.rollout import Rollout, concat_rollouts, generate, token_logprobs
from appo.rl import objectives, temporal
from appo.rl.batch import Batch, PromptSampler, RewardFn, shaped_rewards
from appo.rl.rewards import RewardSpec, score_responses
from appo.rl.weighter import PerceptionWeighter
from appo.train import distributed as dist
from appo.train.common import SkipCounter, clip_gradients, is_lora


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
        self.weighter = PerceptionWeighter.for_algorithm(algo, self.model, cfg, store)

    # -- resume --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a resume needs besides weights, optimizer, scheduler and RNG states: the step,
        the position in the prompt stream and the skip counter (JSON-serialisable)."""
        return {"step": self.steps_done, "sampler_position": self.sampler.position,
                "skips": self.skips.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_done = int(state["step"])
        self.sampler.position = int(state["sampler_position"])
        self.skips.load_state_dict(state["skips"])

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
        tau = algo.correct_threshold
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
    def micro_batches(self, batch: Batch) -> list[torch.Tensor]:
        """The batch's rows cut into micro-batches of ``groups_per_micro_batch`` whole groups."""
        g = self.cfg.num_generations
        rows = torch.arange(batch.rollout.prompt_ids.shape[0])
        return list(rows.split(self.cfg.groups_per_micro_batch * g))

    def micro_batch_loss(self, batch: Batch, rows: torch.Tensor,
                         denominator: float | None = None) -> tuple[torch.Tensor, dict]:
        """The policy loss of micro-batch ``rows``: its share of the step's loss when
        ``denominator`` is the step's :func:`objectives.aggregation_denominator` (see
        :meth:`update`), else the micro-batch's own mean."""
        cfg, algo, g, w = self.cfg, self.algo, self.cfg.num_generations, self.weighter
        part = batch.rollout.select(rows)
        inputs = {k: v.to(self.device) for k, v in part.model_inputs().items()}
        response = part.response_ids.to(self.device)
        mask = part.response_mask.to(self.device)
        key = int(rows[0])
        capture = (contextlib.nullcontext() if w is None else
                   w.capture(key, inputs, part.prompt_ids.shape[1], response.shape[1]))
        with capture:
            logp, hidden = token_logprobs(self.policy, inputs, response, cfg.temperature)
        old = part.logprobs.to(self.device) if cfg.num_iterations > 1 else logp.detach()
        stats: dict[str, float] = {}
        weights = None
        if w is not None:
            weights, wstats = w.token_weights(
                key, inputs=inputs, mask=mask, correct=batch.correct[rows], hidden=hidden,
                logp=logp, records=[batch.records[i] for i in rows[::g].tolist()],
                groups=[self.rank * self.local_prompts + int(r) // g for r in rows[::g]],
                step=self.steps_done)
            stats.update(wstats)
        ref = self._reference_logprobs(inputs, response) if algo.beta > 0 else None
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

    def train_step(self) -> dict[str, float]:
        """One RL step: collect, then mu passes of accumulated micro-batch updates.

        Torch's RNG is seeded from (seed, step, process) first, so sampling is reproducible
        on resume and differs between processes.
        """
        t0 = time.perf_counter()
        torch.manual_seed(dist.step_seed(self.cfg.seed, self.steps_done, self.rank))
        batch = self.collect()
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

        APPO's token weights are the weighter's business (computed once per step and reused by
        the mu passes, or recomputed by each: :meth:`PerceptionWeighter.start_pass`).
        """
        micro = self.micro_batches(batch)
        self.policy.train()
        stats_all: list[dict] = []
        grad_norm = 0.0
        params = [p for p in self.model.parameters() if p.requires_grad]
        local = objectives.aggregation_denominator(
            [batch.rollout.response_mask[rows] for rows in micro], self.algo.agg_mode)
        denominator = dist.sum_across(local, self.accelerator)
        step_losses = []
        for iteration in range(self.cfg.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            if self.weighter is not None:
                self.weighter.start_pass(iteration)
            step_loss = 0.0
            for i, rows in enumerate(micro):
                with dist.no_sync(self.policy, self.accelerator, last=i == len(micro) - 1):
                    loss, stats = self.micro_batch_loss(batch, rows, denominator)
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
