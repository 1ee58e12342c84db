"""LoRA deltas of the assistant's K layers, as vLLM parallel linear layers.

For a base projection ``W`` (shared with the target) the assistant computes
``W x + s * B (A x)`` with ``s = lora_alpha / r`` (``/ sqrt(r)`` for rsLoRA), folded into B at
load time. Sharding follows the base layer, so tensor parallelism splits the assistant exactly
like the target:

* column-parallel bases (q/k/v, gate/up): A replicated, B column-parallel (output rows of the
  local heads / intermediate slice);
* the fused bases' B matrices are fused too: q/k/v's three B (``[q, r]``, ``[kv, r]``,
  ``[kv, r]``) are one block-diagonal ``[q + 2 kv, 3 r]`` matrix, sharded per block like
  ``qkv_proj``, so ``B (A x)`` is one GEMM whose output is laid out like ``qkv_proj``'s (no
  slices, copies or concatenation); gate/up likewise. The zero blocks cost ``2 r`` extra
  multiply-adds per output, small next to the base projection's ``hidden`` (r 16: 48 against
  576 for SmolLM2), and save three of a layer's eleven small GEMM calls: on CPU at decode
  sizes each call is dominated by its fixed cost;
* row-parallel bases (o, down): A row-parallel (input columns of the local shard, all-reduced
  ``[T, r]``), B replicated.

Every parameter here is a LoRA parameter: the module adds LoRA bytes and, in the fused B
matrices, their zero blocks (``2 r (q + 2 kv) + 2 r I`` values a layer) and nothing else.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from uld_vllm.core.adapter import LORA_KEY, LORA_MODULES
from uld_vllm.errors import UldError


def _linear(kind: str, n_in: int, n_out: int | list[int], prefix: str):
    from vllm.model_executor.layers import linear

    if kind == "merged":  # n_out: the blocks' output sizes, each sharded on its own
        layer = linear.MergedColumnParallelLinear(n_in, n_out, bias=False, quant_config=None,
                                                  prefix=prefix, return_bias=False)
    else:
        cls = {"rep": linear.ReplicatedLinear, "col": linear.ColumnParallelLinear,
               "row": linear.RowParallelLinear}[kind]
        layer = cls(n_in, n_out, bias=False, quant_config=None, prefix=prefix,
                    return_bias=False)
    return layer


class LoRALayer(nn.Module):
    """The seven LoRA deltas of one assistant layer, as eight GEMMs."""

    def __init__(self, *, hidden: int, q_size: int, kv_size: int, intermediate: int, rank: int,
                 prefix: str):
        super().__init__()
        from vllm.distributed import get_tensor_model_parallel_world_size

        self.rank = rank
        self.qkv_a = _linear("rep", hidden, 3 * rank, f"{prefix}.qkv_a")
        self.qkv_b = _linear("merged", 3 * rank, [q_size, kv_size, kv_size], f"{prefix}.qkv_b")
        self.o_a = _linear("row", q_size, rank, f"{prefix}.o_a")
        self.o_b = _linear("rep", rank, hidden, f"{prefix}.o_b")
        self.gate_up_a = _linear("rep", hidden, 2 * rank, f"{prefix}.gate_up_a")
        self.gate_up_b = _linear("merged", 2 * rank, [intermediate, intermediate],
                                 f"{prefix}.gate_up_b")
        self.down_a = _linear("row", intermediate, rank, f"{prefix}.down_a")
        self.down_b = _linear("rep", rank, hidden, f"{prefix}.down_b")
        # the row-parallel A's (o, down) see one shard of their input: partial sums
        self._reduce_rows = get_tensor_model_parallel_world_size() > 1
        from vllm.platforms import current_platform

        # on CPU vLLM repacks every linear's weight for its CPU GEMM (oneDNN, or what the
        # machine has) and drops the plain copy, the LoRA matrices as well as the base ones
        self._cpu_gemm = current_platform.is_cpu()

    def qkv(self, base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self._plus(base, x, self.qkv_a, self.qkv_b, reduce=False)

    def o(self, base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self._plus(base, x, self.o_a, self.o_b, reduce=self._reduce_rows)

    def gate_up(self, base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self._plus(base, x, self.gate_up_a, self.gate_up_b, reduce=False)

    def down(self, base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self._plus(base, x, self.down_a, self.down_b, reduce=self._reduce_rows)

    def _plus(self, base: torch.Tensor, x: torch.Tensor, a: nn.Module, b: nn.Module,
              reduce: bool) -> torch.Tensor:
        """``base + B (A x)``, a new tensor, on the (local) weights.

        Out of place: ``base`` is the assistant's half of a projection the two streams share,
        and an in-place add into one half of a stacked buffer compiles (inductor, CPU) into
        elementwise kernels that branch per row and load through masks over the whole buffer,
        much slower than the same ops on each half.

        Not through the vLLM modules' ``forward``: at decode sizes its Python layers cost more
        than a rank-r GEMM, and a step makes 32 such deltas at K = 8. On CPU the GEMMs are
        vLLM's (``quant_method.apply``: the repacked oneDNN weight), as for the base layers,
        which ran faster than torch's MKL GEMM on the plain weights (more so in bf16);
        elsewhere one GEMM and one ``addmm``."""
        if self._cpu_gemm:
            h = a.quant_method.apply(a, x)
        else:
            h = torch.mm(x, a.weight.t())
        if reduce:
            from vllm.distributed import tensor_model_parallel_all_reduce

            h = tensor_model_parallel_all_reduce(h)
        if self._cpu_gemm:
            return base + b.quant_method.apply(b, h)
        return torch.addmm(base, h, b.weight.t())


def read_lora_settings(adapter) -> tuple[int, float]:
    """(rank, scale) from a loaded adapter's PEFT config; refuses LoRA variants the engine
    cannot run."""
    cfg, adapter_dir = adapter.peft_config, adapter.path
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

    def block_diagonal(modules: tuple[str, ...], sizes: list[int]) -> torch.Tensor:
        # B of each module in its own (output block, rank block): one GEMM of the fused A's
        # [T, len(modules) * r] output gives every module's delta, concatenated
        out = torch.zeros(sum(sizes), len(modules) * r)
        row = 0
        for j, (m, size) in enumerate(zip(modules, sizes)):
            out[row:row + size, j * r:(j + 1) * r] = get(m, "B", (size, r))
            row += size
        return out

    hidden = full(layer.qkv_a, 1)
    q_kv_kv = list(layer.qkv_b.output_sizes)
    inter = layer.gate_up_b.output_sizes[0]
    plan = {
        "qkv_a": torch.cat([get(m, "A", (r, hidden)) for m in ("q_proj", "k_proj", "v_proj")]),
        "qkv_b": block_diagonal(("q_proj", "k_proj", "v_proj"), q_kv_kv),
        "o_a": get("o_proj", "A", (r, full(layer.o_a, 1))),
        "o_b": get("o_proj", "B", (hidden, r)),
        "gate_up_a": torch.cat([get(m, "A", (r, hidden)) for m in ("gate_proj", "up_proj")]),
        "gate_up_b": block_diagonal(("gate_proj", "up_proj"), [inter, inter]),
        "down_a": get("down_proj", "A", (r, full(layer.down_a, 1))),
        "down_b": get("down_proj", "B", (hidden, r)),
    }
    loaded = set()
    for name, tensor in plan.items():
        param = getattr(layer, name).weight
        param.weight_loader(param, tensor.to(param.dtype))
        loaded.add(f"{prefix}.{name}.weight")
    return loaded
