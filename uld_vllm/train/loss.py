"""The ULD training objective, on plain tensors (no model, no Trainer), so it can be tested alone.

``L = L_f + beta * L_r``:

* ``L_f``: causal-LM cross-entropy on the answer tokens of the *forget* rows (labels ``-100``
  mark prompt and padding tokens), averaged over those tokens. The assistant learns to
  *remember* what the target must forget.
* ``L_r``: ``KL(U || p)`` between the uniform distribution over the vocabulary and the
  assistant's next-token distribution, on the *retain* rows. By default it is averaged over the
  non-padding positions of those rows (``attention_mask == 1``); ``all_positions=True`` gives
  the reference implementation's variant, which averages over every position, padding
  included (so it depends on how much padding a batch happens to carry).

A side absent from a batch contributes exactly 0 (and no gradient), as in the reference.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclasses.dataclass
class UldLossOutput:
    loss: torch.Tensor  # scalar, L_f + beta * L_r
    forget: torch.Tensor  # scalar, L_f (0 when no forget row or no answer token)
    retain: torch.Tensor  # scalar, L_r (0 when no retain row)


class UldLoss:
    """Namespace for the ULD loss; see the module docstring for the maths."""

    @staticmethod
    def compute(logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor,
                is_retain: torch.Tensor, *, retain_weight: float = 5.0,
                all_positions: bool = False) -> UldLossOutput:
        """``L_f + retain_weight * L_r`` for one batch.

        Shapes: ``logits`` ``[B, T, V]`` (any float dtype; computed in float32), ``labels``
        ``[B, T]`` int (the input ids with prompt and padding set to ``-100``; the usual
        causal shift is done here: position ``t`` predicts ``labels[:, t + 1]``),
        ``attention_mask`` ``[B, T]`` (1 = real token, 0 = padding), ``is_retain`` ``[B]``
        bool (True = retain row, False = forget row). Returns scalars.
        """
        is_retain = is_retain.to(torch.bool)
        forget = UldLoss.forget_ce(logits[~is_retain], labels[~is_retain])
        retain = UldLoss.retain_kl(logits[is_retain], attention_mask[is_retain],
                                   all_positions=all_positions)
        return UldLossOutput(loss=forget + retain_weight * retain, forget=forget, retain=retain)

    @staticmethod
    def forget_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Token-mean next-token cross-entropy; ``logits [B, T, V]``, ``labels [B, T]``."""
        shifted = labels[:, 1:]
        n = (shifted != IGNORE_INDEX).sum()
        if logits.shape[0] == 0 or int(n) == 0:
            # Keep the graph connected (a zero that still depends on the logits) so backward
            # works even when the whole batch lacks this side.
            return logits.sum().float() * 0.0
        flat = logits[:, :-1].float().reshape(-1, logits.shape[-1])
        return F.cross_entropy(flat, shifted.reshape(-1), ignore_index=IGNORE_INDEX,
                               reduction="sum") / n

    @staticmethod
    def retain_kl(logits: torch.Tensor, attention_mask: torch.Tensor, *,
                  all_positions: bool = False) -> torch.Tensor:
        """Mean over positions of ``KL(U || softmax(logits))``; ``logits [B, T, V]``.

        Per position: ``sum_v (1/V) (log(1/V) - log p_v) = -log V - mean_v log p_v``, which is
        0 exactly when ``p`` is uniform.
        """
        if logits.shape[0] == 0:
            return logits.sum().float() * 0.0
        vocab = logits.shape[-1]
        logp = torch.log_softmax(logits.float(), dim=-1)
        kl = -math.log(vocab) - logp.mean(dim=-1)  # [B, T]
        if all_positions:
            return kl.mean()
        mask = attention_mask.to(kl.dtype)
        n = mask.sum()
        if float(n) == 0.0:
            return logits.sum().float() * 0.0
        return (kl * mask).sum() / n
