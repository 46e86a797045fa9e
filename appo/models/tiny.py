"""Build the embedded default: a tiny, randomly initialised Qwen2.5-VL checkpoint directory.

The directory is written with ``save_pretrained`` (config, safetensors, tokenizer, chat
template, image/video processor configs), so it is loaded by exactly the code path of a real
Qwen2.5-VL-3B/7B directory (:func:`appo.models.loading.load_policy`). Nothing is downloaded:
the tokenizer is a byte-level BPE trained offline on the synthetic corpus and carries Qwen's
special tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from appo.config import TinyModelConfig
from appo.io import atomic_dir

# Qwen2.5-VL's special tokens, in Qwen's order (ids differ: our vocabulary is tiny).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Template tags get whole-token entries so responses are short and tag-aligned.
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>", "<time>", "</time>"]

# Our own Jinja chat template with the Qwen2.5-VL message layout: a default system turn, and
# media items rendered as <|vision_start|><|video_pad|><|vision_end|> that the processor expands.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'video' or 'video' in item %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'image' or 'image' in item %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_tokenizer(corpus: Iterable[str], vocab_size: int):
    """Byte-level BPE trained on ``corpus``, wrapped as a Qwen2 tokenizer with Qwen's specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + TAG_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    tok = Qwen2TokenizerFast(
        tokenizer_object=bpe,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:] + TAG_TOKENS,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def default_corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: the synthetic task's language plus digits/letters."""
    from appo.data.prompts import SYSTEM_PROMPT
    from appo.data.synthetic import COLORS, SHAPES

    words = list(COLORS) + list(SHAPES) + ["white", "square", "flashes", "flash", "first", "one"]
    lines = [
        SYSTEM_PROMPT,
        "What colour was the square that flashed? Which shape flashed in yellow?",
        "How many times did the white square flash? Which colour flashed first?",
        "Options: A. red B. green C. blue D. yellow A. square B. circle C. triangle D. cross",
        "Answer with the option's letter. Answer with a number.",
    ]
    for w in words:
        for t in range(40):
            lines.append(f"At {t / 4:.1f}s a {w} square flashes. A {w} one at {t / 4:.1f}s, {t}.")
    lines += [f"<think>{i}</think><answer>{c}</answer>" for i in range(10) for c in "ABCD0123456789"]
    return lines * 4


def build_processor(tokenizer, cfg: TinyModelConfig, max_pixels: int):
    """Qwen2.5-VL processor (image + video processors share the tiny patch geometry)."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    factor = cfg.patch_size * cfg.spatial_merge_size
    size = {"shortest_edge": factor * factor, "longest_edge": max(max_pixels, factor * factor)}
    common = dict(patch_size=cfg.patch_size, merge_size=cfg.spatial_merge_size,
                  temporal_patch_size=2, size=size)
    video_extra = {}
    if hasattr(Qwen2VLVideoProcessor, "cap_pixels_per_frame"):  # transformers >= 5.2x
        video_extra["cap_pixels_per_frame"] = False  # frames are already sized by our cache
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**common),
        video_processor=Qwen2VLVideoProcessor(**common, **video_extra),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(cfg: TinyModelConfig, tokenizer):
    """Qwen2.5-VL config at tiny size; token ids point into the tiny vocabulary."""
    from transformers import Qwen2_5_VLConfig

    head_dim = cfg.hidden_size // cfg.num_attention_heads
    half = head_dim // 2  # mrope splits the rotary half-dim into (temporal, height, width)
    t_sec = half // 4
    mrope = [t_sec, (half - t_sec) // 2, half - t_sec - (half - t_sec) // 2]
    ids = tokenizer.convert_tokens_to_ids
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_key_value_heads,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
            bos_token_id=None,
            eos_token_id=ids("<|im_end|>"),
            pad_token_id=ids("<|endoftext|>"),
        ),
        vision_config=dict(
            depth=cfg.vision_depth,
            hidden_size=cfg.vision_hidden_size,
            intermediate_size=cfg.vision_intermediate_size,
            num_heads=cfg.vision_heads,
            patch_size=cfg.patch_size,
            spatial_merge_size=cfg.spatial_merge_size,
            temporal_patch_size=2,
            out_hidden_size=cfg.hidden_size,
            window_size=cfg.patch_size * cfg.spatial_merge_size * 4,
            fullatt_block_indexes=[cfg.vision_depth - 1],
            tokens_per_second=2,
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )


def build_tiny_checkpoint(
    out_dir: str | Path, cfg: TinyModelConfig, max_pixels: int = 56 * 56,
    corpus: Iterable[str] | None = None,
) -> Path:
    """Write a complete, loadable tiny Qwen2.5-VL checkpoint directory (atomically)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    tokenizer = train_tokenizer(corpus if corpus is not None else default_corpus(), cfg.vocab_size)
    processor = build_processor(tokenizer, cfg, max_pixels)
    config = build_config(cfg, tokenizer)
    torch.manual_seed(cfg.seed)
    # Marks the embedded default: its vision tower starts random, so `sft.freeze_vision: auto`
    # trains it (a real checkpoint's pretrained tower stays frozen, as in the APPO recipe).
    config.appo_embedded_tiny = True
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    generation = model.generation_config
    generation.eos_token_id = config.text_config.eos_token_id
    generation.pad_token_id = config.text_config.pad_token_id
    generation.bos_token_id = None
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return Path(out_dir)
