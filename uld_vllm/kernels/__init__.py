"""Triton kernels for ULD decoding, importable as ``uld_vllm.kernels``.

One op per file (kernel, launcher, Python entry), as the kernel issue describes; the torch
reference for every op is ``uld_vllm.core.logits.uld_logits``. Each op has two launch variants with
the same result, one program per row or several per row (split-row), chosen by shape
(``split_plan``); ``LAUNCHES`` counts which ran.
"""

from ._utils import LAUNCHES, interpreted, split_plan
from .uld_combine import _uld_filter_kernel, uld_combine
from .uld_sample import uld_sample

# TRITON_INTERPRET is read when the kernels are decorated, i.e. at this import
INTERPRETED = interpreted(_uld_filter_kernel)

__all__ = ["INTERPRETED", "LAUNCHES", "split_plan", "uld_combine", "uld_sample"]
