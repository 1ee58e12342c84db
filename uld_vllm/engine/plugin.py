"""vLLM plugin entry point (``vllm.general_plugins``: ``uld = uld_vllm.engine.plugin:register``).

vLLM calls ``register()`` in every process it starts (API server, engine core, workers), so it
must be cheap and idempotent: it records ``"module:Class"`` strings in vLLM's model registry
(the model code is imported only when an engine builds a ULD model), adds the ``--uld-*``
flags to vLLM's CLI parser and makes the admission of requests check a ULD engine's request
policy (``uld_vllm.engine.admission``; a class-level patch that changes nothing for plain
engines, so every frontend of any engine kind has it before it admits a request).
"""

from __future__ import annotations

from uld_vllm.engine.settings import ULD_ARCHITECTURES

_MODEL_MODULE = "uld_vllm.engine.model"
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for arch in ULD_ARCHITECTURES.values():
        if arch not in supported:
            ModelRegistry.register_model(arch, f"{_MODEL_MODULE}:{arch}")
    from uld_vllm.engine.admission import patch_input_processor
    from uld_vllm.engine.cli_args import patch_engine_args

    patch_engine_args()
    patch_input_processor()
    _registered = True
