"""``uld_vllm.LLM``: vLLM's offline ``LLM`` with a ULD adapter."""

from __future__ import annotations

import os


def LLM(model: str, uld_adapter: str | os.PathLike | None = None, *,
        uld_alpha: float | None = None, uld_filter_ratio: float | None = None,
        uld_mode: str | None = None, uld_request_policy: str | None = None,
        uld_alpha_range: tuple[float, float] | None = None, uld_rule: str | None = None,
        uld_penalty: str | None = None, uld_gate=None, **vllm_kwargs):
    """Build ``vllm.LLM(model, **vllm_kwargs)`` that decodes with ULD.

    Returns vLLM's own ``LLM`` object (so ``generate``, ``chat``, ``SamplingParams``, outputs
    are vLLM's). Without ``uld_adapter`` it is plain vLLM. Equivalent plain-vLLM form (with
    ``VLLM_USE_V2_MODEL_RUNNER=0`` in the environment while it is built; this function sets it
    for that moment only)::

        vllm.LLM(model, hf_overrides={"architectures": ["UldLlamaForCausalLM"]},
                 additional_config={"uld": {"adapter": DIR, "alpha": A, "filter_ratio": R}},
                 logits_processors=["uld_vllm.engine.request_controls:UldRequestControls"],
                 worker_extension_cls="uld_vllm.engine.worker.UldWorkerExtension")

    Other engine settings go in ``additional_config={"uld": {...}}`` (e.g. ``"backend":
    "torch"``); the arguments above win over the same keys there. Per request:
    ``SamplingParams(extra_args={"uld_alpha": 0.5, "uld_mode": "generate"})``.

    The decoding rule: ``uld_penalty`` (``"above_uniform"`` or ``"logit"``), ``uld_gate``
    (``(low, high)`` or ``"off"``), or ``uld_rule="reference"`` (the paper's rule); each left
    out is the adapter's (``uld_config.json``).

    The caller of this function owns the engine, so its requests may ask for anything
    (request policy ``any``, the target's own distribution included) unless
    ``uld_request_policy`` says otherwise: ``"strengthen"`` or ``"fixed"`` with an optional
    ``uld_alpha_range=(MIN, MAX)``, as ``--uld-request-policy``/``--uld-alpha-range`` do for
    a server. A refused request raises vLLM's ``VLLMValidationError``.
    """
    import vllm

    from uld_vllm.core.models import resolve_model

    model = resolve_model(model)
    if uld_adapter is None:
        return vllm.LLM(model, **vllm_kwargs)
    from uld_vllm.engine.settings import (
        UNSET,
        WORKER_EXTENSION,
        check_engine_options,
        engine_overrides,
        parse_gate,
        rule_settings,
        v1_model_runner,
        with_request_controls,
    )

    check_engine_options(**{k: vllm_kwargs[k] for k in (
        "enable_lora", "speculative_config", "pipeline_parallel_size",
        "enable_batch_sharded_sampling") if k in vllm_kwargs})
    vllm_kwargs["logits_processors"] = with_request_controls(
        vllm_kwargs.get("logits_processors"))
    # kept when the caller brings its own: set_uld_mode then says what is missing
    vllm_kwargs.setdefault("worker_extension_cls", WORKER_EXTENSION)
    additional = vllm_kwargs.pop("additional_config", None)
    if uld_request_policy is None and "request_policy" not in ((additional or {}).get("uld")
                                                               or {}):
        uld_request_policy = "any"
    hf, extra = engine_overrides(
        model, uld_adapter, alpha=uld_alpha, filter_ratio=uld_filter_ratio, mode=uld_mode,
        request_policy=uld_request_policy, alpha_range=uld_alpha_range,
        rule=rule_settings(uld_rule, uld_penalty,
                           UNSET if uld_gate is None else parse_gate(uld_gate)),
        hf_overrides=vllm_kwargs.pop("hf_overrides", None),
        additional_config=additional,
        revision=vllm_kwargs.get("revision"),
        trust_remote_code=vllm_kwargs.get("trust_remote_code", False))
    vllm_kwargs.update(hf_overrides=hf, additional_config=extra)
    with v1_model_runner():
        return vllm.LLM(model, **vllm_kwargs)
