"""From examples to batches: prompt formatting, tokenisation with prompt masking, the
forget/retain interleaving of the reference, and right-padding collation.

A tokenised row is ``{"input_ids": [...], "labels": [...], "is_retain": bool}``; ``labels`` is
``-100`` on prompt tokens, so ``L_f`` only scores answers. Prompt and answer are tokenised
separately and concatenated, so the mask is exact for any tokenizer (no re-tokenisation of
the joined string, whose first answer token could merge with the prompt's last one).

A retain row that perturbs a forget answer (``Example.forget_answer``) gets no label on the
positions whose context it shares with that forget row: the first ``n + 1`` answer tokens,
where ``n`` is the length of their common token prefix (the position predicting the first
differing token still reads the shared context).
"""

from __future__ import annotations

import torch

from uld_vllm.core.prompts import PromptFormatter
from uld_vllm.train.data import Example
from uld_vllm.train.loss import IGNORE_INDEX


def encode_example(example: Example, formatter: PromptFormatter, max_length: int,
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
    masked = len(prompt)
    if is_retain and example.forget_answer is not None:
        masked += min(len(answer), 1 + shared_prefix(
            answer, formatter.encode_answer(example.forget_answer, example.prompt)))
    labels = ([IGNORE_INDEX] * masked + (prompt + answer)[masked:])[:max_length]
    return [{"input_ids": ids, "labels": labels, "is_retain": is_retain,
             "truncated": len(prompt) + len(answer) > max_length,
             "shared": masked - len(prompt)}]


def shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class UldDataset(torch.utils.data.Dataset):
    """Forget rows at indices ``[0, n_forget)``, retain rows after them."""

    def __init__(self, forget: list[Example], retain: list[Example],
                 formatter: PromptFormatter, max_length: int):
        f_rows = [r for e in forget for r in encode_example(e, formatter, max_length, False)]
        r_rows = [r for e in retain for r in encode_example(e, formatter, max_length, True)]
        self.rows = f_rows + r_rows
        self.n_forget, self.n_retain = len(f_rows), len(r_rows)
        self.truncated = sum(bool(r.get("truncated")) for r in self.rows)
        # answer tokens a wrong answer shares with its forget row's context (no L_r there)
        self.shared_prefix_tokens = sum(r.get("shared", 0) for r in self.rows)

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

    With ``balance``, the smaller side is repeated (each repetition reshuffled) up to the size
    of the larger one first, so a large retain set does not dilute the forget rows to a few
    per batch. The order depends only on (seed, epoch), so a resumed run sees the same batches.
    """

    def __init__(self, n_forget: int, n_retain: int, seed: int, balance: bool = False):
        self.n_forget, self.n_retain, self.seed = n_forget, n_retain, seed
        self.balance = balance and n_forget > 0 and n_retain > 0
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _side(self, n: int, offset: int, size: int, g: torch.Generator) -> list[int]:
        out: list[int] = []
        while len(out) < size:
            out += (torch.randperm(n, generator=g) + offset).tolist()
        return out[:size]

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        nf, nr = (max(self.n_forget, self.n_retain),) * 2 if self.balance else \
            (self.n_forget, self.n_retain)
        forget = self._side(self.n_forget, 0, nf, g) if self.n_forget else []
        retain = self._side(self.n_retain, self.n_forget, nr, g) if self.n_retain else []
        return iter(balanced_interleave(forget, retain))

    def __len__(self) -> int:
        if self.balance:
            return 2 * max(self.n_forget, self.n_retain)
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
