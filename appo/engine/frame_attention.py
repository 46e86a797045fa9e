"""Frame attention of every response token, exact, without eager attention (docs/method.md, step 1).

``a[b, n, t]`` is the attention probability that the query predicting response token ``n`` of row
``b`` puts on the visual tokens of temporal patch ("frame") ``t``: averaged over the selected
decoder layers (default the last three, ``(-1, -2, -3)``), over all heads and over the frame's
visual tokens, with the softmax taken over the whole causal, padding-masked context -- exactly
the probabilities eager attention would return.

Where this should run, and why
------------------------------
Inside the no-grad scoring forward over prompt + response that RL needs anyway (old log-probs,
reference log-probs for the KL). ``generate`` with SDPA/flash attention cannot expose attention
probabilities, and the authors' way -- eager ``generate(output_attentions=True)`` re-reading all
layers' attention at every decoding step -- is what makes their version slow and memory hungry
(``benchmarks/rl_step.py`` times both: the authors' row against ours, see
``benchmarks/README.md``). Here the model keeps its fast attention kernel; only the
selected layers pay an extra ``q . k`` recompute for the response queries.

How
---
Forward pre-hooks on the selected layers' ``self_attn`` modules capture the attention input
(``hidden_states``, already layer-normed) and the ``position_embeddings`` ``(cos, sin)`` kwarg.
The hook recomputes ``q`` for the query positions only and ``k`` for all positions with the
module's own ``q_proj`` / ``k_proj`` (bias included), applies the same (multimodal) rotary
embedding, and then, for all rows at once and per chunk of queries, computes the scores
``(rows x heads x chunk x S)`` -- never ``(heads x S x S)`` -- with the causal + padding mask,
normalises with a log-sum-exp over the full context, and averages each frame's visual keys with
one batched matmul against a ``(rows x S x frames)`` weight (``1 / tokens of the frame`` at the
frame's visual positions, 0 elsewhere): no Python loop over rows or tokens.
Grouped-query attention is handled by viewing the queries as ``(kv_heads, group * chunk)`` so each
key head serves its query group without copying ``k``. Everything runs in float32 whatever the
model dtype, and is accumulated inside the hook, so no per-layer tensors are kept.

Query positions: the full sequence is ``[prompt (left padded, length P) | response (length N)]``;
the attention "of response token ``n``" is the attention row of position ``P + n - 1``, whose
output predicts token ``n`` (where its log-prob is read, and what the authors read at decoding
step ``n``). Rows whose query position is padding (``attention_mask == 0``) are 0; the caller
also zeroes tokens after EOS with its response mask.

Usage::

    rec = FrameAttentionRecorder(model, layers=(-1, -2, -3))
    rec.prepare(input_ids, attention_mask, video_grid_thw, response_start=P, response_len=N)
    with rec, torch.no_grad():
        out = model(**inputs)                    # the scoring forward, unchanged outputs
    attn, frame_valid = rec.result()             # [B, N, T_max] float32, [B, T_max] bool
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Sampled frames per temporal patch: Qwen2.5-VL merges two frames into one patch, so patch
#: ``t`` covers the sampled frames ``2t`` and ``2t + 1``.
TEMPORAL_PATCH = 2


def frame_index_of_tokens(
    input_ids: Tensor, video_grid_thw: Tensor | None, video_token_id: int, merge_size: int,
    image_token_id: int | None = None,
) -> Tensor:
    """Frame (temporal patch) index of each token, ``-1`` for non-visual tokens: ``[B, S]`` long.

    ``video_grid_thw`` holds one ``(t, h, w)`` row per video, in ``input_ids`` order (row-major
    over the batch). Video ``g`` contributes ``t * (h / m) * (w / m)`` video tokens, temporal-major,
    so its token ``j`` belongs to frame ``j // ((h / m) * (w / m))``. Each batch row holds one
    video, or, with ``image_token_id``, no video and an image: an image-only question (mixed
    into Video-R1-260k batches) is a single frame made of its image tokens, so frame scores
    and APPO weights stay defined for every row. A video row's image tokens (SEED-Bench-R1's
    observation) belong to no frame.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
    grid = [] if video_grid_thw is None else torch.as_tensor(video_grid_thw).reshape(-1, 3).tolist()
    is_video = input_ids == video_token_id
    counts = is_video.sum(1).tolist()
    out = torch.full(input_ids.shape, -1, dtype=torch.long, device=input_ids.device)
    g = 0
    for b, n_tokens in enumerate(counts):
        if n_tokens == 0:
            is_image = input_ids[b] == image_token_id if image_token_id is not None else None
            if is_image is not None and bool(is_image.any()):
                out[b, is_image] = 0
                continue
            raise ValueError(f"row {b} has no video tokens (id {video_token_id}) and no image "
                             "tokens; each row of the batch must hold one video or one image")
        if g >= len(grid):
            raise ValueError(f"row {b} has video tokens but video_grid_thw has only {len(grid)} "
                             "rows (one per video)")
        t, h, w = (int(x) for x in grid[g])
        if h % merge_size or w % merge_size:
            raise ValueError(f"video {g}: grid {h}x{w} is not divisible by merge size {merge_size}")
        per_frame = (h // merge_size) * (w // merge_size)
        if n_tokens != t * per_frame:
            raise ValueError(
                f"row {b} has {n_tokens} video tokens but its video's grid {t}x{h}x{w} (merge "
                f"{merge_size}) gives {t * per_frame}; each row must hold exactly one video")
        positions = is_video[b].nonzero().squeeze(1)
        out[b, positions] = torch.arange(n_tokens, device=input_ids.device) // per_frame
        g += 1
    if g != len(grid):
        raise ValueError(f"video_grid_thw has {len(grid)} rows but the batch holds {g} videos")
    return out


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The language model's decoder layers (``model.model.language_model.layers`` in v5)."""
    try:
        layers = model.model.language_model.layers
        if isinstance(layers, nn.ModuleList) and len(layers) and hasattr(layers[0], "self_attn"):
            return layers
    except AttributeError:
        pass
    for _, module in model.named_modules():
        if (isinstance(module, nn.ModuleList) and len(module)
                and all(hasattr(m, "self_attn") and hasattr(m.self_attn, "q_proj")
                        for m in module)):
            return module
    raise ValueError(f"{type(model).__name__}: no decoder layers with a self_attn module found")


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _mrope_section(module: nn.Module) -> list[int]:
    config = getattr(module, "config", None)
    for source in (getattr(module, "rope_parameters", None), getattr(module, "rope_scaling", None),
                   getattr(config, "rope_parameters", None), getattr(config, "rope_scaling", None)):
        if isinstance(source, dict) and source.get("mrope_section"):
            return [int(s) for s in source["mrope_section"]]
    raise ValueError("position embeddings have a (3, ...) multimodal axis but the attention "
                     "module's config has no mrope_section")


def recompose_mrope(freq: Tensor, mrope_section: Sequence[int]) -> Tensor:
    """``(3, B, S, D)`` cos/sin (one per t/h/w axis) -> ``(B, S, D)`` as the model applies them.

    Older transformers pass the three axes to the attention and select the sections there
    (``apply_multimodal_rotary_pos_emb``); newer ones do it in the rotary module. Same result.
    """
    sections = list(mrope_section) * 2
    return torch.cat([m[i % 3] for i, m in enumerate(freq.split(sections, dim=-1))], dim=-1)


class _Prepared:
    """Per-batch index tensors built once by :meth:`FrameAttentionRecorder.prepare`."""

    def __init__(self, input_ids, attention_mask, video_grid_thw, video_token_id, merge_size,
                 response_start, response_len, image_token_id=None):
        B, S = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != (B, S):
            raise ValueError(f"attention_mask must be a [B, S] = {(B, S)} padding mask, got "
                             f"{tuple(attention_mask.shape)}")
        if response_start < 1 or response_len < 1 or response_start + response_len > S:
            raise ValueError(f"response [{response_start}, {response_start + response_len}) does "
                             f"not fit a sequence of length {S} after a non-empty prompt")
        frame_of = frame_index_of_tokens(input_ids, video_grid_thw, video_token_id, merge_size,
                                         image_token_id)
        frame_of = frame_of.cpu()
        key_valid = attention_mask.cpu().bool()
        self.shape = (B, S)
        self.n = response_len
        self.key_valid = key_valid
        # query of response token n (0-based) is position P + n - 1
        self.query_pos = torch.arange(response_len) + (response_start - 1)
        self.query_valid = key_valid[:, self.query_pos]
        n_frames = frame_of.max(1).values + 1  # every row has a video or an image
        self.t_max = int(n_frames.max())
        self.frame_valid = torch.arange(self.t_max)[None, :] < n_frames[:, None]
        # [B, S, T_max]: 1 / (visual tokens of frame t) where position s is a token of frame t
        visual = (frame_of >= 0) & key_valid
        onehot = F.one_hot(frame_of.clamp(min=0), self.t_max).float() * visual[..., None]
        counts = onehot.sum(1, keepdim=True).clamp(min=1.0)  # [B, 1, T_max]
        self.frame_weight = onehot / counts
        self._device = torch.device("cpu")

    def to(self, device: torch.device) -> _Prepared:
        if device != self._device:
            for name in ("key_valid", "query_pos", "query_valid", "frame_weight"):
                setattr(self, name, getattr(self, name).to(device))
            self._device = device
        return self


class FrameAttentionRecorder:
    """Context manager: hooks the selected layers; one forward pass fills :meth:`result`.

    ``layers`` are decoder-layer indices (negative counts from the end; duplicates ignored).
    ``query_chunk`` bounds the scratch memory to ``rows x heads x query_chunk x S`` floats.
    Hooks do nothing until :meth:`prepare` is called; each selected layer contributes once per
    ``prepare`` (a re-run of the same layer, e.g. a gradient-checkpointing recompute, is ignored).
    """

    def __init__(self, model: nn.Module, layers: Sequence[int] = (-1, -2, -3),
                 query_chunk: int = 128) -> None:
        if query_chunk < 1:
            raise ValueError(f"query_chunk must be >= 1, got {query_chunk}")
        self.model = model
        stack = decoder_layers(model)
        n_layers = len(stack)
        chosen: list[int] = []
        for i in layers:
            j = int(i) + n_layers if int(i) < 0 else int(i)
            if not 0 <= j < n_layers:
                raise ValueError(f"layer {i} out of range for a model with {n_layers} layers")
            if j not in chosen:
                chosen.append(j)
        if not chosen:
            raise ValueError("layers must name at least one decoder layer")
        self.layers = chosen
        self.modules = [stack[j].self_attn for j in chosen]
        self.query_chunk = int(query_chunk)
        config = model.config
        self.video_token_id = int(config.video_token_id)
        image_token_id = getattr(config, "image_token_id", None)
        self.image_token_id = None if image_token_id is None else int(image_token_id)
        self.merge_size = int(config.vision_config.spatial_merge_size)
        self._handles: list = []
        self._prep: _Prepared | None = None
        self._acc: Tensor | None = None
        self._seen: set[int] = set()

    # -- setup -------------------------------------------------------------------------------
    def prepare(self, input_ids: Tensor, attention_mask: Tensor | None,
                video_grid_thw: Tensor | None, response_start: int, response_len: int) -> None:
        """Index the next forward: ``[B, S]`` ids/mask, response at ``[start, start + len)``;
        ``video_grid_thw`` is None when the batch holds images only."""
        self._prep = _Prepared(input_ids, attention_mask, video_grid_thw, self.video_token_id,
                               self.merge_size, int(response_start), int(response_len),
                               self.image_token_id)
        self._acc = None
        self._seen = set()

    def __enter__(self) -> FrameAttentionRecorder:
        self._remove()
        for j, module in zip(self.layers, self.modules):
            self._handles.append(module.register_forward_pre_hook(
                self._make_hook(j), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _make_hook(self, layer: int):
        def hook(module, args, kwargs):
            if self._prep is None or layer in self._seen:
                return None
            hidden = args[0] if args else kwargs.get("hidden_states")
            rope = kwargs.get("position_embeddings")
            if rope is None and len(args) > 4:
                rope = args[4]
            if hidden is None or rope is None:
                raise RuntimeError(f"layer {layer}: the attention was called without "
                                   "hidden_states / position_embeddings; cannot recompute q.k")
            with torch.no_grad():
                self.accumulate(module, hidden, rope)
            self._seen.add(layer)
            return None

        return hook

    # -- the computation ---------------------------------------------------------------------
    def accumulate(self, module: nn.Module, hidden: Tensor, rope: tuple[Tensor, Tensor]) -> None:
        """Fold one layer's attention (its input ``hidden`` and rotary ``rope``) into the result.

        The hooks call it through the instance, so a caller may wrap it (the benchmark times
        the capture work this way)."""
        prep = self._prep
        B, S = prep.shape
        if tuple(hidden.shape[:2]) != (B, S):
            raise RuntimeError(
                f"frame attention was prepared for a [B, S] = {(B, S)} batch but the forward ran "
                f"with hidden states {tuple(hidden.shape)} (a KV cache, or another batch?)")
        device = hidden.device
        prep.to(device)
        if self._acc is None:
            self._acc = torch.zeros(B, prep.n, prep.t_max, dtype=torch.float32, device=device)
        cos, sin = rope
        if cos.dim() == 4:  # (3, B, S, D): older transformers select mrope sections in attention
            section = _mrope_section(module)
            cos, sin = recompose_mrope(cos, section), recompose_mrope(sin, section)
        cos, sin = cos.float(), sin.float()
        if cos.dim() == 2:
            cos, sin = cos[None], sin[None]
        head_dim = int(getattr(module, "head_dim", cos.shape[-1]))
        n_heads = module.q_proj.out_features // head_dim
        n_kv = module.k_proj.out_features // head_dim
        group = n_heads // n_kv
        scaling = float(getattr(module, "scaling", head_dim ** -0.5))
        wq, wk = module.q_proj.weight.float(), module.k_proj.weight.float()
        bq = module.q_proj.bias.float() if module.q_proj.bias is not None else None
        bk = module.k_proj.bias.float() if module.k_proj.bias is not None else None
        qpos = prep.query_pos
        key_pos = torch.arange(S, device=device)
        window = getattr(module, "sliding_window", None)
        h = hidden.float()
        cos, sin = cos.expand(B, -1, -1), sin.expand(B, -1, -1)  # [B, S, D]
        k = F.linear(h, wk, bk).view(B, S, n_kv, head_dim).transpose(1, 2)  # [B, kv, S, D]
        k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
        q = F.linear(h[:, qpos], wq, bq).view(B, -1, n_heads, head_dim).transpose(1, 2)
        q = (q * cos[:, None, qpos] + _rotate_half(q) * sin[:, None, qpos]) * scaling
        q = q.view(B, n_kv, group, -1, head_dim)  # head h -> key head h // group (repeat_kv)
        for c0 in range(0, prep.n, self.query_chunk):
            c1 = min(c0 + self.query_chunk, prep.n)
            qc = q[:, :, :, c0:c1].reshape(B, n_kv, group * (c1 - c0), head_dim)
            scores = torch.matmul(qc, k.transpose(-1, -2)).view(B, n_heads, c1 - c0, S)
            allowed = key_pos[None, :] <= qpos[c0:c1, None]  # [chunk, S] causal
            if window is not None:
                allowed = allowed & (key_pos[None, :] > qpos[c0:c1, None] - int(window))
            allowed = allowed[None] & prep.key_valid[:, None, :]  # [B, chunk, S] + padding
            scores = scores.masked_fill(~allowed[:, None], float("-inf"))
            lse = torch.logsumexp(scores, dim=-1, keepdim=True)
            probs = torch.exp(scores - lse).mean(1)  # [B, chunk, S] (head mean)
            probs = torch.nan_to_num(probs, nan=0.0)  # fully masked (padding) query rows
            per_frame = torch.bmm(probs, prep.frame_weight)  # [B, chunk, T_max]
            self._acc[:, c0:c1] += per_frame * prep.query_valid[:, c0:c1, None]

    # -- output ------------------------------------------------------------------------------
    def result(self) -> tuple[Tensor, Tensor]:
        """``(attn [B, N, T_max] float32, frame_valid [B, T_max] bool)`` of the last forward."""
        if self._prep is None:
            raise RuntimeError("prepare() was not called")
        missing = [j for j in self.layers if j not in self._seen]
        if missing:
            raise RuntimeError(f"no forward pass reached layers {missing} since prepare(); run the "
                               "model inside the recorder's context")
        attn = self._acc / len(self.layers)
        return attn, self._prep.frame_valid.to(attn.device)


def frame_attention(model: nn.Module, inputs: dict, response_start: int, response_len: int,
                    layers: Sequence[int] = (-1, -2, -3),
                    query_chunk: int = 128) -> tuple[Tensor, Tensor]:
    """One no-grad forward of ``inputs`` (prompt + response, visual inputs included) -> frame
    attention ``[B, N, T_max]`` and frame validity ``[B, T_max]`` (see the module docstring).

    Prefer attaching a :class:`FrameAttentionRecorder` to a forward you run anyway; this helper
    runs its own forward (with ``logits_to_keep=1``, the logits are not needed).
    """
    recorder = FrameAttentionRecorder(model, layers, query_chunk)
    recorder.prepare(inputs["input_ids"], inputs.get("attention_mask"),
                     inputs.get("video_grid_thw"), response_start, response_len)
    forward_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    with recorder, torch.no_grad():
        model(**forward_inputs, use_cache=False, logits_to_keep=1)
    return recorder.result()


def frames_per_row(model: nn.Module, input_ids: Tensor, video_grid_thw: Tensor | None) -> Tensor:
    """Temporal patches of each row's video (1 for an image-only row): ``[B]`` long.

    The frame count :class:`FrameAttentionRecorder` would use, for controls that replace the
    captured attention (``attention: random``).
    """
    config = model.config
    image_token_id = getattr(config, "image_token_id", None)
    frame_of = frame_index_of_tokens(input_ids, video_grid_thw, int(config.video_token_id),
                                     int(config.vision_config.spatial_merge_size),
                                     None if image_token_id is None else int(image_token_id))
    return frame_of.max(1).values + 1
