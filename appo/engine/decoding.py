"""KV-cached sampling with each prompt prefilled once per group, and a compiled static-cache step.

Why not HF ``generate``: it runs the vision tower and the prompt prefill for every one of the G
copies of a prompt, and its continue-from-cache path changes between transformers releases.
This loop

1. prefills the B distinct prompts once with the model's own forward (vision tower, multimodal
   rotary positions, KV cache);
2. repeats each prompt's cache G times (rows b*G .. b*G+G-1, the group-major rollout order);
3. decodes one token per step with explicit positions. Response token n sits in cache slot
   P + n (P: padded prompt length); its rotary index is L + n + delta, with L the row's real
   prompt length and delta the offset the prefill stored (transformers 5.x: the prompt's last
   (t, h, w) index + 1 - L; video tokens share time indices, so delta < 0). That is the position
   the training forward over ``[prompt | response]`` gives response token n, so sampling and
   scoring agree (tested).

``static`` mode decodes into a preallocated ``StaticCache`` of (B*G) x (P + N) slots through a
``torch.compile``d one-token step (CUDA graphs on CUDA). Shapes repeat across steps and across
calls with the same bucketed prompt length, so the step compiles once per run and replays;
parameters are inputs of the compiled graph, so updated weights are seen. ``dynamic`` mode is
the same loop with a growing ``DynamicCache`` and no compilation.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass

import torch

DECODE_MODES = ("static", "dynamic")
STOP_CHECK_CUDA = 8  # decoding steps between checks that every row has stopped, on CUDA


@dataclass
class Sampling:
    """How the next token is drawn. Log-probs are always log_softmax(logits / temperature) of the
    drawn token (greedy: temperature 1): top-p and suppressed tokens only restrict the draw."""

    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``top_p``; -inf else.

    A token is dropped when the tokens ranked above it already hold ``top_p`` of the mass, so the
    most likely token always stays.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(-1, descending=True)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    drop_sorted = mass_before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: torch.Tensor, sampling: Sampling,
                suppress: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(next token [R], its log-prob [R]) from raw next-token logits [R, V]."""
    scaled = logits.float() / (1.0 if sampling.greedy else sampling.temperature)
    logp = torch.log_softmax(scaled, -1)
    allowed = scaled if suppress is None else scaled.index_fill(-1, suppress, float("-inf"))
    if sampling.greedy:
        token = allowed.argmax(-1)
    else:
        probs = top_p_filter(allowed, sampling.top_p).softmax(-1)
        token = torch.multinomial(probs, 1).squeeze(1)
    return token, logp.gather(-1, token.unsqueeze(-1)).squeeze(-1)


