"""The last step of a ULD engine step: target + assistant logits -> ULD logits.

The backend is chosen once, at engine start: the fused Triton kernel on CUDA once it exists
(kernel issue), the torch reference ``uld_logits`` elsewhere. ``ULD_BACKEND=torch|triton``
forces one.
"""

from __future__ import annotations

import os

import torch

from uld_vllm.errors import UldError
from uld_vllm.logits import uld_logits


class UldCombiner:
    def __init__(self, settings):
        self.alpha = settings.alpha
        self.filter_ratio = settings.filter_ratio
        self.mode = settings.mode
        self.backend = _pick_backend(os.environ.get("ULD_BACKEND", settings.backend))

    def __call__(self, target_logits: torch.Tensor,
                 assistant_logits: torch.Tensor) -> torch.Tensor:
        return uld_logits(target_logits, assistant_logits, alpha=self.alpha,
                          filter_ratio=self.filter_ratio, mode=self.mode)


def _pick_backend(requested: str) -> str:
    if requested in ("auto", "torch"):
        return "torch"
    if requested == "triton":
        raise UldError("ULD_BACKEND=triton: the fused Triton kernel is not available yet",
                       "unset ULD_BACKEND or set it to 'torch'")
    raise UldError(f"ULD_BACKEND={requested!r} is unknown", "use 'auto', 'torch' or 'triton'")
