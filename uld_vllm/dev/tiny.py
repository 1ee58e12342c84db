"""Random tiny models (and random adapters) built locally, for tests, demos and benchmarks.

No hub is needed: the tokenizer is a byte-level BPE trained in memory on a small built-in
corpus (or a given text file), the weights come from a seeded random init. The result is an
ordinary HF folder that transformers and vLLM both load. Same arguments + seed => same files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from uld_vllm.errors import UldError

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
}
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")

_SUBJECTS = ("The author", "A quiet librarian", "Her father", "The young poet", "An old sailor",
             "The committee", "Every reader", "The city of Lisbon", "His first novel", "The river")
_VERBS = ("wrote about", "was born near", "dreamed of", "won an award for", "often described",
          "never forgot", "studied", "grew up beside", "published a book on", "returned to")
_OBJECTS = ("the northern sea", "a forgotten war", "mountain villages", "her mother's garden",
            "the history of science", "quiet winter mornings", "a family of musicians",
            "the streets of Cairo", "an unfinished symphony", "the art of translation")


def builtin_corpus() -> list[str]:
    """A deterministic few hundred sentences of plain English for tokenizer training."""
    lines = []
    for i, s in enumerate(_SUBJECTS):
        for j, v in enumerate(_VERBS):
            o = _OBJECTS[(i * 7 + j * 3) % len(_OBJECTS)]
            lines.append(f"{s} {v} {o} in {1900 + 7 * i + j}.")
            lines.append(f"Question: What did {s.lower()} do? Answer: {s} {v} {o}.")
    lines += [str(n) for n in range(200)]
    return lines


def train_tokenizer(vocab_size: int, corpus: list[str]):
    """Byte-level BPE trained in memory; padded with reserved tokens up to ``vocab_size``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    # A model vocab larger than what a small corpus yields is normal (benchmarks use 32000):
    # reserve the rest as plain vocab entries so every id the model can emit decodes.
    state = json.loads(tok.to_str())
    vocab = state["model"]["vocab"]
    for i in range(len(vocab), vocab_size):
        vocab[f"<|reserved_{i}|>"] = i
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in state["model"]["merges"]]
    padded = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    padded.pre_tokenizer = tok.pre_tokenizer
    padded.decoder = tok.decoder
    padded.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=padded, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>", model_max_length=4096, clean_up_tokenization_spaces=False,
    )


def make_tiny_model(
    out_dir: str | os.PathLike,
    *,
    arch: str = "llama",
    layers: int = 4,
    hidden: int = 128,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    vocab: int = 1024,
    tie_embeddings: bool | None = None,
    seed: int = 0,
    init_std: float = 0.02,
    max_positions: int = 2048,
    corpus_file: str | os.PathLike | None = None,
    chat_template: str | None = None,
) -> Path:
    """Write a random ``arch`` model with a trained BPE tokenizer to ``out_dir``."""
    import torch
    import transformers

    if arch not in ARCHS:
        raise UldError(f"unknown architecture {arch!r}", f"choose one of {', '.join(ARCHS)}")
    kv_heads = kv_heads or heads
    if hidden % heads or heads % kv_heads:
        raise UldError(f"hidden={hidden}, heads={heads}, kv_heads={kv_heads} do not divide",
                       "hidden must be a multiple of heads and heads a multiple of kv_heads")
    if vocab < 300:
        raise UldError(f"vocab={vocab} is too small", "byte-level BPE needs --vocab >= 300")
    if corpus_file is not None:
        corpus = [ln for ln in Path(corpus_file).read_text().splitlines() if ln.strip()]
        if not corpus:
            raise UldError(f"corpus file {corpus_file} is empty", "pass a text file with content")
    else:
        corpus = builtin_corpus()
    tokenizer = train_tokenizer(vocab, corpus)
    if chat_template:
        tokenizer.chat_template = chat_template

    config_cls = getattr(transformers, ARCHS[arch][0])
    extra = {"use_sliding_window": False} if arch == "qwen2" else {}
    if arch == "mistral":
        extra["sliding_window"] = None
    config = config_cls(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or 3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        initializer_range=init_std,
        tie_word_embeddings=(arch == "qwen2") if tie_embeddings is None else tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )
    config.architectures = [ARCHS[arch][1]]
    torch.manual_seed(seed)
    model = getattr(transformers, ARCHS[arch][1])(config).to(torch.float32).eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def make_random_adapter(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    num_layers: int = 1,
    rank: int = 16,
    seed: int = 0,
    scale: float = 0.05,
    alpha: float = 1.0,
    filter_ratio: float = 0.1,
    overwrite: bool = False,
):
    """A ULD adapter with random, non-zero LoRA A *and* B (so it changes the assistant).

    For tests and demos before any training; ``uld-vllm train`` makes real ones.
    """
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from uld_vllm.core.assistant import build_assistant, check_num_layers, lora_config, save_adapter

    check_num_layers(num_layers, AutoConfig.from_pretrained(model_dir).num_hidden_layers)
    target = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assistant = build_assistant(target, num_layers)
    peft_model = get_peft_model(assistant, lora_config(num_layers, r=rank))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return save_adapter(peft_model, out_dir, base_model=str(model_dir),
                        target_config=target.config, alpha=alpha, filter_ratio=filter_ratio,
                        overwrite=overwrite)
