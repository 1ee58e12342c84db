"""The ULD decoding rule: plausibility filter + logit difference, in pure torch.

This is the exact semantics every other path (the vLLM engine, the Triton kernel) must reproduce.
See ``uld_logits`` for the maths.
"""

from __future__ import annotations

import math

import torch

from uld_vllm.errors import UldError

MODES = ("generate", "score")
# what is subtracted: the assistant's logits (the paper), or only where the assistant puts
# more than uniform mass, by how much (log p_a + log V, clipped at 0)
PENALTIES = ("logit", "above_uniform")
# the engine's and the adapters' defaults, chosen by measurement (docs/rules.md): the gate
# leaves every row alone where the assistant is near uniform (it is trained to be, off the
# forget set), and the above-uniform penalty forgets without raising junk tokens
DEFAULT_PENALTY = "above_uniform"
DEFAULT_GATE = (1.0, 3.0)


def uld_logits(
    target_logits: torch.Tensor,
    assistant_logits: torch.Tensor,
    *,
    alpha: float | torch.Tensor = 1.0,
    filter_ratio: float = 0.1,
    mode: str = "generate",
    penalty: str = "logit",
    gate: tuple[float, float] | None = None,
) -> torch.Tensor:
    r"""Combine target and assistant logits the ULD way.

    Shapes: ``target_logits`` and ``assistant_logits`` are ``[B, V]`` (any float dtype; the
    computation is done in float32 and the result is float32 ``[B, V]``). ``alpha`` is a float
    or a ``[B]`` tensor (one weight per row). The defaults of ``penalty`` and ``gate`` are the
    paper's rule; the engine's defaults are ``uld_vllm.engine.settings``'s.

    With ``l`` the target row, ``a`` the assistant row and ``r = filter_ratio``:

    * **Confidence gate** (``gate = (lo, hi)``): the row's weight is
      ``alpha * clip((KL(p_a || U) - lo) / (hi - lo), 0, 1)``, with ``KL(p_a || U) =
      log V - H(p_a)`` in nats: 0 where the assistant is uniform (what it is trained to be on
      everything but the forget set), ``log V`` where it is certain. A row the assistant knows
      nothing about gets weight 0 (``confidence_gate``), so its greedy token is the target's.
    * **Penalty**: ``pen = a`` (``"logit"``, the paper) or ``pen = max(0, log p_a + log V)``
      (``"above_uniform"``): only tokens the assistant prefers over uniform are pushed down, by
      how much it prefers them, and a token it dislikes is not pushed up (with ``"logit"``, a
      very low assistant logit raises a token, which is how junk tokens win). Wherever ``a``
      appears below, read ``pen``.

    * **Plausibility filter** (``r > 0``). ``lp = log_softmax(l)``, ``k = max(1, floor(r*V))``,
      ``thr = min(kth_largest(lp, k), max(lp) + ln r)``. Token ``v`` is *kept* iff
      ``lp[v] >= thr``: the top-k tokens (all of them on a tie at the k-th place) plus every
      token with ``p[v] >= r * p_max``.
    * ``mode="generate"``: ``s[v] = l[v] - alpha * a[v]`` on kept tokens, ``-inf`` elsewhere, so
      a masked token can never be chosen, greedy or sampled.
    * ``mode="score"`` (teacher-forced probabilities, as the reference computes TOFU metrics):
      ``s[v] = l[v] - alpha * a[v]`` on kept tokens and ``s[v] = l[v]`` on masked ones; the
      caller takes a softmax over the full vocabulary.
    * ``r == 0`` (no filter, both modes): ``s = log_softmax(l) - alpha * log_softmax(a)``.

    Non-finite inputs (which vLLM never produces, but logits processors can): a token whose
    target logit is ``-inf`` is never kept. A kept token whose assistant logit is ``-inf`` has
    no defined difference when ``alpha != 0``; it is treated as masked (``-inf`` in generate
    mode, the target logit in score mode). With ``alpha == 0`` the assistant is ignored
    entirely. A row whose target logits are all ``-inf`` comes back all ``-inf`` (no NaN).
    NaN and ``+inf`` inputs are not supported. With ``"above_uniform"`` an assistant logit of
    ``-inf`` is a penalty of 0 (the token is kept on the target's own logit).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if penalty not in PENALTIES:
        raise ValueError(f"penalty must be one of {PENALTIES}, got {penalty!r}")
    check_gate(gate)
    if target_logits.dim() != 2 or target_logits.shape != assistant_logits.shape:
        raise ValueError(
            "target_logits and assistant_logits must both be [B, V] with the same shape, got "
            f"{tuple(target_logits.shape)} and {tuple(assistant_logits.shape)}"
        )
    if not 0.0 <= filter_ratio < 1.0:
        raise ValueError(f"filter_ratio must be in [0, 1), got {filter_ratio}")
    B, V = target_logits.shape
    l = target_logits.float()
    a = assistant_logits.float()
    alpha_col = _alpha_column(alpha, B, l.device)
    neg_inf = torch.tensor(float("-inf"), device=l.device)
    if gate is not None:
        alpha_col = alpha_col * confidence_gate(a, gate).unsqueeze(-1)
    if penalty == "above_uniform":
        pen = above_uniform(a)
        if filter_ratio == 0.0:
            s = _safe_log_softmax(l) - alpha_col * pen
            return torch.where(l > float("-inf"), s, neg_inf)
        keep = plausibility_mask(l, filter_ratio)
        s = torch.addcmul(l, alpha_col, pen, value=-1.0)
        return torch.where(keep, s, neg_inf if mode == "generate" else l)

    if filter_ratio == 0.0:
        return _log_prob_difference(l, a, alpha_col, neg_inf)

    return combine_with_mask(l, a, plausibility_mask(l, filter_ratio), alpha_col, mode)


def check_gate(gate) -> None:
    if gate is None:
        return
    if (not isinstance(gate, (tuple, list)) or len(gate) != 2
            or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in gate)):
        raise ValueError(f"gate must be (low, high) in nats or None, got {gate!r}")
    lo, hi = gate
    if not 0.0 <= lo < hi:
        raise ValueError(f"gate must have 0 <= low < high, got {gate!r}")


def kl_from_uniform(assistant_logits: torch.Tensor) -> torch.Tensor:
    """``KL(p_a || U) = log V + sum_v p_v log p_v`` per row (``[B]``, float32, nats); 0 for a
    row without any finite logit."""
    a = assistant_logits.float()
    lp = _safe_log_softmax(a)
    plogp = torch.where(lp > float("-inf"), lp.exp() * lp, torch.zeros_like(lp))
    kl = plogp.sum(-1) + math.log(a.shape[-1])
    return torch.where(lp.max(-1).values > float("-inf"), kl, torch.zeros_like(kl))


def confidence_gate(assistant_logits: torch.Tensor, gate: tuple[float, float]) -> torch.Tensor:
    """Each row's share of alpha, ``clip((KL(p_a || U) - lo) / (hi - lo), 0, 1)`` (``[B]``)."""
    lo, hi = gate
    return ((kl_from_uniform(assistant_logits) - lo) / (hi - lo)).clamp(0.0, 1.0)


