"""vLLM plugin entry point (``vllm.general_plugins``: ``uld = uld_vllm.plugin:register``).

vLLM calls ``register()`` in every process it starts (API server, engine core, workers), so it
must be cheap and idempotent: it only records ``"module:Class"`` strings in vLLM's model
registry, and the model code is imported when an engine actually builds a ULD model.
"""

from __future__ import annotations

# vLLM architecture name -> "module:Class" of its ULD variant.
ULD_ARCHITECTURES: dict[str, str] = {}

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for arch, target in ULD_ARCHITECTURES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)
    _registered = True