def unwrap(model) -> torch.nn.Module:
    """The transformers model under DDP / peft (PeftModel) wrappers."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def _cache_kwarg(model) -> str:
    """The forward's name for the KV cache: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    params = inspect.signature(unwrap(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class Decoder:
    """Samples ``num_samples`` responses per prompt; one per model, so the static cache and the
    compiled step live as long as the model (see :func:`decoder_for`)."""

    def __init__(self, model, mode: str = "dynamic", compile_mode: str | None = "auto") -> None:
        if mode not in DECODE_MODES:
            raise ValueError(f"decode mode must be one of {', '.join(DECODE_MODES)}, got {mode!r}")
        # weak: the per-model registry below must not keep a model alive through its decoder
        self._model, self.mode = weakref.ref(model), mode
        self.cache_kw = _cache_kwarg(model)
        self._static = None  # StaticCache reused while (rows, length, dtype, device) stay the same
        self._static_key: tuple | None = None
        self._step_fn = self._forward_step
        on_cuda = next(model.parameters()).device.type == "cuda"
        if mode == "static" and compile_mode is not None:
            if compile_mode == "auto":
                compile_mode = "reduce-overhead" if on_cuda else "default"
            self._step_fn = torch.compile(self._forward_step, mode=compile_mode, dynamic=False)
        self.compiled = self._step_fn is not self._forward_step
        self.stop_check_every = STOP_CHECK_CUDA if on_cuda else 1

    @property
    def model(self):
        model = self._model()
        if model is None:
            raise RuntimeError("the decoder's model no longer exists")
        return model

    # -- one step -------------------------------------------------------------------------------
    def _forward_step(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                      cache) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         use_cache=True, logits_to_keep=1, **{self.cache_kw: cache})
        return out.logits[:, -1]

    # -- prefill ------------------------------------------------------------------------------------
    def _prefill(self, inputs: dict[str, torch.Tensor]):
        """(last-position logits [B, V], KV cache of the B prompts, rotary offset [B])."""
        core = getattr(unwrap(self.model), "model", None)
        if core is not None and hasattr(core, "rope_deltas"):
            core.rope_deltas = None  # never reuse an offset left by an earlier batch
        out = self.model(**inputs, use_cache=True, logits_to_keep=1)
        cache = out[self.cache_kw]
        deltas = getattr(core, "rope_deltas", None)
        device = inputs["input_ids"].device
        if deltas is None:  # no multimodal positions: plain indices, like the scoring forward
            mask = inputs["attention_mask"]
            deltas = (mask.shape[1] - mask.sum(1)).long()
        return out.logits[:, -1], cache, deltas.reshape(-1).to(device=device, dtype=torch.long)

    def _static_cache(self, prefill_cache, repeats: int, length: int):
        """A StaticCache of ``length`` slots holding the prefill's keys/values, each row repeated."""
        from transformers import StaticCache

        layers = prefill_cache.layers
        keys0 = layers[0].keys
        key = (keys0.shape[0] * repeats, length, keys0.dtype, keys0.device)
        if self._static is None or self._static_key != key:
            self._static = StaticCache(config=unwrap(self.model).config, max_cache_len=length)
            self._static_key = key
        else:
            self._static.reset()
        if len(self._static.layers) != len(layers):
            raise RuntimeError("static cache and prefill cache disagree on the number of layers")
        for target, source in zip(self._static.layers, layers):
            target.update(source.keys.repeat_interleave(repeats, 0),
                          source.values.repeat_interleave(repeats, 0),
                          {"cache_position": torch.arange(source.keys.shape[2], device=keys0.device)})
        return self._static

    # -- the loop -----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, inputs: dict[str, torch.Tensor], *, num_samples: int, max_new_tokens: int,
               sampling: Sampling, stop_ids: list[int], pad_id: int,
               suppress_ids: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [B*G, n], log-probs [B*G, n]) with n <= ``max_new_tokens``, group-major rows.

        Rows that stopped emit ``pad_id`` (log-prob 0); the loop ends when every row stopped.
        """
        prompt_len = inputs["input_ids"].shape[1]
        device = inputs["input_ids"].device
        logits, cache, deltas = self._prefill(inputs)
        rows = logits.shape[0] * num_samples
        logits = logits.repeat_interleave(num_samples, 0)
        deltas = deltas.repeat_interleave(num_samples, 0)
        total = prompt_len + max_new_tokens
        mask = torch.ones(rows, total, dtype=inputs["attention_mask"].dtype, device=device)
        mask[:, :prompt_len] = inputs["attention_mask"].repeat_interleave(num_samples, 0)
        first_position = mask[:, :prompt_len].sum(1) + deltas  # rotary index of response token 0
        if self.mode == "static":
            cache = self._static_cache(cache, num_samples, total)
        elif num_samples > 1:
            cache.batch_repeat_interleave(num_samples)
        stops = torch.tensor(stop_ids, device=device)
        suppress = torch.tensor(suppress_ids, device=device) if suppress_ids else None
        pad = torch.tensor(pad_id, device=device)
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        tokens, logps = [], []
        for n in range(max_new_tokens):
            token, logp = sample_next(logits, sampling, suppress)
            token = torch.where(finished, pad, token)
            logps.append(logp.masked_fill(finished, 0.0))
            tokens.append(token)
            finished = finished | torch.isin(token, stops)
            if n + 1 == max_new_tokens:
                break
            # "all rows stopped?" reads the device: on CUDA only every few steps, so the host
            # can queue steps ahead (at most stop_check_every - 1 steps of pads are wasted)
            if (n + 1) % self.stop_check_every == 0 and bool(finished.all()):
                break
            positions = (first_position + n).view(1, rows, 1).expand(3, rows, 1)
            step_mask = mask if self.mode == "static" else mask[:, :prompt_len + n + 1]
            # clone: a CUDA-graph replay overwrites its output buffer on the next call
            logits = self._step_fn(token.unsqueeze(1), positions, step_mask, cache).clone()
        return torch.stack(tokens, 1), torch.stack(logps, 1)


_decoders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decoder_for(model, mode: str) -> Decoder:
    """The model's decoder for ``mode``, created once (a compiled step is then reused)."""
    per_model = _decoders.setdefault(model, {})
    if mode not in per_model:
        per_model[mode] = Decoder(model, mode)
    return per_model[mode]