def above_uniform(assistant_logits: torch.Tensor) -> torch.Tensor:
    """``max(0, log p_a + log V)``: how much more than uniform the assistant puts on each
    token, in nats (0 where it puts uniform mass or less, and at ``-inf`` logits)."""
    a = assistant_logits.float()
    lp = _safe_log_softmax(a) + math.log(a.shape[-1])
    return torch.where(lp > 0, lp, torch.zeros_like(lp))


def combine_with_mask(l: torch.Tensor, a: torch.Tensor, keep: torch.Tensor,
                      alpha_col: torch.Tensor, mode: str) -> torch.Tensor:
    """The step after the filter, for fp32 ``l``/``a`` and a given ``plausibility_mask``
    (``alpha_col``: ``[B, 1]``). Callers that already hold the mask skip recomputing it."""
    neg_inf = torch.tensor(float("-inf"), device=l.device)
    # addcmul: l - alpha * a in one pass (this runs on every decode step of the engine)
    s = torch.addcmul(l, alpha_col, a, value=-1.0)
    if bool(a.min() == float("-inf")):
        # 0 * -inf is NaN: rows with alpha == 0 ignore the assistant, its -inf entries too
        bad = (a == float("-inf")) & (alpha_col != 0)
        keep &= ~bad
        s = torch.where(a == float("-inf"), l, s)
    if mode == "generate":
        return torch.where(keep, s, neg_inf)
    return torch.where(keep, s, l)


