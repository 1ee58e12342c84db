"""Build the ULD assistant from a loaded HF target, sharing its tensors.

The assistant is the target's first K decoder layers plus its embeddings, final norm and LM
head. Its modules are new objects (so PEFT can wrap the assistant's linears without touching
the target's), but every parameter *is* the target's tensor: no weight is copied, and the
frozen parts stay bit-identical to the target by construction.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from uld_vllm.core.adapter import LORA_MODULES, UldAdapter, config_fingerprint
from uld_vllm.errors import UldError


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UldError(f"{type(model).__name__} has no model.layers",
                       "ULD supports Llama, Mistral and Qwen2-style decoder-only models")
    return layers


def check_num_layers(num_layers: int, model_layers: int) -> None:
    if not isinstance(num_layers, int) or not 0 < num_layers < model_layers:
        raise UldError(f"the assistant needs 0 < K < {model_layers} layers, got K={num_layers}",
                       f"choose --num-layers between 1 and {model_layers - 1}")


def build_assistant(target: nn.Module, num_layers: int) -> nn.Module:
    """A ``type(target)`` model with ``num_layers`` layers whose tensors are the target's."""
    check_num_layers(num_layers, len(decoder_layers(target)))
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types[:num_layers])
    with torch.device("meta"):
        assistant = type(target)(config)
    for name, _ in list(assistant.named_parameters(remove_duplicate=False)):
        _set(assistant, name, target.get_parameter(name))
    for name, _ in list(assistant.named_buffers(remove_duplicate=False)):
        _set(assistant, name, target.get_buffer(name), buffer=True)
    if hasattr(assistant, "generation_config") and hasattr(target, "generation_config"):
        assistant.generation_config = copy.deepcopy(target.generation_config)
    assistant.eval()
    return assistant


def load_assistant(target: nn.Module, adapter: UldAdapter) -> nn.Module:
    """Build the assistant for ``target`` and put the adapter's LoRA on it (frozen, eval)."""
    from peft import PeftModel

    adapter.check_base(target.config)
    assistant = build_assistant(target, adapter.config.num_layers)
    model = PeftModel.from_pretrained(assistant, str(adapter.path), is_trainable=False)
    model.eval()
    return model


def lora_config(num_layers: int, r: int = 16, alpha: int = 32, dropout: float = 0.05):
    """The ULD LoRA recipe: all seven projections of layers < K, no bias."""
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        bias="none",
        target_modules=list(LORA_MODULES),
        layers_to_transform=list(range(num_layers)),
        layers_pattern="layers",
        task_type="CAUSAL_LM",
    )


def lora_parameter_count(config, num_layers: int, r: int = 16) -> int:
    """Trainable LoRA parameters of K layers, from the config alone (for checks and logs)."""
    h = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = (getattr(config, "num_key_value_heads", None) or config.num_attention_heads) * head_dim
    inter = config.intermediate_size
    shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)]
    return num_layers * sum(r * (i + o) for i, o in shapes)


def _set(root: nn.Module, dotted: str, value: torch.Tensor, buffer: bool = False) -> None:
    *path, leaf = dotted.split(".")
    owner = root
    for part in path:
        owner = getattr(owner, part)
    if buffer:
        persistent = leaf not in getattr(owner, "_non_persistent_buffers_set", set())
        owner.register_buffer(leaf, value, persistent=persistent)
    else:
        owner._parameters[leaf] = value


def save_adapter(peft_model, out_dir, *, base_model: str, target_config, alpha: float = 1.0,
                 filter_ratio: float = 0.1, overwrite: bool = False, extra_files=None,
                 training: dict | None = None):
    """Write the adapter folder atomically (PEFT files + uld_config.json) and re-validate it.

    ``extra_files`` maps file names to text written beside them (e.g. ``train_log.json``).
    """
    import json

    from uld_vllm.core.adapter import (
        PEFT_CONFIG_NAME,
        UldConfig,
        atomic_output_dir,
        load_adapter,
        write_uld_config,
    )

    num_layers = len(decoder_layers(peft_model.get_base_model()))
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        peft_model.save_pretrained(str(tmp))
        peft_cfg_path = tmp / PEFT_CONFIG_NAME
        peft_cfg = json.loads(peft_cfg_path.read_text())
        peft_cfg["base_model_name_or_path"] = str(base_model)
        peft_cfg_path.write_text(json.dumps(peft_cfg, indent=2, sort_keys=True) + "\n")
        write_uld_config(tmp, UldConfig(
            base_model=str(base_model),
            base_fingerprint=config_fingerprint(target_config),
            num_layers=num_layers,
            base_num_layers=target_config.num_hidden_layers,
            alpha=float(alpha),
            filter_ratio=float(filter_ratio),
            base_architecture=(target_config.architectures or [""])[0],
            training=training,
        ))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        load_adapter(tmp)
    return load_adapter(out_dir)
