"""Rollouts: sample G responses per prompt, and score token log-probs of given responses.

One small interface for RL training and evaluation: prompts (from
:func:`appo.data.collate.encode_prompts`) in; response ids, masks, EOS/truncation flags and the
sampling policy's per-token log-probs out. The full sequence of a rollout is
``[prompt (left-padded, length P) | response (right-padded, length N)]``, so every response
token n sits at position P + n and is predicted by position P + n - 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from appo.config import CACHE_MODES
from appo.data.collate import TOKEN_TYPES, VISUAL_KEYS
from appo.engine.decoding import Sampling, decoder_for, unwrap


@dataclass
class Rollout:
    """G sampled responses for each of B prompts, group-major (rows b*G .. b*G+G-1)."""

    prompt_ids: torch.Tensor  # [B*G, P] left-padded
    prompt_mask: torch.Tensor  # [B*G, P]
    response_ids: torch.Tensor  # [B*G, N] right-padded with pad_token_id
    response_mask: torch.Tensor  # [B*G, N] float, 1 up to and including EOS
    logprobs: torch.Tensor  # [B*G, N] sampling log-probs (temperature applied), 0 at padding
    truncated: torch.Tensor  # [B*G] bool: no EOS within max_new_tokens
    texts: list[str]
    visual: dict[str, torch.Tensor] = field(default_factory=dict)  # repeated per response
    group_size: int = 1
    prompt_types: torch.Tensor | None = None  # [B*G, P] mm_token_type_ids (multimodal rotary)

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(1).long()

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Inputs of the full prompt+response sequences, for scoring and training forwards."""
        inputs = {
            "input_ids": torch.cat([self.prompt_ids, self.response_ids], 1),
            "attention_mask": torch.cat([self.prompt_mask, self.response_mask.long()], 1),
            **self.visual,
        }
        if self.prompt_types is not None:  # response tokens are text
            inputs[TOKEN_TYPES] = torch.cat(
                [self.prompt_types, torch.zeros_like(self.response_ids, dtype=self.prompt_types.dtype)], 1)
        return inputs

    def select(self, rows: torch.Tensor) -> Rollout:
        """The rollout restricted to ``rows`` (e.g. the groups kept by dynamic sampling)."""
        rows = rows.to(self.prompt_ids.device)
        idx = rows.tolist()
        visual = _select_visual(self.visual, idx, self.prompt_types)
        types = None if self.prompt_types is None else self.prompt_types[rows]
        return Rollout(self.prompt_ids[rows], self.prompt_mask[rows], self.response_ids[rows],
                       self.response_mask[rows], self.logprobs[rows], self.truncated[rows],
                       [self.texts[i] for i in idx], visual, self.group_size, types)


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Join rollouts of different prompt/response lengths (left-pad prompts, right-pad responses)."""
    if len(parts) == 1:
        return parts[0]
    p = max(r.prompt_ids.shape[1] for r in parts)
    n = max(r.response_ids.shape[1] for r in parts)

    def left(xs, value):
        return torch.cat([torch.nn.functional.pad(x, (p - x.shape[1], 0), value=value) for x in xs])

    def right(xs, value):
        return torch.cat([torch.nn.functional.pad(x, (0, n - x.shape[1]), value=value) for x in xs])

    keys = dict.fromkeys(key for r in parts for key in r.visual)  # a part may lack a medium
    visual = {key: torch.cat([r.visual[key] for r in parts if key in r.visual]) for key in keys}
    types = None if parts[0].prompt_types is None else left([r.prompt_types for r in parts], 0)
    return Rollout(
        left([r.prompt_ids for r in parts], pad_id), left([r.prompt_mask for r in parts], 0),
        right([r.response_ids for r in parts], pad_id), right([r.response_mask for r in parts], 0),
        right([r.logprobs for r in parts], 0), torch.cat([r.truncated for r in parts]),
        [t for r in parts for t in r.texts], visual, parts[0].group_size, types,
    )


# (patch-row tensor, its grid tensor, mm_token_type_ids value of its placeholder tokens): pixel
# rows of all samples are concatenated, in prompt order.
_MEDIA = (("pixel_values_videos", "video_grid_thw", 2), ("pixel_values", "image_grid_thw", 1))


def _media_rows(types: torch.Tensor | None, type_id: int, n_media: int) -> list[int | None]:
    """Index of each batch row's video (or image) among the batch's, None when it has none.

    A row holds at most one video and one image, but a batch may mix video-only, image-only
    and video+image rows (Video-R1-260k, SEED-Bench-R1), so the owner of each grid row is read
    from the token types; without them every row is taken to hold one.
    """
    if types is None:
        return list(range(n_media))
    has = (types == type_id).any(1).tolist()
    out: list[int | None] = []
    seen = 0
    for row_has in has:
        out.append(seen if row_has else None)
        seen += row_has
    if sum(has) != n_media:
        raise ValueError(f"{sum(has)} rows hold media of token type {type_id} but the batch has "
                         f"{n_media} grids")
    return out


def _select_visual(visual: dict[str, torch.Tensor], rows: list[int],
                   types: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Visual inputs of the given batch rows; ``types`` are the rows' ``mm_token_type_ids``.

    A medium none of the selected rows holds is left out (the model takes no empty grids).
    """
    out: dict[str, torch.Tensor] = {}
    for values_key, grid_key, type_id in _MEDIA:
        if values_key not in visual:
            continue
        grid = visual[grid_key]
        owner = _media_rows(types, type_id, len(grid))
        picked = [owner[r] for r in rows if owner[r] is not None]
        if not picked:
            continue
        chunks = visual[values_key].split(grid.prod(-1).tolist())
        out[values_key] = torch.cat([chunks[i] for i in picked])
        out[grid_key] = grid[picked]
        if grid_key == "video_grid_thw" and "second_per_grid_ts" in visual:
            out["second_per_grid_ts"] = visual["second_per_grid_ts"][picked]
    return out