def plausibility_mask(logits: torch.Tensor, filter_ratio: float) -> torch.Tensor:
    """Kept tokens of the plausibility filter, ``[B, V]`` bool (``0 < filter_ratio < 1``).

    Computed on raw logits: ``log_softmax`` shifts a row by a constant, so
    ``lp >= min(kth_largest(lp, k), max(lp) + ln r)`` selects the same tokens as
    ``l >= min(kth_largest(l, k), max(l) + ln r)``. When at least k tokens already pass the
    ratio test, the k-th largest value is above ``max + ln r`` and need not be found; only the
    other rows pay for a top-k.
    """
    l = logits.float()
    B, V = l.shape
    k = max(1, math.floor(filter_ratio * V))
    ratio_thr = l.max(dim=-1, keepdim=True).values + math.log(filter_ratio)
    keep = l >= ratio_thr
    short = keep.sum(dim=-1) < k
    n_short = int(short.sum())
    if n_short:
        # in a short row the k-th largest value is below max + ln r, so it is the threshold
        if n_short == B:
            thr = torch.topk(l, k, dim=-1).values[:, -1:]
        else:
            thr = ratio_thr.clone()
            rows = short.nonzero()[:, 0]
            thr[rows] = torch.topk(l[rows], k, dim=-1).values[:, -1:]
        keep = keep_from_threshold(l, thr)
    return keep


def plausibility_threshold(kth: torch.Tensor, row_max: torch.Tensor,
                           filter_ratio: float) -> torch.Tensor:
    """The filter's threshold per row from its k-th largest and largest logit (``[B, 1]``):
    a token is kept iff its logit is ``>= min(kth, max + ln r)``."""
    return torch.minimum(kth, row_max + math.log(filter_ratio))


def keep_from_threshold(logits: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    """``logits >= thr`` per row, except that ``-inf`` is never kept (a row with fewer than
    k finite logits has a threshold of ``-inf``)."""
    keep = logits >= thr
    if bool((thr == float("-inf")).any()):
        keep &= logits > float("-inf")
    return keep


def _log_prob_difference(l, a, alpha_col, neg_inf):
    """``filter_ratio == 0``: log_softmax(l) - alpha * log_softmax(a), -inf rules as above."""
    target_ok = l > float("-inf")
    assistant_bad = (a == float("-inf")) & (alpha_col != 0)
    la = _safe_log_softmax(a)
    la = torch.where(la == float("-inf"), torch.zeros_like(la), la)
    s = _safe_log_softmax(l) - alpha_col * la
    return torch.where(target_ok & ~assistant_bad, s, neg_inf)


def _alpha_column(alpha: float | torch.Tensor, rows: int, device: torch.device) -> torch.Tensor:
    if isinstance(alpha, torch.Tensor):
        if alpha.dim() == 0:
            alpha = alpha.reshape(1).expand(rows)
        if alpha.shape != (rows,):
            raise ValueError(f"alpha tensor must have shape [{rows}], got {tuple(alpha.shape)}")
        return alpha.to(device=device, dtype=torch.float32).unsqueeze(-1)
    return torch.full((rows, 1), float(alpha), device=device, dtype=torch.float32)


def _safe_log_softmax(x: torch.Tensor) -> torch.Tensor:
    """log_softmax that maps an all -inf row to all -inf instead of NaN."""
    row_max = x.max(dim=-1, keepdim=True).values
    empty = row_max == float("-inf")
    out = torch.log_softmax(torch.where(empty, torch.zeros_like(x), x), dim=-1)
    return torch.where(empty | (x == float("-inf")), torch.full_like(x, float("-inf")), out)


def parse_gate(value, what: str = "--uld-gate") -> tuple[float, float] | None:
    """A gate as ``(low, high)`` nats, or None (off): from ``"LOW,HIGH"``/``"off"``, a
    two-number list, or None. Bad values are a one-line ``UldError`` naming ``what``."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "off"):
        return None
    try:
        if isinstance(value, str):
            value = [float(x) for x in value.split(",")]
        if isinstance(value, (list, tuple)) and not any(isinstance(x, bool) for x in value):
            gate = tuple(float(x) for x in value)
            check_gate(gate)
            return gate
    except (TypeError, ValueError):
        pass
    raise UldError(f"{what} {value!r} is not LOW,HIGH with 0 <= LOW < HIGH (nats of "
                   "KL(p_assistant || uniform)) or off",
                   f"e.g. {DEFAULT_GATE[0]:g},{DEFAULT_GATE[1]:g}, or off for the paper's "
                   "ungated rule")
