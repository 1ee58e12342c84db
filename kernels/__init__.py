"""Triton kernels for ULD decoding, importable as ``uld_vllm.kernels``.

One op per file (kernel, launcher, Python entry), as the kernel issue describes; the torch
reference for every op is ``uld_vllm.logits.uld_logits``.
"""
