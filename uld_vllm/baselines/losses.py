"""Unlearning losses on plain tensors (no model, no Trainer), as OpenUnlearning defines them.

Shapes: ``logits`` ``[B, T, V]``, ``labels`` ``[B, T]`` with ``-100`` on prompt and padding
tokens (the causal shift is done here: position ``t`` predicts ``labels[:, t + 1]``).

* GA (OpenUnlearning ``GradAscent``): ``-NLL_f``, NLL the token mean over the batch's forget
  answer tokens (what an HF model's ``outputs.loss`` is).
* GD (``GradDiff``, retain_loss_type NLL): ``gamma * (-NLL_f) + alpha * NLL_r``.
* NPO (``NPO``, which in OpenUnlearning extends GradDiff, so it carries the retain term too):
  ``gamma * L_npo + alpha * NLL_r`` with
  ``L_npo = -(2 / beta) * mean_i logsigmoid(-beta * (log p(y_i) - log p_ref(y_i)))``
  ``= -(2 / beta) * mean_i logsigmoid(beta * (s_i - s_ref_i))``, where ``s_i`` is the *summed*
  answer NLL of forget row ``i`` under the model being trained and ``s_ref_i`` the same under
  the frozen starting model: DPO with the forget answer as the losing side and no winning side.
  It is ``(2/beta) * log 2`` at the start and falls towards 0 as ``s_i`` grows, so unlike GA it
  stops pushing once an answer is unlikely enough.

All reductions are in float32 whatever the logits' dtype (bf16 autocast would otherwise sum
hundreds of bf16 terms).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


class UnlearnLoss:
    """Namespace for the baseline losses; see the module docstring for the definitions."""

    @staticmethod
    def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (per-token NLL ``[B, T-1]``, 0 where masked; mask ``[B, T-1]`` bool)."""
        shifted = labels[:, 1:]
        mask = shifted != IGNORE_INDEX
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2),
                              shifted.masked_fill(~mask, 0), reduction="none")
        return nll * mask, mask

    @staticmethod
    def mean_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Token mean over every answer token of the batch (0, still in the graph, if none)."""
        nll, mask = UnlearnLoss.token_nll(logits, labels)
        n = mask.sum()
        return nll.sum() / n if int(n) else logits.sum().float() * 0.0

    @staticmethod
    def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed answer NLL per row, ``[B]`` (NPO's ``s``; not length-normalised, as in
        OpenUnlearning's ``compute_batch_nll``)."""
        nll, _ = UnlearnLoss.token_nll(logits, labels)
        return nll.sum(dim=-1)

    @staticmethod
    def gradient_ascent(forget_logits: torch.Tensor, forget_labels: torch.Tensor
                        ) -> torch.Tensor:
        """GA: minimising ``-NLL_f`` pushes the forget answers' likelihood down."""
        return -UnlearnLoss.mean_nll(forget_logits, forget_labels)

    @staticmethod
    def gradient_difference(forget_logits: torch.Tensor, forget_labels: torch.Tensor,
                            retain_logits: torch.Tensor, retain_labels: torch.Tensor, *,
                            gamma: float = 1.0, alpha: float = 1.0) -> torch.Tensor:
        """GD: GA on the forget batch plus ordinary NLL on a retain batch."""
        return gamma * UnlearnLoss.gradient_ascent(forget_logits, forget_labels) \
            + alpha * UnlearnLoss.mean_nll(retain_logits, retain_labels)

    @staticmethod
    def npo_forget(seq_nll: torch.Tensor, ref_seq_nll: torch.Tensor, *, beta: float = 0.1
                   ) -> torch.Tensor:
        """``-(2/beta) * mean logsigmoid(beta * (s - s_ref))``; ``ref_seq_nll`` is a constant
        (computed once before training), so no gradient flows into it."""
        if beta <= 0:
            raise ValueError(f"NPO beta must be > 0, got {beta}")
        log_ratio = ref_seq_nll.detach().float() - seq_nll.float()  # log p - log p_ref
        return -(2.0 / beta) * F.logsigmoid(-beta * log_ratio).mean()

    @staticmethod
    def npo(forget_logits: torch.Tensor, forget_labels: torch.Tensor,
            ref_seq_nll: torch.Tensor, retain_logits: torch.Tensor | None = None,
            retain_labels: torch.Tensor | None = None, *, beta: float = 0.1,
            gamma: float = 1.0, alpha: float = 1.0) -> torch.Tensor:
        """NPO as OpenUnlearning trains it: ``gamma * L_npo + alpha * NLL_r`` (no retain batch
        or ``alpha = 0``: NPO alone)."""
        loss = gamma * UnlearnLoss.npo_forget(
            UnlearnLoss.sequence_nll(forget_logits, forget_labels), ref_seq_nll, beta=beta)
        if retain_logits is not None and alpha:
            loss = loss + alpha * UnlearnLoss.mean_nll(retain_logits, retain_labels)
        return loss
