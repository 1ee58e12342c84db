"""Read-only views of a running ULD engine, for tests and diagnostics.

Use with ``llm.apply_model(model_summary)`` / ``llm.collective_rpc(kv_cache_groups)`` (vLLM
needs ``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` to ship these functions to its workers).
"""

from __future__ import annotations


def kv_cache_groups(worker) -> list[dict]:
    """The worker's KV-cache groups: layer names and spec type."""
    cfg = worker.model_runner.kv_cache_config
    return [{"layers": list(g.layer_names), "spec": type(g.kv_cache_spec).__name__}
            for g in cfg.kv_cache_groups]


def _weight_numel(module, *, stored: bool) -> int:
    # CPU linears drop .weight after repacking it; the shard sizes are kept as attributes.
    n_in = getattr(module, "input_size_per_partition", module.input_size)
    n_out = getattr(module, "output_size_per_partition", module.output_size)
    # a fused LoRA B is block-diagonal: each output row holds r of its n_blocks * r inputs
    blocks = 1 if stored else len(getattr(module, "output_sizes", [None]))
    return int(n_in) * int(n_out) // blocks


def model_summary(model) -> dict:
    """Parameter names, LoRA sizes and whether assistant layers reuse the target's modules."""
    from vllm.model_executor.layers.linear import LinearBase

    names = sorted(n for n, _ in model.named_parameters())
    summary = {"param_names": names, "uld_param_names": [], "uld_lora_numel": 0,
               "uld_stored_numel": 0, "shares_target_layers": None, "uld_attention_layers": []}
    uld_layers = getattr(model, "uld_layers", None)
    if uld_layers is None:
        return summary
    summary["uld_param_names"] = [n for n in names if n.startswith("uld_layers.")]
    linears = [m for m in uld_layers.modules() if isinstance(m, LinearBase)]
    # the adapter's values, and what the engine holds (plus the fused B's zero blocks)
    summary["uld_lora_numel"] = sum(_weight_numel(m, stored=False) for m in linears)
    summary["uld_stored_numel"] = sum(_weight_numel(m, stored=True) for m in linears)
    summary["shares_target_layers"] = all(
        layer._base[0] is model.model.layers[i] for i, layer in enumerate(uld_layers.values()))
    summary["uld_attention_layers"] = [layer.attn.layer_name for layer in uld_layers.values()]
    return summary


def combiner_stats(model) -> dict:
    """How many compute_logits calls combined both streams, served the target alone
    (alpha 0), or split the batch by per-request values."""
    return dict(model.uld_combiner.stats)
