"""Turn questions + cached frames into model inputs: one place for prompt encoding.

Prompts are left-padded (generation appends on the right). For SFT the target tokens are
appended after each prompt's tokens, so the loss mask is exact without searching the text.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from appo.data.frames import FrameStore
from appo.data.prompts import messages
from appo.data.schema import VideoQA

VISUAL_KEYS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts",
               "pixel_values", "image_grid_thw")
# Per-token type of each prompt position (0 text, 1 image, 2 video). Qwen2.5-VL builds its
# multimodal (t, h, w) rotary positions from it; without it every forward falls back to plain
# 1-D text positions for the video tokens.
TOKEN_TYPES = "mm_token_type_ids"


def prompt_texts(processor, records: Sequence[VideoQA]) -> list[str]:
    return [
        processor.apply_chat_template(messages(qa), tokenize=False, add_generation_prompt=True)
        for qa in records
    ]


def prompt_lengths(processor, records: Sequence[VideoQA]) -> list[int]:
    """Text tokens of each record's prompt (the media placeholders count one token each)."""
    texts = prompt_texts(processor, records)
    return [len(ids) for ids in processor.tokenizer(texts)["input_ids"]]


def encode_prompts(processor, records: Sequence[VideoQA], store: FrameStore,
                   shuffle_seed: int | None = None) -> dict:
    """Left-padded prompt ids + visual inputs for a batch of questions.

    A batch may mix video, image-only and video+image questions (Video-R1-260k does): the
    processor takes the batch's videos and images as two flat lists in prompt order.
    ``shuffle_seed`` presents each video's cached frames in a seeded random order (T-GRPO's
    temporal contrast); the processor path is otherwise identical.
    """
    videos = [store.get(qa.video_file) for qa in records if qa.video_file is not None]
    if shuffle_seed is not None:
        rng = np.random.default_rng(shuffle_seed)
        videos = [dataclasses.replace(v, frames=v.frames[rng.permutation(len(v.frames))])
                  for v in videos]
    images = [_image(qa.image_file, store) for qa in records if qa.image_file is not None]
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    media: dict = {}
    if videos:
        media["videos"] = [v.frames for v in videos]
        media["videos_kwargs"] = {"video_metadata": [v.metadata() for v in videos],
                                  "do_sample_frames": False}
    if images:
        media["images"] = images
    batch = processor(text=prompt_texts(processor, records), padding=True, return_tensors="pt",
                      **media)
    return {k: v for k, v in batch.items()
            if k in ("input_ids", "attention_mask", TOKEN_TYPES) + VISUAL_KEYS}


def _image(path: str, store: FrameStore):
    """The image from the frame cache, or read from its file when the cache does not hold it
    (a cache written before images were cached)."""
    if path in store:
        return store.image(path)
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def pad_left(rows: Sequence[torch.Tensor], pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D tensors, left-padded with ``pad_value``; returns (padded, mask)."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad_value, dtype=rows[0].dtype)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return out, mask


def append_targets(batch: dict, targets: Sequence[str], tokenizer) -> dict:
    """Append tokenized targets (+ end-of-turn) to left-padded prompts; labels only on targets.

    Returns a new batch with ``input_ids``, ``attention_mask`` and ``labels`` (-100 outside the
    target tokens), left-padded, the token types (targets are text), and the unchanged visual
    inputs.
    """
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    types = batch.get(TOKEN_TYPES)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    rows, label_rows, type_rows = [], [], []
    for i, (prompt, keep, target) in enumerate(zip(ids, mask, targets)):
        prompt = prompt[keep]
        tgt = torch.tensor(tokenizer(target, add_special_tokens=False)["input_ids"] + [end])
        rows.append(torch.cat([prompt, tgt]))
        label_rows.append(torch.cat([torch.full_like(prompt, -100), tgt]))
        if types is not None:
            type_rows.append(torch.cat([types[i][keep], torch.zeros_like(tgt, dtype=types.dtype)]))
    input_ids, attention_mask = pad_left(rows, tokenizer.pad_token_id)
    labels, _ = pad_left(label_rows, -100)
    out = {k: v for k, v in batch.items() if k in VISUAL_KEYS}
    out.update(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    if types is not None:
        out[TOKEN_TYPES], _ = pad_left(type_rows, 0)
    return out
