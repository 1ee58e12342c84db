"""The ULD training objective, on plain tensors (no model, no Trainer), so it can be tested alone.

``L = L_f + beta * L_r``:

* ``L_f``: causal-LM cross-entropy on the answer tokens of the *forget* rows (labels ``-100``
  mark prompt and padding tokens), averaged over those tokens. The assistant learns to
  *remember* what the target must forget.
* ``L_r``: ``KL(U || p)`` between the uniform distribution over the vocabulary and the
  assistant's next-token distribution, on the *retain* rows, averaged over the positions that
  ``retain_positions`` names:

  - ``"answer"`` (default): the positions that predict an answer token (the forget side's
    positions). Decoding only ever reads the assistant after the prompt (generation, and
    teacher-forced scoring of answers), so this is where it must be uniform; and the LM head
    (49k x 576 for SmolLM2, as costly as 8 layers) then runs on ~1/4 of the positions.
  - ``"tokens"``: every non-padding position (``attention_mask == 1``), prompt included.
  - ``"all"``: every position, padding included (the reference implementation's variant, so it
    depends on how much padding a batch happens to carry).

A side absent from a batch contributes exactly 0 (and no gradient), as in the reference.

``select_positions`` says which positions' logits the loss needs; ``from_selected`` computes the
loss from the logits of only those positions (what the trainer does: the LM head runs on
``[N, H]`` selected hidden states, not on ``[B, T, H]``). ``compute`` is both in one call on
full ``[B, T, V]`` logits.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
RETAIN_POSITIONS = ("answer", "tokens", "all")


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
                all_positions: bool = False,
                retain_positions: str | None = None) -> UldLossOutput:
        """``L_f + retain_weight * L_r`` for one batch.

        Shapes: ``logits`` ``[B, T, V]`` (any float dtype; computed in float32), ``labels``
        ``[B, T]`` int (the input ids with prompt and padding set to ``-100``; the usual
        causal shift is done here: position ``t`` predicts ``labels[:, t + 1]``),
        ``attention_mask`` ``[B, T]`` (1 = real token, 0 = padding), ``is_retain`` ``[B]``
        bool (True = retain row, False = forget row). Returns scalars. ``retain_positions``
        defaults to ``"all"`` if ``all_positions`` else ``"tokens"`` (this function's
        historical semantics); the trainer passes its configured value.
        """
        where = retain_positions or ("all" if all_positions else "tokens")
        sel, targets, retain_pos = UldLoss.select_positions(labels, attention_mask, is_retain,
                                                            where)
        return UldLoss.from_selected(logits[sel], targets[sel], retain_pos[sel],
                                     retain_weight=retain_weight, anchor=logits)

    @staticmethod
    def select_positions(labels: torch.Tensor, attention_mask: torch.Tensor,
                         is_retain: torch.Tensor, retain_positions: str = "answer"):
        """-> (``sel`` [B, T] bool: positions whose logits the loss reads, ``targets`` [B, T]
        long: the next token at forget positions, ``-100`` elsewhere, ``retain`` [B, T] bool:
        the position belongs to a retain row)."""
        if retain_positions not in RETAIN_POSITIONS:
            raise ValueError(f"retain_positions must be one of {RETAIN_POSITIONS}, "
                             f"got {retain_positions!r}")
        B, T = labels.shape
        nxt = torch.full_like(labels, IGNORE_INDEX)
        nxt[:, :-1] = labels[:, 1:]
        answer = nxt != IGNORE_INDEX
        row_retain = is_retain.to(torch.bool).view(B, 1).expand(B, T)
        if retain_positions == "answer":
            r_sel = answer
        elif retain_positions == "tokens":
            r_sel = attention_mask.bool()
        else:
            r_sel = torch.ones_like(answer)
        sel = torch.where(row_retain, r_sel, answer)
        targets = torch.where(row_retain, torch.full_like(nxt, IGNORE_INDEX), nxt)
        return sel, targets, row_retain

    @staticmethod
    def from_selected(logits: torch.Tensor, targets: torch.Tensor, is_retain: torch.Tensor, *,
                      retain_weight: float = 5.0,
                      anchor: torch.Tensor | None = None) -> UldLossOutput:
        """The loss from the logits of the selected positions only: ``logits`` ``[N, V]``,
        ``targets`` ``[N]`` (next token at forget positions), ``is_retain`` ``[N]`` bool.
        ``anchor`` (default ``logits``) keeps a side's zero connected to the graph."""
        anchor = logits if anchor is None else anchor
        zero = anchor.sum().float() * 0.0
        forget_rows = ~is_retain
        if bool(forget_rows.any()):
            forget = F.cross_entropy(logits[forget_rows].float(), targets[forget_rows])
        else:
            forget = zero
        if bool(is_retain.any()):
            retain = UldLoss.kl_to_uniform(logits[is_retain]).mean()
        else:
            retain = zero
        return UldLossOutput(loss=forget + retain_weight * retain, forget=forget, retain=retain)

    @staticmethod
    def kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
        """``KL(U || softmax(logits))`` per row of ``[..., V]``:
        ``sum_v (1/V) (log(1/V) - log p_v) = logsumexp(z) - mean(z) - log V``, 0 exactly when
        ``p`` is uniform (no full log-softmax tensor is materialised)."""
        z = logits.float()
        return torch.logsumexp(z, dim=-1) - z.mean(dim=-1) - math.log(z.shape[-1])

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
        """Mean over positions of ``KL(U || softmax(logits))``; ``logits [B, T, V]``, over
        non-padding positions (or every position with ``all_positions``)."""
        if logits.shape[0] == 0:
            return logits.sum().float() * 0.0
        kl = UldLoss.kl_to_uniform(logits)  # [B, T]
        if all_positions:
            return kl.mean()
        mask = attention_mask.to(kl.dtype)
        n = mask.sum()
        if float(n) == 0.0:
            return logits.sum().float() * 0.0
        return (kl * mask).sum() / n
