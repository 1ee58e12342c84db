"""From examples to batches: prompt formatting, tokenisation with prompt masking, the
forget/retain interleaving of the reference, and right-padding collation.

A tokenised row is ``{"input_ids": [...], "labels": [...], "is_retain": bool}``; ``labels`` is
``-100`` on prompt tokens, so ``L_f`` only scores answers. Prompt and answer are tokenised
separately and concatenated, so the mask is exact for any tokenizer (no re-tokenisation of
the joined string, whose first answer token could merge with the prompt's last one).
"""

from __future__ import annotations

import torch

from uld_vllm.errors import UldError
from uld_vllm.train.config import DEFAULT_PROMPT_TEMPLATE
from uld_vllm.train.data import Example
from uld_vllm.train.loss import IGNORE_INDEX


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


def tokenize(example: Example, formatter: PromptFormatter, max_length: int,
             is_retain: bool) -> list[dict]:
    """One row per question (truncated to ``max_length``); a raw document longer than
    ``max_length`` becomes consecutive ``max_length`` windows, so no text is thrown away."""
    prompt = formatter.encode_prompt(example.prompt)
    answer = formatter.encode_answer(example.response, example.prompt)
    if example.prompt is None:
        ids = prompt + answer
        return [{"input_ids": ids[s:s + max_length], "labels": ids[s:s + max_length],
                 "is_retain": is_retain} for s in range(0, len(ids), max_length)]
    ids = (prompt + answer)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + answer)[:max_length]
    return [{"input_ids": ids, "labels": labels, "is_retain": is_retain,
             "truncated": len(prompt) + len(answer) > max_length}]


class UldDataset(torch.utils.data.Dataset):
    """Forget rows at indices ``[0, n_forget)``, retain rows after them."""

    def __init__(self, forget: list[Example], retain: list[Example],
                 formatter: PromptFormatter, max_length: int):
        f_rows = [r for e in forget for r in tokenize(e, formatter, max_length, False)]
        r_rows = [r for e in retain for r in tokenize(e, formatter, max_length, True)]
        self.rows = f_rows + r_rows
        self.n_forget, self.n_retain = len(f_rows), len(r_rows)
        self.truncated = sum(bool(r.get("truncated")) for r in self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def balanced_interleave(a: list[int], b: list[int]) -> list[int]:
    """Each element of the shorter list followed by round(len_long / len_short) of the longer.

    Unlike the reference (which silently dropped the longer list's tail when the rounding came
    out short), leftover elements of the longer list are appended, so every row is used.
    """
    short, long_ = (a, b) if len(a) <= len(b) else (b, a)
    if not short:
        return list(long_)
    step = round(len(long_) / len(short))
    out, j = [], 0
    for s in short:
        out.append(s)
        out.extend(long_[j:j + step])
        j += step
    out.extend(long_[j:])
    return out


class InterleavedSampler(torch.utils.data.Sampler):
    """Per epoch: shuffle each side (seed + epoch), then ``balanced_interleave`` them.

    The order depends only on (seed, epoch), so a resumed run sees the same batches.
    """

    def __init__(self, n_forget: int, n_retain: int, seed: int):
        self.n_forget, self.n_retain, self.seed = n_forget, n_retain, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        forget = torch.randperm(self.n_forget, generator=g).tolist()
        retain = (torch.randperm(self.n_retain, generator=g) + self.n_forget).tolist()
        return iter(balanced_interleave(forget, retain))

    def __len__(self) -> int:
        return self.n_forget + self.n_retain


class Collator:
    """Right-pads a list of rows into ``input_ids``, ``attention_mask``, ``labels``,
    ``is_retain`` tensors (padding: ``pad_id`` / 0 / -100)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict:
        width = max(len(r["input_ids"]) for r in rows)
        ids, mask, labels = [], [], []
        for r in rows:
            n = len(r["input_ids"])
            ids.append(r["input_ids"] + [self.pad_id] * (width - n))
            mask.append([1] * n + [0] * (width - n))
            labels.append(r["labels"] + [IGNORE_INDEX] * (width - n))
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "is_retain": torch.tensor([bool(r["is_retain"]) for r in rows]),
        }


def pad_id_of(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0
