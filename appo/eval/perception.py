"""Perception hit rate: does the answer look at the right frames?

For each greedy response, the frame (temporal patch) that receives the most attention from the
answer tokens (those inside the last ``<answer>...</answer>``; all response tokens when there is
no tag) is a *hit* when one of the source frames it covers is an annotated key frame. This is the
paper's central claim made measurable; ``key_frames`` are read here, for evaluation only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from appo.data.frames import FrameStore
from appo.data.schema import VideoQA
from appo.engine.frame_attention import TEMPORAL_PATCH, frame_attention
from appo.engine.rollout import Rollout


def answer_token_mask(response_ids: torch.Tensor, response_mask: torch.Tensor,
                      open_id: int, close_id: int) -> torch.Tensor:
    """Tokens strictly inside the last ``<answer>`` ... ``</answer>`` (or end); else all tokens."""
    n = response_ids.shape[1]
    pos = torch.arange(n).expand_as(response_ids)
    is_open = (response_ids == open_id) & response_mask.bool()
    last_open = torch.where(is_open, pos, torch.full_like(pos, -1)).max(1).values  # [B]
    after_open = pos > last_open[:, None]
    is_close = (response_ids == close_id) & after_open
    first_close = torch.where(is_close, pos, torch.full_like(pos, n)).min(1).values
    inside = after_open & (pos < first_close[:, None]) & response_mask.bool()
    has_answer = (last_open >= 0) & inside.any(1)
    return torch.where(has_answer[:, None], inside, response_mask.bool())


def most_attended_frames(attn: torch.Tensor, frame_valid: torch.Tensor,
                         token_mask: torch.Tensor) -> torch.Tensor:
    """argmax_t of mean over the selected tokens of a[b, n, t] -> [B] temporal-patch index."""
    weights = token_mask.float() / token_mask.float().sum(1, keepdim=True).clamp(min=1)
    score = torch.einsum("bnt,bn->bt", attn.float(), weights)
    score = score.masked_fill(~frame_valid, float("-inf"))
    return score.argmax(1)


def perception_hits(model, processor, records: Sequence[VideoQA], rollout: Rollout,
                    store: FrameStore, layers: Sequence[int] = (-1, -2, -3)) -> list[bool | None]:
    """One value per response: hit / miss, or None for questions without key frames."""
    if not any(qa.key_frames for qa in records):
        return [None] * len(records)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in rollout.model_inputs().items()}
    attn, valid = frame_attention(model, inputs, rollout.prompt_ids.shape[1],
                                  rollout.response_ids.shape[1], layers)
    open_id, close_id = processor.tokenizer.convert_tokens_to_ids(["<answer>", "</answer>"])
    mask = answer_token_mask(rollout.response_ids, rollout.response_mask, open_id, close_id)
    best = most_attended_frames(attn.cpu(), valid.cpu(), mask)
    hits: list[bool | None] = []
    for qa, t in zip(records, best.tolist()):
        if not qa.key_frames:
            hits.append(None)
            continue
        sampled = store.get(qa.video).indices[TEMPORAL_PATCH * t: TEMPORAL_PATCH * (t + 1)]
        hits.append(bool(set(sampled) & set(qa.key_frames)))
    return hits
