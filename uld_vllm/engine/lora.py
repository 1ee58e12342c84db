"""LoRA deltas of the assistant's K layers, as vLLM parallel linear layers.

For a base projection ``W`` (shared with the target) the assistant computes
``W x + s * B (A x)`` with ``s = lora_alpha / r`` (``/ sqrt(r)`` for rsLoRA), folded into B at
load time. Sharding follows the base layer, so tensor parallelism splits the assistant exactly
like the target:

* column-parallel bases (q/k/v, gate/up): A replicated, B column-parallel (output rows of the
  local heads / intermediate slice);
* row-parallel bases (o, down): A row-parallel (input columns of the local shard, all-reduced
  ``[T, r]``), B replicated.

Every parameter here is a LoRA parameter: the module adds LoRA bytes and nothing else.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from uld_vllm.core.adapter import LORA_KEY, LORA_MODULES
from uld_vllm.errors import UldError


def _linear(kind: str, n_in: int, n_out: int, prefix: str):
    from vllm.model_executor.layers import linear

    cls = {"rep": linear.ReplicatedLinear, "col": linear.ColumnParallelLinear,
           "row": linear.RowParallelLinear}[kind]
    return cls(n_in, n_out, bias=False, quant_config=None, prefix=prefix, return_bias=False)


class LoRALayer(nn.Module):
    """The seven LoRA deltas of one assistant layer."""

    def __init__(self, *, hidden: int, q_size: int, kv_size: int, intermediate: int, rank: int,
                 prefix: str):
        super().__init__()
        self.rank = rank
        self.qkv_a = _linear("rep", hidden, 3 * rank, f"{prefix}.qkv_a")
        self.q_b = _linear("col", rank, q_size, f"{prefix}.q_b")
        self.k_b = _linear("col", rank, kv_size, f"{prefix}.k_b")
        self.v_b = _linear("col", rank, kv_size, f"{prefix}.v_b")
        self.o_a = _linear("row", q_size, rank, f"{prefix}.o_a")
        self.o_b = _linear("rep", rank, hidden, f"{prefix}.o_b")
        self.gate_up_a = _linear("rep", hidden, 2 * rank, f"{prefix}.gate_up_a")
        self.gate_b = _linear("col", rank, intermediate, f"{prefix}.gate_b")
        self.up_b = _linear("col", rank, intermediate, f"{prefix}.up_b")
        self.down_a = _linear("row", intermediate, rank, f"{prefix}.down_a")
        self.down_b = _linear("rep", rank, hidden, f"{prefix}.down_b")

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        r = self.rank
        u = self.qkv_a(x)
        return torch.cat([self.q_b(u[:, :r].contiguous()), self.k_b(u[:, r:2 * r].contiguous()),
                          self.v_b(u[:, 2 * r:].contiguous())], dim=-1)

    def o(self, x: torch.Tensor) -> torch.Tensor:
        return self.o_b(self.o_a(x))

    def gate_up(self, x: torch.Tensor) -> torch.Tensor:
        r = self.rank
        u = self.gate_up_a(x)
        return torch.cat([self.gate_b(u[:, :r].contiguous()),
                          self.up_b(u[:, r:].contiguous())], dim=-1)

    def down(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_b(self.down_a(x))


def read_lora_settings(adapter_dir: str | Path) -> tuple[int, float]:
    """(rank, scale) from adapter_config.json; refuses LoRA variants the engine cannot run."""
    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    for key in ("use_dora", "rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise UldError(f"adapter {adapter_dir} uses {key}, which the ULD engine does not "
                           "support", "train a plain LoRA adapter with `uld-vllm train`")
    if cfg.get("bias", "none") != "none":
        raise UldError(f"adapter {adapter_dir} trains biases (bias={cfg['bias']!r})",
                       "ULD adapters use bias='none'")
    r = int(cfg["r"])
    alpha = float(cfg.get("lora_alpha", r))
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return r, scale


def lora_tensors(weights_file: Path) -> dict[tuple[int, str, str], torch.Tensor]:
    """{(layer, module, 'A'|'B'): tensor} from a PEFT adapter file."""
    from safetensors.torch import load_file

    out = {}
    for key, t in load_file(str(weights_file)).items():
        m = LORA_KEY.search(key)
        if m is None or m.group(3) not in LORA_MODULES:
            raise UldError(f"{weights_file} has LoRA weights on an unexpected module ({key})",
                           f"ULD adapters may only adapt {', '.join(LORA_MODULES)}")
        out[(int(m.group(1)), m.group(3), m.group(4))] = t
    return out


def load_lora_layer(layer: LoRALayer, idx: int, tensors: dict, scale: float,
                    prefix: str) -> set[str]:
    """Feed layer ``idx``'s tensors through vLLM's weight loaders; returns loaded names.

    A projection the adapter does not adapt gets zeros (no delta) rather than garbage.
    """
    r = layer.rank

    def get(module: str, ab: str, shape: tuple[int, int]) -> torch.Tensor:
        t = tensors.get((idx, module, ab))
        if t is None:
            return torch.zeros(shape)
        if t.shape[1 if ab == "B" else 0] != r:
            raise UldError(f"LoRA {module}.{ab} of layer {idx} has rank {tuple(t.shape)}, not "
                           f"r={r}", "the adapter files are inconsistent; re-export the adapter")
        return t.float() * (scale if ab == "B" else 1.0)

    def full(mod: nn.Module, along: int) -> int:
        # output (0) or input (1) size of the *unsharded* layer, for zero fills
        if along == 0:
            return getattr(mod, "output_size", mod.weight.shape[0])
        return getattr(mod, "input_size", mod.weight.shape[1])

    hidden = full(layer.qkv_a, 1)
    plan = {
        "qkv_a": torch.cat([get(m, "A", (r, hidden)) for m in ("q_proj", "k_proj", "v_proj")]),
        "q_b": get("q_proj", "B", (full(layer.q_b, 0), r)),
        "k_b": get("k_proj", "B", (full(layer.k_b, 0), r)),
        "v_b": get("v_proj", "B", (full(layer.v_b, 0), r)),
        "o_a": get("o_proj", "A", (r, full(layer.o_a, 1))),
        "o_b": get("o_proj", "B", (hidden, r)),
        "gate_up_a": torch.cat([get(m, "A", (r, hidden)) for m in ("gate_proj", "up_proj")]),
        "gate_b": get("gate_proj", "B", (full(layer.gate_b, 0), r)),
        "up_b": get("up_proj", "B", (full(layer.up_b, 0), r)),
        "down_a": get("down_proj", "A", (r, full(layer.down_a, 1))),
        "down_b": get("down_proj", "B", (hidden, r)),
    }
    loaded = set()
    for name, tensor in plan.items():
        param = getattr(layer, name).weight
        param.weight_loader(param, tensor.to(param.dtype))
        loaded.add(f"{prefix}.{name}.weight")
    return loaded
