"""What one RL step works on: the prompt stream, the shaped rewards and the collected batch.

- :class:`PromptSampler`: seeded epoch-wise shuffling of the RL split; its position is state, so
  a resumed run sees the same prompts in the same order;
- :func:`shaped_rewards`: the reward of each response (weighted components, DAPO's overlong
  penalty, T-GRPO's length bonus) and its accuracy reward;
- :class:`Batch`: a rollout with its rewards, correctness and advantages (group-major rows).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from appo.config import AlgorithmConfig
from appo.data.schema import VideoQA
from appo.engine.rollout import Rollout
from appo.rl import objectives, temporal


@dataclass
class Batch:
    """A rollout with everything the update needs (group-major rows)."""

    rollout: Rollout
    records: list[VideoQA]  # one per row
    rewards: torch.Tensor  # [B*G] total (shaped) reward
    correct: torch.Tensor  # [B*G] bool, accuracy >= AlgorithmConfig.correct_threshold
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
