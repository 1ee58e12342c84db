"""Prompt formatting, one way for training, generation, evaluation, the demo and benchmarks:
the tokenizer's chat template (one user turn plus the generation prompt) when it has one, else
a ``{question}`` template (default ``"[INST] {question} [/INST]"``, the reference's Llama-2
format). Prompt and answer are tokenised separately, so training masks exactly the prompt.
"""

from __future__ import annotations

from uld_vllm.errors import UldError

DEFAULT_PROMPT_TEMPLATE = "[INST] {question} [/INST]"


class PromptFormatter:
    """Turns a question into prompt token ids the same way for training, demo and decoding.

    ``template=None``: the tokenizer's chat template (one user turn plus the generation
    prompt) when it has one, else ``"[INST] {question} [/INST]"``.
    """

    def __init__(self, tokenizer, template: str | None = None):
        self.tokenizer = tokenizer
        self.use_chat = template is None and bool(getattr(tokenizer, "chat_template", None))
        self.template = template or DEFAULT_PROMPT_TEMPLATE
        if not self.use_chat and "{question}" not in self.template:
            raise UldError(f"prompt template {self.template!r} has no {{question}} field",
                           f"use e.g. {DEFAULT_PROMPT_TEMPLATE!r}")

    @classmethod
    def for_generation(cls, tokenizer, chat: bool, model: str = "the model") -> PromptFormatter:
        """``uld-vllm generate``: the chat template (required) or the prompt text as it is."""
        if not chat:
            return cls(tokenizer, "{question}")
        fmt = cls(tokenizer)
        if not fmt.use_chat:
            raise UldError(f"the tokenizer of {model} has no chat template",
                           "drop --chat-template, or use a chat model")
        return fmt

    @property
    def description(self) -> str:
        return "tokenizer chat template" if self.use_chat else repr(self.template)

    def prompt_text(self, question: str) -> str:
        if self.use_chat:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False,
                add_generation_prompt=True)
        return self.template.replace("{question}", question)

    def encode_prompt(self, question: str | None) -> list[int]:
        if question is None:  # raw document: only what the tokenizer puts in front (BOS)
            return self.tokenizer("", add_special_tokens=True)["input_ids"]
        # chat templates write their own BOS; adding special tokens again would double it
        return self.tokenizer(self.prompt_text(question),
                              add_special_tokens=not self.use_chat)["input_ids"]

    def encode_answer(self, answer: str, question: str | None = None, eos: bool = True):
        text = answer
        if question is not None and not self.prompt_text(question)[-1:].isspace():
            text = " " + answer  # "[INST] q [/INST] answer", as the reference joins them
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        eos_id = self.tokenizer.eos_token_id
        if eos and question is not None and eos_id is not None:
            ids = ids + [eos_id]  # so the memorised answer ends, and greedy decoding stops
        return ids