def select_prompts(batch: dict[str, torch.Tensor], rows: list[int]) -> dict[str, torch.Tensor]:
    """The prompt batch made of ``rows`` (repeats allowed), each with its own video patches."""
    out = _select_visual({k: v for k, v in batch.items() if k in VISUAL_KEYS}, rows,
                         batch.get(TOKEN_TYPES))
    index = torch.tensor(rows, device=batch["input_ids"].device)
    for key in ("input_ids", "attention_mask", TOKEN_TYPES):
        if key in batch:
            out[key] = batch[key][index]
    return out


def repeat_prompts(batch: dict[str, torch.Tensor], times: int) -> dict[str, torch.Tensor]:
    """Each prompt (and its video patches) repeated ``times`` times, consecutively."""
    return select_prompts(batch, [i for i in range(batch["input_ids"].shape[0]) for _ in range(times)])


def row_bucket(rows: int) -> int:
    """Prompt rows a static-cache rollout runs with: the next power of two, so the batch sizes of
    DAPO's later sampling rounds and of a last evaluation batch reuse a few compiled shapes."""
    return 1 << max(rows - 1, 0).bit_length()


MEDIA_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                "<|video_pad|>")


def media_token_ids(processor) -> list[int]:
    """Placeholder tokens a response must never contain (the model would expect pixels)."""
    ids = processor.tokenizer.convert_tokens_to_ids(list(MEDIA_TOKENS))
    return [i for i in ids if i is not None and i >= 0]


