"""Reference-style ULD decoder on plain transformers: the correctness oracle.

Two models, each with its own KV cache, stepped one after the other, exactly as the original
implementation decodes; the only difference is that the assistant shares the target's tensors
(see ``assistant.py``) and the combination rule is ``uld_logits`` (without the reference's
bugs). Simple and obviously right beats fast here: static left-padded batches, one token per
step, no tricks.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import torch

from uld_vllm.core.logits import uld_logits

Prompt = str | Sequence[int]
_ADAPTERS = object()  # ReferenceDecoder.load's default: the adapter's own gate


@dataclasses.dataclass
class ReferenceOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    # log-prob of each chosen token under the ULD generation distribution, before
    # temperature/top-p (what vLLM reports as sample logprobs with its default settings).
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS) or "length"


class ReferenceDecoder:
    """``target - alpha * assistant`` decoding with two HF models.

    Without an adapter (or with ``alpha=0``) it decodes the target alone through the same loop.
    """

    def __init__(self, target, tokenizer, assistant=None, *, alpha: float = 1.0,
                 filter_ratio: float = 0.1, penalty: str = "logit",
                 gate: tuple[float, float] | None = None):
        self.target = target.eval()
        self.tokenizer = tokenizer
        self.assistant = assistant.eval() if assistant is not None else None
        self.alpha = float(alpha) if assistant is not None else 0.0
        self.filter_ratio = float(filter_ratio)
        self.penalty = penalty
        self.gate = tuple(gate) if gate is not None else None

    @classmethod
    def load(cls, model: str | os.PathLike, uld_adapter: str | os.PathLike | None = None, *,
             alpha: float | None = None, filter_ratio: float | None = None,
             penalty: str | None = None, gate=_ADAPTERS,
             dtype: torch.dtype = torch.float32, device: str = "cpu") -> "ReferenceDecoder":
        """Load a target (hub id or folder) and, optionally, a ULD adapter folder for it.

        Decoding values left out are the adapter's (``uld_config.json``), as in the engine;
        ``gate=None`` turns the gate off."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from uld_vllm.core.adapter import load_adapter
        from uld_vllm.core.assistant import load_assistant
        from uld_vllm.core.models import resolve_model

        model = resolve_model(model)
        adapter = load_adapter(uld_adapter) if uld_adapter is not None else None
        if adapter is not None:  # refuse a wrong base before loading gigabytes of weights
            from transformers import AutoConfig

            adapter.check_base(AutoConfig.from_pretrained(model), str(model))
        target = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device)
        tokenizer = AutoTokenizer.from_pretrained(model)
        assistant = load_assistant(target, adapter) if adapter is not None else None
        cfg = adapter.config if adapter is not None else None
        return cls(
            target, tokenizer, assistant,
            alpha=alpha if alpha is not None else (cfg.alpha if cfg else 0.0),
            filter_ratio=filter_ratio if filter_ratio is not None else
            (cfg.filter_ratio if cfg else 0.1),
            penalty=penalty if penalty is not None else (cfg.penalty if cfg else "logit"),
            gate=gate if gate is not _ADAPTERS else (cfg.gate if cfg else None),
        )

    # ------------------------------------------------------------------ helpers
    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        return [int(t) for t in prompt]

    def combine(self, target_logits: torch.Tensor, assistant_logits: torch.Tensor | None,
                mode: str) -> torch.Tensor:
        if assistant_logits is None or self.alpha == 0.0:
            assistant_logits = torch.zeros_like(target_logits)
            return uld_logits(target_logits, assistant_logits, alpha=0.0,
                              filter_ratio=self.filter_ratio, mode=mode)
        return uld_logits(target_logits, assistant_logits, alpha=self.alpha,
                          filter_ratio=self.filter_ratio, mode=mode, penalty=self.penalty,
                          gate=self.gate)

    def _device(self) -> torch.device:
        return next(self.target.parameters()).device

    def _both(self, **kw):
        t = self.target(**kw["t"])
        a = self.assistant(**kw["a"]) if self.assistant is not None and self.alpha else None
        return t, a

    # --------------------------------------------------------------- generation
    @torch.inference_mode()
    def generate(self, prompts: Sequence[Prompt], *, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 batch_size: int | None = None, ignore_eos: bool = False,
                 progress: bool = False) -> list[ReferenceOutput]:
        """Greedy (``temperature=0``) or sampled generation, in static batches."""
        ids = [self.encode(p) for p in prompts]
        batch_size = batch_size or len(ids) or 1
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        outs: list[ReferenceOutput] = []
        starts = range(0, len(ids), batch_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="reference decode", unit="batch")
        for s in starts:
            outs += self._generate_batch(ids[s:s + batch_size], max_new_tokens, temperature,
                                         top_p, gen, ignore_eos)
        return outs

    def _generate_batch(self, batch, max_new_tokens, temperature, top_p, gen, ignore_eos):
        from transformers import DynamicCache

        dev = self._device()
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        eos = self.tokenizer.eos_token_id
        width = max(len(x) for x in batch)
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in batch], device=dev)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch], device=dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        caches = {"t": DynamicCache(), "a": DynamicCache()}
        step_in = dict(input_ids=input_ids, attention_mask=mask, position_ids=pos)
        B = len(batch)
        tokens = [[] for _ in range(B)]
        logps = [[] for _ in range(B)]
        done = [False] * B
        reason = ["length"] * B
        for _ in range(max_new_tokens):
            t_out, a_out = self._both(
                t=dict(**step_in, past_key_values=caches["t"], use_cache=True),
                a=dict(**step_in, past_key_values=caches["a"], use_cache=True),
            )
            scores = self.combine(t_out.logits[:, -1].float(),
                                  a_out.logits[:, -1].float() if a_out is not None else None,
                                  mode="generate")
            nxt = self._choose(scores, temperature, top_p, gen)
            step_logp = torch.log_softmax(scores, dim=-1).gather(-1, nxt[:, None])[:, 0]
            for i in range(B):
                if done[i]:
                    continue
                tokens[i].append(int(nxt[i]))
                logps[i].append(float(step_logp[i]))
                if not ignore_eos and eos is not None and int(nxt[i]) == eos:
                    done[i], reason[i] = True, "stop"
            if all(done):
                break
            nxt = torch.where(torch.tensor(done, device=dev), torch.full_like(nxt, pad), nxt)
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=dev)], dim=1)
            pos = pos[:, -1:] + 1
            step_in = dict(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos)
        return [
            ReferenceOutput(prompt_token_ids=list(p), token_ids=t, logprobs=lp,
                            text=self.tokenizer.decode(t, skip_special_tokens=True),
                            finish_reason=r)
            for p, t, lp, r in zip(batch, tokens, logps, reason)
        ]

    @staticmethod
    def _choose(scores, temperature, top_p, gen):
        if temperature == 0.0:
            return scores.argmax(dim=-1)
        logits = scores / temperature
        if top_p < 1.0:
            sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
            probs = torch.softmax(sorted_logits, dim=-1)
            # drop a token when the mass strictly before it already reaches top_p
            drop = probs.cumsum(-1) - probs >= top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=gen)[:, 0]

    @torch.inference_mode()
    def next_token_scores(self, prompt: Prompt, generated: Sequence[int],
                          mode: str = "generate") -> torch.Tensor:
        """Combined ULD scores ``[V]`` for the token after ``prompt + generated``."""
        ids = self.encode(prompt) + [int(t) for t in generated]
        inputs = {"input_ids": torch.tensor([ids], device=self._device())}
        t_out, a_out = self._both(t=inputs, a=inputs)
        a = a_out.logits[:, -1].float() if a_out is not None else None
        return self.combine(t_out.logits[:, -1].float(), a, mode=mode)[0].cpu()

    # ------------------------------------------------------------------ scoring
    @torch.inference_mode()
    def score(self, prompts: Sequence[Prompt], continuations: Sequence[Prompt], *,
              mode: str = "score", batch_size: int = 8) -> list[torch.Tensor]:
        """Teacher-forced log-probs of each continuation token under ULD.

        ``mode="score"`` is the reference's TOFU scoring (masked tokens keep the target logit,
        softmax over the full vocabulary); ``mode="generate"`` gives exactly the per-step
        distribution ``generate`` samples from (masked tokens have probability 0).
        Returns one float32 tensor ``[len(continuation)]`` per pair.
        """
        if len(prompts) != len(continuations):
            raise ValueError("prompts and continuations must have the same length")
        pairs = [(self.encode(p), self.encode(c)) for p, c in zip(prompts, continuations)]
        out: list[torch.Tensor] = []
        for s in range(0, len(pairs), batch_size):
            out += self._score_batch(pairs[s:s + batch_size], mode)
        return out

    def _score_batch(self, pairs, mode):
        dev = self._device()
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        seqs = [p + c for p, c in pairs]
        width = max(len(x) for x in seqs)
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in seqs], device=dev)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in seqs], device=dev)
        inputs = dict(input_ids=input_ids, attention_mask=mask)
        t_out, a_out = self._both(t=inputs, a=inputs)
        res = []
        for i, (p, c) in enumerate(pairs):
            if not p:
                raise ValueError("scoring needs a non-empty prompt (the first token has no "
                                 "prediction)")
            rows = slice(len(p) - 1, len(p) + len(c) - 1)
            t = t_out.logits[i, rows].float()
            a = a_out.logits[i, rows].float() if a_out is not None else None
            s = self.combine(t, a, mode=mode)
            tgt = torch.tensor(c, device=dev)[:, None]
            res.append(torch.log_softmax(s, dim=-1).gather(-1, tgt)[:, 0].cpu())
        return res
