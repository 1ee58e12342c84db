"""ULD model classes for vLLM: target + LoRA assistant in one model, one batch, one KV cache.

Layout inside one vLLM model (N target layers, K assistant layers):

* the assistant's layer ``i < K`` reuses target layer ``i``'s modules (norms, q/k/v/o,
  gate/up/down, rotary) and adds only a LoRA delta and its own ``Attention`` named
  ``uld_layers.{N+i}.attn``. That attention has the same KV spec as the target's, so vLLM puts
  all N+K layers in one KV-cache group: one block table, one slot mapping, one scheduler entry
  per request; prefix caching and chunked prefill work unchanged;
* for layers ``< K`` each base GEMM sees the two streams stacked along the token axis
  (``[target; assistant]``, ``2T`` rows), so every base weight is read once per step; the LoRA
  delta goes to the assistant rows only, and the elementwise ops (norms, rotary, activation)
  run on each stream's own tensor. Layer 0's q/k/v projection is computed once: both streams
  start from the same embeddings;
* ``forward`` returns ``[T, 2H]`` (target and assistant final hidden states side by side) so the
  runner's row selection (``hidden_states[logits_indices]``) keeps both streams aligned;
* ``compute_logits`` runs the shared LM head once on ``[2n, H]`` and returns the ULD
  distribution (``uld_logits``, generation semantics by default); vLLM's sampler then applies
  temperature / top-p / top-k / seeds / logprobs to it unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from uld_vllm.engine.combine import UldCombiner
from uld_vllm.engine.lora import LoRALayer, load_lora_layer, lora_tensors, read_lora_settings
from uld_vllm.engine.settings import UldSettings
from uld_vllm.errors import UldError

# a child of vLLM's logger: its handler, format and level (VLLM_LOGGING_LEVEL)
_log = logging.getLogger("vllm.uld_vllm")


class UldAssistantLayer(nn.Module):
    """Assistant layer ``i``: target layer ``i``'s base modules + LoRA + its own KV cache."""

    def __init__(self, vllm_config, base_layer: nn.Module, rank: int, prefix: str):
        super().__init__()
        from vllm.distributed import get_tensor_model_parallel_world_size
        from vllm.model_executor.layers.attention import Attention

        # A tuple keeps the shared modules out of this module's children: their weights stay
        # registered (and loaded, and counted) once, under the target's names.
        self._base = (base_layer,)
        sa = base_layer.self_attn
        config = vllm_config.model_config.hf_config
        tp = get_tensor_model_parallel_world_size()
        if sa.total_num_kv_heads < tp:
            raise UldError(f"tensor_parallel_size={tp} exceeds the model's "
                           f"{sa.total_num_kv_heads} KV heads, which ULD cannot shard",
                           f"use tensor_parallel_size <= {sa.total_num_kv_heads}")
        self.lora = LoRALayer(
            hidden=config.hidden_size,
            q_size=sa.total_num_heads * sa.head_dim,
            kv_size=sa.total_num_kv_heads * sa.head_dim,
            intermediate=config.intermediate_size,
            rank=rank,
            prefix=f"{prefix}.lora",
        )
        t_attn = sa.attn
        self.attn = Attention(
            sa.num_heads, sa.head_dim, sa.scaling,
            num_kv_heads=sa.num_kv_heads,
            cache_config=vllm_config.cache_config,
            quant_config=vllm_config.quant_config,
            per_layer_sliding_window=t_attn.sliding_window,
            prefix=f"{prefix}.attn",
        )

    def forward(self, positions: torch.Tensor, h_t: torch.Tensor, h_a: torch.Tensor,
                res_t: torch.Tensor | None, res_a: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer ``i`` of both streams: ``h_*``/``res_*`` are the target's and the assistant's
        ``[T, H]`` hidden states and residuals (``res_*`` None at layer 0).

        Only the base GEMMs see the stacked ``[target; assistant]`` rows; every elementwise
        op runs on one stream's own tensor (see ``LoRALayer._plus`` for why)."""
        base = self._base[0]
        sa, mlp = base.self_attn, base.mlp
        T = h_t.shape[0]
        if res_t is None:
            # layer 0: both streams start from the same embeddings, so the target's q/k/v
            # projection is the assistant's base one too. The residuals must be two tensors:
            # vLLM's fused add-norm may update its residual in place (maybe_inplace; its
            # CUDA kernel does, the CPU path here does not)
            res_t, res_a = h_t, h_a.clone()
            x = base.input_layernorm(h_t)
            qkv_t, _ = sa.qkv_proj(x)
            qkv_a = self.lora.qkv(qkv_t, x)
        else:
            x_t, res_t = base.input_layernorm(h_t, res_t)
            x_a, res_a = base.input_layernorm(h_a, res_a)
            qkv, _ = sa.qkv_proj(torch.cat([x_t, x_a]))
            qkv_t, qkv_a = qkv[:T], self.lora.qkv(qkv[T:], x_a)
        o_t = self._attend(sa.attn, positions, qkv_t)
        o_a = self._attend(self.attn, positions, qkv_a)
        out, _ = sa.o_proj(torch.cat([o_t, o_a]))

        x_t, res_t = base.post_attention_layernorm(out[:T], res_t)
        x_a, res_a = base.post_attention_layernorm(self.lora.o(out[T:], o_a), res_a)
        gu, _ = mlp.gate_up_proj(torch.cat([x_t, x_a]))
        act_t = mlp.act_fn(gu[:T])
        act_a = mlp.act_fn(self.lora.gate_up(gu[T:], x_a))
        down, _ = mlp.down_proj(torch.cat([act_t, act_a]))
        return down[:T], self.lora.down(down[T:], act_a), res_t, res_a

    def _attend(self, attn: nn.Module, positions: torch.Tensor,
                qkv: torch.Tensor) -> torch.Tensor:
        sa = self._base[0].self_attn
        q, k, v = qkv.split([sa.q_size, sa.kv_size, sa.kv_size], dim=-1)
        if getattr(sa, "qk_norm", False):
            q = sa.q_norm(q.reshape(-1, sa.num_heads, sa.head_dim)).reshape(q.shape)
            k = sa.k_norm(k.reshape(-1, sa.num_kv_heads, sa.head_dim)).reshape(k.shape)
        q, k = sa.rotary_emb(positions, q, k)
        return attn(q, k, v)


def _compiled(cls):
    from vllm.compilation.decorators import support_torch_compile

    # dimension 0 (tokens) varies between steps, as in vLLM's own decoder models; the
    # stacked [target; assistant] rows (2T) derive from it inside the graph
    return support_torch_compile(dynamic_arg_dims={
        "input_ids": {0: "b"}, "positions": {0: "b"}, "inputs_embeds": {0: "b"}})(cls)


@_compiled
class UldForward(nn.Module):
    """The whole ULD forward (stacked assistant layers, the rest of the target, final norm).

    A module of its own under ``support_torch_compile``: the ``*ForCausalLM`` forward that
    runs it is not compiled by vLLM (only its inner ``*Model`` is, and ULD does not call that
    one's forward), so without this ``enforce_eager=False`` would compile nothing of the ULD
    path. With compilation on, vLLM's backend splits this graph at the attention ops
    (piecewise), so CUDA graphs can capture the pieces on GPU. The owner is kept in a tuple so
    its modules stay registered once, under their own names."""

    def __init__(self, *, vllm_config, prefix: str = "", owner=None):
        super().__init__()
        self._owner = (owner,)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        owner = self._owner[0]
        m = owner.model
        h = inputs_embeds if inputs_embeds is not None else m.embed_input_ids(input_ids)
        h_t, h_a, r_t, r_a = h, h, None, None
        for layer in owner.uld_layers.values():
            h_t, h_a, r_t, r_a = layer(positions, h_t, h_a, r_t, r_a)
        for layer in m.layers[owner.uld_num_layers:]:
            h_t, r_t = layer(positions, h_t, r_t)
        normed_t, _ = m.norm(h_t, r_t)
        normed_a, _ = m.norm(h_a, r_a)
        return torch.cat([normed_t, normed_a], dim=-1)


class UldCausalLMMixin:
    """Turns a vLLM ``*ForCausalLM`` (Llama family, Qwen2) into its ULD variant: first in the
    bases, so its ``__init__``, ``forward``, ``compute_logits`` and ``load_weights`` wrap the
    target's."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_uld(vllm_config, prefix)

    def _init_uld(self, vllm_config, prefix: str) -> None:
        from vllm.distributed import get_pp_group
        from vllm.model_executor.models.utils import maybe_prefix

        from uld_vllm.core.adapter import load_adapter
        from uld_vllm.engine.cpu_generators import install_for_this_platform
        from uld_vllm.engine.request_controls import FQCN, controls_for
        from uld_vllm.engine.settings import check_vllm_config

        if get_pp_group().world_size > 1:
            raise UldError("ULD does not support pipeline parallelism",
                           "use tensor parallelism (--tensor-parallel-size) instead")
        # the same refusals as the entry points', for engines built in the plain-vLLM form
        check_vllm_config(vllm_config)
        raw = (vllm_config.additional_config or {}).get("uld")
        if not isinstance(raw, dict) or "adapter" not in raw:
            UldSettings.from_dict(raw)  # raises the one-line error for a missing adapter
        adapter = load_adapter(raw["adapter"])
        self.uld_settings = UldSettings.from_dict(raw, adapter.config)
        # built by the runner before the model, from the same config (see request_controls)
        self.uld_controls = controls_for(vllm_config)
        if self.uld_controls is None:
            raise UldError("a ULD engine needs its per-request logits processor, or uld_* "
                           "request arguments would be ignored",
                           f"pass logits_processors=[{FQCN!r}] (uld_vllm.LLM and "
                           "--uld-adapter add it)")
        # the worker's own check of the request policy (admission checks first)
        self.uld_controls.settings = self.uld_settings
        # seeded requests must not stop a CPU engine (see cpu_generators)
        install_for_this_platform()
        config = vllm_config.model_config.hf_config
        adapter.check_base(config, vllm_config.model_config.model)
        self.uld_adapter = adapter
        self.uld_rank, self.uld_scale = read_lora_settings(adapter)
        n, k = config.num_hidden_layers, adapter.config.num_layers
        self.uld_num_layers = k
        base = maybe_prefix(prefix, "uld_layers")
        # keys N+i give each assistant attention a unique layer index and module path
        self.uld_layers = nn.ModuleDict({
            str(n + i): UldAssistantLayer(vllm_config, self.model.layers[i], self.uld_rank,
                                          prefix=f"{base}.{n + i}")
            for i in range(k)
        })
        self.uld_combiner = UldCombiner(self.uld_settings)
        # a tuple, like the owner inside it: no second registration of any module
        self._uld_forward = (UldForward(vllm_config=vllm_config, prefix=base, owner=self),)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors=None, inputs_embeds: torch.Tensor | None = None,
                **kwargs) -> torch.Tensor:
        return self._uld_forward[0](input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        h = hidden_states.shape[1] // 2
        # per-request (alpha, mode) for the sampled rows; None for prompt log-probs and
        # warm-up calls, which use the engine's settings
        rows = self.uld_controls.take(hidden_states.shape[0])
        return self.uld_combiner(self.logits_processor, self.lm_head,
                                 hidden_states[:, :h].contiguous(),
                                 hidden_states[:, h:].contiguous(), rows)

    # vLLM's vocabulary-sharded logits paths see one logits shard per rank (batch-sharded
    # sampling's compute_logits_local, the drafters' get_top_tokens); ULD's filter needs the
    # whole row, so a filter applied to one shard would be silently wrong. vLLM probes for
    # them with hasattr(), which an AttributeError answers False; every such probe in the
    # installed vLLM is listed in tests/test_guardrails.py, so a new one fails the tests.
    SHARDED_LOGITS_PATHS = ("compute_logits_local", "get_top_tokens")

    @property
    def compute_logits_local(self):
        raise AttributeError("compute_logits_local: ULD needs full-vocabulary logits rows, so "
                             "vocabulary-sharded sampling is refused")

    @property
    def get_top_tokens(self):
        raise AttributeError("get_top_tokens: ULD needs full-vocabulary logits rows, so "
                             "vocabulary-sharded top-token paths are refused")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = super().load_weights(weights)
        tensors = lora_tensors(self.uld_adapter.weights_file)
        for key, layer in self.uld_layers.items():
            i = int(key) - self.config.num_hidden_layers
            loaded |= load_lora_layer(layer.lora, i, tensors, self.uld_scale,
                                      prefix=f"uld_layers.{key}.lora")
        return loaded


class UldLlamaForCausalLM(UldCausalLMMixin, LlamaForCausalLM):
    """Llama with a LoRA ULD assistant on its first K layers."""


class UldMistralForCausalLM(UldCausalLMMixin, MistralForCausalLM):
    """Mistral with a LoRA ULD assistant on its first K layers."""


class UldQwen2ForCausalLM(UldCausalLMMixin, Qwen2ForCausalLM):
    """Qwen2 with a LoRA ULD assistant on its first K layers."""