def stop_token_ids(processor) -> list[int]:
    tok = processor.tokenizer
    return [i for i in (tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>"))
            if i is not None and i >= 0]


def response_mask_from_ids(ids: torch.Tensor, stop_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask = 1 up to and including the first stop token; truncated = row has no stop token."""
    is_stop = torch.isin(ids, torch.tensor(stop_ids, device=ids.device))
    seen_before = (is_stop.long().cumsum(1) - is_stop.long()) > 0
    return (~seen_before).float(), ~is_stop.any(1)


_announced: set[str] = set()
_compile_failed: list[str] = []  # the first compilation error: static decoding is off after it


def _fallback(err: Exception) -> None:
    """Compiled static decoding failed (unsupported torch/transformers/device): use the dynamic
    cache for the rest of the run, and say so once."""
    if not _compile_failed:
        _compile_failed.append(f"{type(err).__name__}: {err}".splitlines()[0][:300])
        print(f"rollout: compiled static decoding unavailable ({_compile_failed[0]}); "
              "falling back to the dynamic KV cache")


def resolve_cache(cache: str, device: torch.device) -> str:
    """``auto`` -> a static KV cache with compiled decoding on CUDA, the dynamic cache elsewhere.

    On CUDA the one-token decoding step is compiled once (CUDA graphs) and replayed, which
    cuts decoding time (``benchmarks/rollout.py`` measures it); on CPU compilation buys little. After a
    compilation failure every later call resolves to ``dynamic``.
    """
    if cache not in CACHE_MODES:
        raise ValueError(f"rollout cache must be one of {', '.join(CACHE_MODES)}, got {cache!r}")
    resolved = cache if cache != "auto" else ("static" if device.type == "cuda" else "dynamic")
    if resolved == "static" and _compile_failed:
        resolved = "dynamic"
    if resolved not in _announced:
        _announced.add(resolved)
        print(f"rollout: {resolved} KV cache"
              + (" with compiled decoding" if resolved == "static" and device.type == "cuda" else ""))
    return resolved


def pad_to_bucket(inputs: dict[str, torch.Tensor], bucket: int, pad_id: int) -> dict:
    """Left-pad prompts to a multiple of ``bucket`` tokens so compiled shapes repeat across steps."""
    width = inputs["input_ids"].shape[1]
    extra = -width % bucket
    if extra == 0:
        return inputs
    out = dict(inputs)
    out["input_ids"] = torch.nn.functional.pad(inputs["input_ids"], (extra, 0), value=pad_id)
    out["attention_mask"] = torch.nn.functional.pad(inputs["attention_mask"], (extra, 0), value=0)
    if TOKEN_TYPES in inputs:
        out[TOKEN_TYPES] = torch.nn.functional.pad(inputs[TOKEN_TYPES], (extra, 0), value=0)
    return out


@torch.no_grad()
def generate(
    model,
    processor,
    batch: dict[str, torch.Tensor],
    *,
    num_samples: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    cache: str = "dynamic",
    bucket: int = 64,
) -> Rollout:
    """Sample ``num_samples`` responses per prompt: the rollout engine of RL and evaluation.

    Each prompt is prefilled once and its KV cache shared by its samples
    (:mod:`appo.engine.decoding`). Sampling log-probs are log_softmax(logits / temperature) of the
    sampled token (top-p only decides which tokens may be drawn), the quantity the training
    forward computes, so the importance ratio starts at exactly 1 and mu = 1 needs no scoring
    forward. ``cache``: see :func:`resolve_cache`; with a static cache the prompts are
    left-padded to a multiple of ``bucket`` tokens so compiled shapes repeat across steps.
    Another backend (e.g. vLLM) plugs in as a decoder with the same ``sample`` contract:
    prompt batch in, group-major (tokens, sampling log-probs) out.
    """
    device = next(model.parameters()).device
    pad = processor.tokenizer.pad_token_id
    mode = resolve_cache(cache, device)
    prompts = pad_to_bucket(batch, bucket, pad) if mode == "static" else batch
    prompts = {k: v.to(device) for k, v in prompts.items()}
    real = prompts["input_ids"].shape[0]
    decode_inputs = prompts
    if mode == "static" and row_bucket(real) > real:  # fixed row count: extra rows are copies
        decode_inputs = select_prompts(prompts, list(range(real)) + [0] * (row_bucket(real) - real))
    stops = stop_token_ids(processor)
    request = dict(num_samples=num_samples, max_new_tokens=max_new_tokens,
                   sampling=Sampling(temperature, top_p, greedy), stop_ids=stops, pad_id=pad,
                   suppress_ids=media_token_ids(processor))
    decoder = decoder_for(model, mode)
    try:
        response, logprobs = decoder.sample(decode_inputs, **request)
    except torch._dynamo.exc.TorchDynamoException as err:  # compilation unavailable here
        if not decoder.compiled:
            raise
        _fallback(err)
        return generate(model, processor, batch, num_samples=num_samples,
                        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                        greedy=greedy, cache="dynamic")
    response, logprobs = response[:real * num_samples], logprobs[:real * num_samples]
    mask, truncated = response_mask_from_ids(response, stops)
    response = torch.where(mask.bool(), response, torch.full_like(response, pad))
    texts = processor.tokenizer.batch_decode(
        [r[m.bool()] for r, m in zip(response, mask)], skip_special_tokens=False)
    texts = [_strip_stop(t, processor) for t in texts]
    inputs = repeat_prompts(prompts, num_samples)
    visual = {k: v for k, v in inputs.items() if k in VISUAL_KEYS}
    return Rollout(inputs["input_ids"], inputs["attention_mask"], response, mask,
                   logprobs * mask, truncated, texts, visual, num_samples, inputs.get(TOKEN_TYPES))


def _strip_stop(text: str, processor) -> str:
    for stop in ("<|im_end|>", "<|endoftext|>"):
        text = text.replace(stop, "")
    return text.strip()


def token_logprobs(
    model, inputs: dict[str, torch.Tensor], response_ids: torch.Tensor, temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(response token | prefix) [B, N], final hidden states at the predicting positions).

    Only the last N + 1 positions get logits (``logits_to_keep``), and log-probs are computed as
    gathered logit minus logsumexp, never materialising a second [B, N, V] tensor.
    """
    n = response_ids.shape[1]
    captured: dict[str, torch.Tensor] = {}
    norm = _final_norm(model)
    handle = norm.register_forward_hook(lambda m, a, out: captured.__setitem__("h", out))
    try:
        out = model(**inputs, logits_to_keep=n + 1, use_cache=False)
    finally:
        handle.remove()
    logits = out.logits[:, :-1].float() / temperature
    chosen = logits.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
    logp = chosen - torch.logsumexp(logits, -1)
    hidden = captured["h"][:, -(n + 1):-1]
    return logp, hidden


def _final_norm(model) -> torch.nn.Module:
    """The language model's final RMSNorm, whose output feeds lm_head (also under peft/DDP)."""
    model = unwrap(model)
    lm = getattr(getattr(model, "model", model), "language_model", None)
    if lm is None or not hasattr(lm, "norm"):
        raise TypeError(f"{type(model).__name__}: cannot find the language model's final norm")
    return lm.norm
