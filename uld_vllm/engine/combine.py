"""The last step of a ULD engine step: two hidden states -> ULD logits.

One LM-head GEMM on the stacked ``[target; assistant]`` rows (``[2n, H] x [H, V]``), then the
ULD rule (``uld_vllm.core.logits.uld_logits``): in torch, or in the fused Triton kernel of
``uld_vllm.kernels`` (filter + combine in one pass over both rows). The backend is chosen
once, at engine start, from ``backend`` in ``additional_config["uld"]`` (``_pick_backend``).

Per-request values (``uld_vllm.engine.request_controls``): rows whose requests set their own
``uld_*`` values are grouped by the settings they end up with, and each group runs the code
above with them, so each row is exactly what an engine with those settings computes.
``alpha == 0`` returns the target's own logits, unfiltered: what plain vLLM computes for that
row (whether a request may ask for it is decided before: the request policy in
``uld_vllm.engine.request_controls``).
"""

from __future__ import annotations

import logging

import torch

from uld_vllm.core.logits import uld_logits
from uld_vllm.engine.settings import BACKENDS
from uld_vllm.errors import UldError

# a child of vLLM's logger: its handler, format and level (VLLM_LOGGING_LEVEL)
_log = logging.getLogger("vllm.uld_vllm")

class UldCombiner:
    """Built once per engine from its ``UldSettings``; the backend it chose is logged once."""

    def __init__(self, settings):
        self.alpha = settings.alpha
        self.filter_ratio = settings.filter_ratio
        self.mode = settings.mode
        self.penalty = settings.penalty
        self.gate = tuple(settings.gate) if settings.gate else None
        self.backend = _pick_backend(settings.backend)
        # which path each compute_logits call took (tests and diagnostics read them)
        self.stats = {"combined": 0, "target": 0, "per_request": 0}
        self.description = f"backend {self.backend} (asked: {settings.backend})"
        _log.info("ULD combine: %s", self.description)

    def __call__(self, logits_processor, lm_head, h_t: torch.Tensor, h_a: torch.Tensor,
                 rows: dict[int, dict] | None = None) -> torch.Tensor | None:
        """ULD logits of ``n`` rows; ``rows`` maps a row index to its request's own settings
        (``{"alpha": 0.5, ...}``; the others are the engine's)."""
        groups = self._groups(h_t.shape[0], rows)
        if len(groups) == 1:
            key, _ = groups.popitem()
            return self._combine(logits_processor, lm_head, h_t, h_a, *key)
        out = None
        for key, idx in groups.items():
            ix = torch.tensor(idx, device=h_t.device)
            part = self._combine(logits_processor, lm_head, h_t.index_select(0, ix),
                                 h_a.index_select(0, ix), *key)
            if part is None:  # a rank that does not sample
                return None
            if out is None:
                out = torch.empty((h_t.shape[0], part.shape[1]), dtype=torch.float32,
                                  device=part.device)
            out[ix] = part.float()
        self.stats["per_request"] += 1
        return out

    def _groups(self, n: int, rows) -> dict[tuple, list[int]]:
        """Row indices by ``(alpha, mode, penalty, gate)``."""
        default = {"alpha": float(self.alpha), "mode": self.mode, "penalty": self.penalty,
                   "gate": self.gate}
        if not rows:
            return {tuple(default.values()): list(range(n))}
        groups: dict[tuple, list[int]] = {}
        for i in range(n):
            key = tuple({**default, **rows.get(i, {})}.values())
            groups.setdefault(key, []).append(i)
        return groups

    def _combine(self, logits_processor, lm_head, h_t: torch.Tensor, h_a: torch.Tensor,
                 alpha: float, mode: str, penalty: str, gate) -> torch.Tensor | None:
        if alpha == 0.0:
            self.stats["target"] += 1
            return logits_processor(lm_head, h_t)
        n = h_t.shape[0]
        logits = logits_processor(lm_head, torch.cat([h_t, h_a]))
        if logits is None:  # a rank that does not sample
            return None
        self.stats["combined"] += 1
        kw = dict(alpha=float(alpha), filter_ratio=self.filter_ratio, mode=mode,
                  penalty=penalty, gate=gate)
        if self.backend == "triton":
            from uld_vllm.kernels import uld_combine

            return uld_combine(logits[:n], logits[n:], **kw)
        return uld_logits(logits[:n], logits[n:], **kw)


def _pick_backend(requested: str) -> str:
    """``auto``: the fused Triton kernel on CUDA (when Triton imports), torch elsewhere.

    ``triton`` forced without a GPU runs the kernels in the Triton interpreter, which only
    exists when ``TRITON_INTERPRET=1`` was set before ``uld_vllm.kernels`` was imported.
    """
    if requested not in BACKENDS:
        raise UldError(f"ULD backend {requested!r} is unknown",
                       f"set additional_config['uld']['backend'] to one of {BACKENDS}")
    if requested == "torch" or (requested == "auto" and not torch.cuda.is_available()):
        return "torch"
    try:
        from uld_vllm import kernels
    except ImportError as e:
        if requested == "auto":
            return "torch"
        raise UldError(f"ULD backend triton was asked for but the Triton kernels do not "
                       f"import ({e})", "install triton, or use backend 'torch'") from e
    if requested == "auto":
        return "torch" if kernels.INTERPRETED else "triton"
    if not torch.cuda.is_available() and not kernels.INTERPRETED:
        raise UldError("ULD backend triton needs a CUDA GPU",
                       "set TRITON_INTERPRET=1 before uld_vllm.kernels is imported to run the "
                       "kernels on CPU in the (slow) Triton interpreter, or use backend "
                       "'torch'")
    return "triton"
