"""APPO crucial frames, intra-group perception tokens and token weights (docs/method.md, steps 2-6).

Everything here works on ONE group of ``G`` sampled responses to the same prompt and is written
as vectorised torch code (no Python loops over tokens or responses).  Notation, following
``docs/method.md``:

* ``attn`` ``[G, N, T]``: ``a[i, n, t]``, attention of response token ``n`` of response ``i``
  to frame (temporal patch) ``t``; zero at padding.
* ``mask`` ``[G, N]`` bool: valid response tokens.
* ``correct`` ``[G]`` bool: accuracy reward ``>= tau`` (the caller applies ``tau = 0.5``).

Pipeline (:func:`perception_weights`)::

    s = frame_scores(attn, mask, k_avg)                       # [G, T]
    V = crucial_frames(s, correct, valid_rows, k_f, ...)      # [T] bool
    index, valid = perception_token_index(attn, mask, V, K)   # [F, G, Kc]
    logp = logp_fn(index)                                     # [F, G, Kc, vocab]
    d = aligned_divergence(logp, valid)                       # [F, Kc]
    u = minmax(d, valid.any(1))                               # [F, Kc]
    w = scatter_token_weights(u, index, valid, N, w_max)      # [G, N]

Selection-level names (paper <-> authors' code):

=============  ==================  =======================================================
paper name     authors' code name  crucial frames
=============  ==================  =======================================================
``all``        ``force-all``       ``psi(S1) | psi(S2)``
``soft``       ``hard``            ``psi(S1)``; ``psi(all responses)`` when ``S1`` is empty
``hard``       (none)              ``psi(S1) \\ psi(S2)`` (may be empty)
=============  ==================  =======================================================

(The code's ``soft`` is only the fallback branch of the code's ``hard``.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from appo.config import ATTENTION_SOURCES, SELECT_LEVELS, SELECT_STRATEGIES, WEIGHT_PLACEMENTS

__all__ = [
    "SELECT_LEVELS",
    "SELECT_STRATEGIES",
    "CODE_TO_PAPER_LEVEL",
    "frame_scores",
    "crucial_frames",
    "perception_token_index",
    "aligned_divergence",
    "minmax",
    "scatter_token_weights",
    "perception_weights",
    "ATTENTION_SOURCES",
    "WEIGHT_PLACEMENTS",
    "random_frame_attention",
    "uniform_like",
]

#: The authors' code names of the selection levels mapped to the paper's names used here.
CODE_TO_PAPER_LEVEL: dict[str, str] = {"force-all": "all", "hard": "soft"}

DELTA_CLAMP = 11.0
MINMAX_EPS = 1e-8
# A frame whose divergences spread by no more than MINMAX_RTOL * max(1, max_k d) is flat (u = 0,
# w = 1): that is the resolution at which float32 log-probs determine d.  Their relative rounding
# (2^-24 = 6e-8) times |log p| <= ~17 moves each ``m - log p`` by ~1e-6, which changes d by at
# most ~1e-6 relative (the k3 terms' slope is |e^delta - 1|) and, around d = 0, by
# ~V * (1e-6)^2 / 2 <= 1e-7 absolute even for Qwen's 152k vocabulary.  Without it, min-max
# normalisation stretches that noise (e.g. a group of identical responses) to the full [1, w_max].
MINMAX_RTOL = 1e-6

LogpFn = Callable[[Tensor], Tensor]


def _check_names(select_level: str, select_strategy: str) -> None:
    if select_level not in SELECT_LEVELS:
        raise ValueError(
            f"unknown select_level {select_level!r}; valid: {', '.join(SELECT_LEVELS)} "
            f"(authors' code names map as {CODE_TO_PAPER_LEVEL})"
        )
    if select_strategy not in SELECT_STRATEGIES:
        raise ValueError(
            f"unknown select_strategy {select_strategy!r}; valid: {', '.join(SELECT_STRATEGIES)}"
        )


def _check_attn(attn: Tensor, mask: Tensor) -> None:
    if attn.dim() != 3:
        raise ValueError(f"attn must be [G, N, T], got shape {tuple(attn.shape)}")
    if mask.shape != attn.shape[:2]:
        raise ValueError(f"mask must be [G, N] = {tuple(attn.shape[:2])}, got {tuple(mask.shape)}")


def _frame_valid(frame_valid: Tensor | None, G: int, T: int, device: torch.device) -> Tensor:
    """``frame_valid`` (``None``, ``[T]`` or ``[G, T]``) as a ``[G, T]`` bool tensor."""
    if frame_valid is None:
        return torch.ones(G, T, dtype=torch.bool, device=device)
    fv = frame_valid.bool().to(device)
    if fv.shape == (T,):
        fv = fv[None, :]
    if fv.dim() != 2 or fv.shape[1] != T or fv.shape[0] not in (1, G):
        raise ValueError(f"frame_valid must be [T] = [{T}] or [G, T] = [{G}, {T}], got "
                         f"{tuple(frame_valid.shape)}")
    return fv.expand(G, T)


def frame_scores(attn: Tensor, mask: Tensor, k_avg: int) -> Tensor:
    """s[i, t] = mean of the k_avg largest a[i, n, t] over the valid tokens n of response i.

    If response ``i`` has fewer than ``k_avg`` valid tokens the mean is over all its valid
    tokens; a response without valid tokens scores 0 on every frame.

    Args:
        attn: ``[G, N, T]`` frame attention ``a``.
        mask: ``[G, N]`` bool, valid response tokens.
        k_avg: number of top tokens averaged (``>= 1``; paper default 15).

    Returns:
        ``[G, T]`` scores in ``attn``'s dtype.
    """
    _check_attn(attn, mask)
    if k_avg < 1:
        raise ValueError(f"k_avg must be >= 1, got {k_avg}")
    G, N, T = attn.shape
    if N == 0:
        return attn.new_zeros(G, T)
    mask = mask.bool()
    k = min(k_avg, N)
    masked = attn.masked_fill(~mask[:, :, None], float("-inf"))
    top = masked.topk(k, dim=1).values  # [G, k, T], valid values first (they are > -inf)
    cnt = mask.sum(dim=1).clamp(max=k)  # [G] number of valid entries among the top k
    rank_ok = torch.arange(k, device=attn.device)[None, :, None] < cnt[:, None, None]
    top = torch.where(rank_ok, top, torch.zeros_like(top))
    return top.sum(dim=1) / cnt.clamp(min=1)[:, None].to(top.dtype)


def crucial_frames(
    scores: Tensor,
    correct: Tensor,
    valid_rows: Tensor,
    k_f: int,
    select_level: str = "all",
    select_strategy: str = "topk-union",
    frame_valid: Tensor | None = None,
) -> Tensor:
    """V = psi(S1) | psi(S2) (all), psi(S1) or psi(all) if S1 empty (soft), psi(S1) minus psi(S2) (hard).

    ``psi(S)`` is the union over responses ``i`` in ``S`` of the top-``k_f`` frames of
    ``scores[i]`` (``k_f`` capped at ``T``; ties broken towards the lower frame index via a
    stable sort).  ``S1`` = correct responses, ``S2`` = the rest; rows with
    ``valid_rows == False`` (no response tokens) belong to neither.

    Paper name <-> authors' code name: ``all`` = code ``force-all``; ``soft`` = code ``hard``
    (whose empty-``S1`` fallback is the code's ``soft``); ``hard`` = paper only, no code path.
    ``select_strategy="all"`` marks every frame crucial regardless of ``select_level``.

    ``frame_valid`` marks the frames that exist: in a micro-batch of videos with different
    numbers of temporal patches, a shorter video's frames are padded up to the longest one's
    and those padded frames have no visual tokens.  An invalid frame is never crucial: its
    score is ``-inf`` before the top-``k_f`` (so a response with fewer than ``k_f`` valid
    frames takes only those) and it is excluded from every union (and from
    ``select_strategy="all"``).

    Args:
        scores: ``[G, T]`` frame scores from :func:`frame_scores`.
        correct: ``[G]`` bool, accuracy reward ``>= tau``.
        valid_rows: ``[G]`` bool, responses with at least one valid token.
        k_f: frames taken per response (paper default 3).
        select_level: ``"all"`` | ``"soft"`` | ``"hard"`` (paper names).
        select_strategy: ``"topk-union"`` | ``"all"``.
        frame_valid: ``[G, T]`` (per response) or ``[T]`` bool, frames that exist; ``None`` =
            all of them.

    Returns:
        ``[T]`` bool mask of crucial frames.

    Raises:
        ValueError: unknown ``select_level`` / ``select_strategy`` or negative ``k_f``.
    """
    _check_names(select_level, select_strategy)
    if scores.dim() != 2:
        raise ValueError(f"scores must be [G, T], got shape {tuple(scores.shape)}")
    if k_f < 0:
        raise ValueError(f"k_f must be >= 0, got {k_f}")
    G, T = scores.shape
    device = scores.device
    fv = _frame_valid(frame_valid, G, T, device)
    if select_strategy == "all":
        return fv.any(dim=0)
    kf = min(k_f, T)
    rows = valid_rows.bool().to(device)
    corr = correct.bool().to(device)
    scores = scores.masked_fill(~fv, float("-inf"))
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :kf]  # [G, kf]
    top = torch.zeros(G, T, dtype=torch.bool, device=device)
    top.scatter_(1, order, True)
    top &= fv  # fewer than k_f valid frames: the -inf (padded) ones are not taken

    def psi(sel: Tensor) -> Tensor:
        return (top & sel[:, None]).any(dim=0)

    s1 = corr & rows
    s2 = ~corr & rows
    if select_level == "all":
        return psi(s1) | psi(s2)
    if select_level == "soft":
        # Data-dependent branch (one host sync) is fine: it is one scalar per group.
        return psi(s1) if bool(s1.any()) else psi(rows)
    return psi(s1) & ~psi(s2)  # "hard"


def perception_token_index(
    attn: Tensor, mask: Tensor, frames: Tensor, K: int
) -> tuple[Tensor, Tensor]:
    """P[f, i] = positions of the K largest a[i, :, t_f] over valid tokens, sorted by position.

    ``t_f`` runs over the crucial frames in increasing frame order (``F`` of them), and
    ``Kc = min(K, N)``.  Ties in attention prefer the lower position (stable sort).  If response
    ``i`` has fewer than ``Kc`` valid tokens, its trailing slots are invalid (``valid`` False,
    index 0).

    Args:
        attn: ``[G, N, T]`` frame attention.
        mask: ``[G, N]`` bool valid tokens.
        frames: ``[T]`` bool crucial frames.
        K: perception tokens per (frame, response) (paper: 128 SEED-Bench-R1, 512 NExT-GQA).

    Returns:
        ``(index, valid)``: ``index`` ``[F, G, Kc]`` long positions in ``[0, N)``, ascending
        within the valid prefix; ``valid`` ``[F, G, Kc]`` bool.
    """
    _check_attn(attn, mask)
    if K < 1:
        raise ValueError(f"K must be >= 1, got {K}")
    G, N, T = attn.shape
    if frames.shape != (T,):
        raise ValueError(f"frames must be [T] = [{T}], got {tuple(frames.shape)}")
    device = attn.device
    mask = mask.bool()
    fidx = frames.bool().to(device).nonzero().flatten()  # [F], increasing
    F = int(fidx.numel())
    Kc = min(K, N)
    if F == 0 or Kc == 0:
        empty = torch.zeros(F, G, Kc, dtype=torch.long, device=device)
        return empty, empty.bool()
    a = attn.index_select(2, fidx).permute(2, 0, 1)  # [F, G, N]
    a = a.masked_fill(~mask[None], float("-inf"))
    # Stable descending sort: equal attention keeps the lower position first.
    top = torch.sort(a, dim=2, descending=True, stable=True).indices[:, :, :Kc]  # [F, G, Kc]
    nvalid = mask.sum(dim=1)  # [G]
    rank_ok = torch.arange(Kc, device=device)[None, None, :] < nvalid[None, :, None]
    # Valid picks form the prefix of the rank order; push invalid ones to the end with the
    # sentinel N, then sort by position.
    keyed = torch.where(rank_ok, top, torch.full_like(top, N))
    pos = torch.sort(keyed, dim=2).values
    valid = pos < N
    index = torch.where(valid, pos, torch.zeros_like(pos))
    return index, valid


def aligned_divergence(logp: Tensor, valid: Tensor) -> Tensor:
    """d[k] = mean_i sum_v (exp(m - log p_i) - (m - log p_i) - 1), m = mean_i log p_i, clamped to ±11.

    Masked slots (``valid`` False) use the uniform distribution ``log(1/V)`` and still count in
    both means over the ``G`` responses (as in the paper: "masked positions use the uniform
    distribution").  ``m - log p_i`` is clamped to ``[-11, 11]`` before the k3 terms.

    Computed in float64 (with ``expm1(z) - z`` for the k3 term, free of the cancellation of
    ``e^z - z - 1`` at small ``z``): the mean over ``G`` of float32 (or bf16) values is then exact
    whenever the rows are equal, so identical responses give ``d = 0`` exactly instead of float32
    noise summed over the vocabulary.

    Args:
        logp: ``[F, G, Kc, V]`` full-vocabulary log-softmax at the selected tokens.
        valid: ``[F, G, Kc]`` bool.

    Returns:
        ``[F, Kc]`` float64 divergences (``>= 0``).
    """
    if logp.dim() != 4 or valid.shape != logp.shape[:3]:
        raise ValueError(
            f"logp must be [F, G, Kc, V] and valid [F, G, Kc]; got {tuple(logp.shape)} "
            f"and {tuple(valid.shape)}"
        )
    V = logp.shape[-1]
    lp = logp.double()
    lp = torch.where(valid.bool()[..., None], lp, lp.new_full((), -math.log(V)))
    m = lp.mean(dim=1, keepdim=True)  # [F, 1, Kc, V]
    delta = (m - lp).clamp(-DELTA_CLAMP, DELTA_CLAMP)
    return (torch.expm1(delta) - delta).sum(dim=-1).mean(dim=1)


def minmax(d: Tensor, valid_k: Tensor, eps: float = MINMAX_EPS,
           rtol: float = MINMAX_RTOL) -> Tensor:
    """u[f, k] = (d[f, k] - min_k d[f]) / (max_k d[f] - min_k d[f] + eps) over the valid k.

    Per frame ``f``; ``valid_k[f, k]`` is True when some response has a valid token at rank
    ``k``.  Invalid ``k`` get 0 and are excluded from the min / max.  The ``eps`` (1e-8, as in
    the authors' division by ``max - min + eps``) makes a constant ``d`` (including a single
    valid ``k``) give ``u = 0`` rather than NaN; a frame with no valid ``k`` is all zeros.
    A frame whose range is within rounding, ``max - min <= rtol * max(1, max)`` (see
    :data:`MINMAX_RTOL`), counts as constant too: ``u = 0`` exactly, so its tokens get ``w = 1``.

    Args:
        d: ``[F, Kc]`` divergences.
        valid_k: ``[F, Kc]`` bool.
        eps: added to the range.
        rtol: ranges up to ``rtol * max(1, max_k d[f])`` are zero.

    Returns:
        ``[F, Kc]`` values in ``[0, 1)`` (``1 - eps/(range+eps)`` at the maximum).
    """
    if d.shape != valid_k.shape or d.dim() != 2:
        raise ValueError(f"d and valid_k must both be [F, Kc]; got {d.shape}, {valid_k.shape}")
    vk = valid_k.bool()
    if d.numel() == 0:
        return torch.zeros_like(d)
    big = torch.finfo(d.dtype).max
    dmin = torch.where(vk, d, d.new_full((), big)).amin(dim=1, keepdim=True)
    dmax = torch.where(vk, d, d.new_full((), -big)).amax(dim=1, keepdim=True)
    any_k = vk.any(dim=1, keepdim=True)
    # Safe values for empty frames (keeps forward and backward NaN-free).
    dmin = torch.where(any_k, dmin, torch.zeros_like(dmin))
    dmax = torch.where(any_k, dmax, torch.zeros_like(dmax))
    rng = dmax - dmin
    flat = rng <= rtol * dmax.detach().abs().clamp(min=1.0)  # [F, 1]
    u = (d - dmin) / (rng + eps)
    return torch.where(vk & ~flat, u, torch.zeros_like(u))


def _scatter_sum_count(u: Tensor, index: Tensor, valid: Tensor, N: int) -> tuple[Tensor, Tensor]:
    """S[i, n] = sum_f u[f, k] over the (f, k) that select token n of response i; C = their count."""
    F, G, Kc = index.shape
    vf = valid.to(u.dtype)
    vals = u[:, None, :] * vf  # [F, G, Kc]
    flat = (index + torch.arange(G, device=index.device)[None, :, None] * N).reshape(-1)
    total = u.new_zeros(G * N).index_add(0, flat, vals.reshape(-1))
    count = u.new_zeros(G * N).index_add(0, flat, vf.reshape(-1))
    return total.view(G, N), count.view(G, N)


def scatter_token_weights(u: Tensor, index: Tensor, valid: Tensor, N: int, w_max: float) -> Tensor:
    """w[i, n] = 1 + (w_max - 1) * mean over the frames f selecting token n of u[f, rank of n].

    Every response's ``k``-th perception token of frame ``f`` receives ``u[f, k]`` (times its
    ``valid``); a token selected for several frames gets the average of those values; tokens
    never selected get ``u = 0`` i.e. ``w = 1``.  Vectorised with ``index_add``.

    Args:
        u: ``[F, Kc]`` normalised divergences.
        index: ``[F, G, Kc]`` long token positions.
        valid: ``[F, G, Kc]`` bool.
        N: number of token positions per response.
        w_max: weight at ``u = 1`` (paper default 1.7).

    Returns:
        ``[G, N]`` weights in ``[1, w_max]``, dtype of ``u``.
    """
    if (
        index.dim() != 3
        or valid.shape != index.shape
        or u.shape != (index.shape[0], index.shape[2])
    ):
        raise ValueError(
            f"need u [F, Kc], index and valid [F, G, Kc]; got {tuple(u.shape)}, "
            f"{tuple(index.shape)}, {tuple(valid.shape)}"
        )
    total, count = _scatter_sum_count(u, index, valid, N)
    ubar = total / count.clamp(min=1.0)
    return 1.0 + (w_max - 1.0) * ubar


def perception_weights(
    attn: Tensor,
    mask: Tensor,
    correct: Tensor,
    logp_fn: LogpFn,
    *,
    k_avg: int = 15,
    k_f: int = 3,
    K: int = 128,
    w_max: float = 1.7,
    select_level: str = "all",
    select_strategy: str = "topk-union",
    weights_grad: bool = False,
    frame_chunk: int | None = None,
    frame_valid: Tensor | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """w[i, n] = 1 + (w_max - 1) * u[i, n]: APPO token weights for one group (docs/method.md).

    Composes :func:`frame_scores`, :func:`crucial_frames`, :func:`perception_token_index`,
    :func:`aligned_divergence`, :func:`minmax` and :func:`scatter_token_weights`.

    Args:
        attn: ``[G, N, T]`` frame attention (0 at padding).
        mask: ``[G, N]`` bool valid response tokens.
        correct: ``[G]`` bool, accuracy reward ``>= tau``.
        logp_fn: ``logp_fn(index [F', G, Kc]) -> [F', G, Kc, V]`` full-vocabulary log-softmax of
            the policy at exactly those token positions (the trainer gathers hidden states; a
            ``[G, N, V]`` tensor is never needed).  Called once with all ``F`` frames, or once
            per chunk of ``frame_chunk`` frames; in total never on more than ``F * G * Kc``
            positions.  Called under ``torch.no_grad()`` unless ``weights_grad``.
        k_avg, k_f, K, w_max: the paper's hyperparameters (defaults 15, 3, 128, 1.7).
        select_level: paper names ``"all"`` (code ``force-all``), ``"soft"`` (code ``hard``),
            ``"hard"`` (paper only); see :func:`crucial_frames`.
        select_strategy: ``"topk-union"`` or ``"all"`` (every frame).
        weights_grad: keep the graph through ``logp_fn``'s output (the authors' code does not
            detach); default False returns detached weights.
        frame_chunk: if set, evaluate ``logp_fn`` and the divergence this many frames at a time
            to bound memory.
        frame_valid: ``[G, T]`` or ``[T]`` bool, the frames that exist (``None`` = all); padded
            frames of a shorter video are never crucial (see :func:`crucial_frames`), and a
            response gets no perception tokens for a crucial frame its video lacks.

    Returns:
        ``(w, info)``: ``w`` ``[G, N]`` float32 (all ones when there are no crucial frames or no
        valid tokens); ``info`` has floats ``num_crucial_frames``, ``perception_token_frac``
        (selected valid tokens / valid tokens), ``weight_mean`` and ``weight_max`` (over valid
        tokens) and the LongTensor ``crucial_frames`` (frame indices).
    """
    _check_names(select_level, select_strategy)
    _check_attn(attn, mask)
    if frame_chunk is not None and frame_chunk < 1:
        raise ValueError(f"frame_chunk must be >= 1 or None, got {frame_chunk}")
    G, N, T = attn.shape
    device = attn.device
    mask = mask.bool()
    valid_rows = mask.any(dim=1)
    ones = torch.ones(G, N, dtype=torch.float32, device=device)
    n_valid_tokens = int(mask.sum())

    with torch.no_grad():
        scores = frame_scores(attn.detach(), mask, k_avg)
        fv = _frame_valid(frame_valid, G, T, device)
        frames = crucial_frames(scores, correct, valid_rows, k_f, select_level, select_strategy,
                                frame_valid=fv)
        fidx = frames.nonzero().flatten()

    def _info(w: Tensor, frac: float, nframes: int) -> dict[str, Any]:
        wv = w.detach()[mask]
        return {
            "num_crucial_frames": float(nframes),
            "perception_token_frac": frac,
            "weight_mean": float(wv.mean()) if wv.numel() else 1.0,
            "weight_max": float(wv.max()) if wv.numel() else 1.0,
            "crucial_frames": fidx.to(torch.long).cpu(),
        }

    F = int(fidx.numel())
    if F == 0 or n_valid_tokens == 0:
        return ones, _info(ones, 0.0, F)

    with torch.no_grad():
        index, valid = perception_token_index(attn.detach(), mask, frames, K)
        valid &= fv[:, fidx].T[:, :, None]  # [F, G, 1]: a row whose video lacks frame f
    Kc = index.shape[2]
    chunk = F if frame_chunk is None else frame_chunk

    with torch.set_grad_enabled(weights_grad and torch.is_grad_enabled()):
        parts: list[Tensor] = []
        for start in range(0, F, chunk):
            idx = index[start : start + chunk]
            logp = logp_fn(idx)
            if logp.dim() != 4 or logp.shape[:3] != idx.shape:
                raise ValueError(
                    f"logp_fn must return [F, G, Kc, V] = [{idx.shape[0]}, {G}, {Kc}, V], "
                    f"got {tuple(logp.shape)}"
                )
            parts.append(aligned_divergence(logp, valid[start : start + chunk]))
            del logp
        d = torch.cat(parts, dim=0)
        u = minmax(d, valid.any(dim=1))
        total, count = _scatter_sum_count(u, index, valid, N)
        w = (1.0 + (w_max - 1.0) * (total / count.clamp(min=1.0))).float()
    if not weights_grad:
        w = w.detach()
    selected = int(((count > 0) & mask).sum())
    return w, _info(w, selected / n_valid_tokens, F)


def random_frame_attention(
    shape: tuple[int, int, int],
    mask: Tensor,
    generator: torch.Generator,
    frame_valid: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """a[i, n, t] ~ U[0, 1) drawn from ``generator``, 0 where token n or frame t is invalid.

    The ``attention: random`` control: scores of the captured attention's shape that carry no
    information about the video, so crucial frames and perception tokens are chosen at random
    (the divergence weighting at them is unchanged).  Drawn on ``generator``'s device (a CPU
    generator gives the same values on every device), then moved to ``mask``'s device.

    Args:
        shape: ``(G, N, T)``.
        mask: ``[G, N]`` bool valid response tokens.
        generator: a seeded ``torch.Generator`` (the trainer seeds it per run seed, step and
            group, so runs are reproducible and resume-safe).
        frame_valid: ``[G, T]`` or ``[T]`` bool, frames that exist (``None``: all).
        dtype: floating dtype of the result.

    Returns:
        ``[G, N, T]`` scores in ``[0, 1)``, zero at invalid tokens and frames.
    """
    G, N, T = (int(x) for x in shape)
    if tuple(mask.shape) != (G, N):
        raise ValueError(f"mask must be [G, N] = {(G, N)}, got {tuple(mask.shape)}")
    scores = torch.rand(G, N, T, generator=generator, device=generator.device,
                        dtype=torch.float32).to(device=mask.device, dtype=dtype)
    keep = mask.bool()[:, :, None] & _frame_valid(frame_valid, G, T, mask.device)[:, None, :]
    return torch.where(keep, scores, torch.zeros_like(scores))


def uniform_like(w: Tensor, mask: Tensor) -> Tensor:
    """u[i, n] = mean of w over the valid tokens of the group where mask[i, n], else w[i, n].

    The ``weights: uniform`` control: the group's total APPO emphasis (the sum of the weights
    over its valid tokens) is kept, but spread evenly instead of placed by attention and
    divergence.  A group without valid tokens is returned unchanged.  Differentiable (when
    ``w`` carries a graph, so does the mean).

    Args:
        w: ``[G, N]`` token weights of one group.
        mask: ``[G, N]`` bool valid response tokens.

    Returns:
        ``[G, N]`` weights, ``w``'s dtype.
    """
    if w.shape != mask.shape:
        raise ValueError(f"w and mask must have one shape, got {tuple(w.shape)}, "
                         f"{tuple(mask.shape)}")
    m = mask.bool()
    mean = (w * m).sum() / m.sum().clamp(min=1)
    return torch.where(m, mean.to(w.dtype), w)
