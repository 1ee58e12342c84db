"""Where ``uld-vllm audit`` sends its requests: an offline vLLM engine, or an OpenAI-compatible
server. Each backend answers a list of ``audit.Prompt`` in one batch (one ``llm.chat`` call,
or concurrent HTTP requests) and sends a bypass attempt, saying whether it was refused.

Refused means what a client would see: HTTP 400 online; offline a ``ValueError`` (or
subclass) when the request is admitted, which is where ``uld_vllm.LLM`` checks per-request
``uld_*`` arguments and, with ``uld_request_policy``, applies its policy.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from uld_vllm.errors import UldError

POLICY = "strengthen"  # per-request arguments may only strengthen the unlearning


def _one_line(text: str, limit: int = 300) -> str:
    return " ".join(str(text).split())[:limit]


def _outcome(statuses: list[bool], messages: list[str], answers) -> dict:
    refused = sum(statuses)
    status = "refused" if refused == len(statuses) else "through" if not refused else "mixed"
    return {"status": status, "requests": len(statuses), "refused": refused,
            "message": next((m for m in messages if m), None), "answers": answers}


# --- offline ------------------------------------------------------------------------------

def sampling_params(prompt, extra_args: dict | None = None):
    from vllm import SamplingParams

    return SamplingParams(n=prompt.n, temperature=prompt.temperature, top_p=prompt.top_p,
                          seed=prompt.seed, max_tokens=prompt.max_tokens,
                          extra_args=extra_args)


def refusals() -> tuple[type, ...]:
    """What admission raises for a refused request: the ValueError of a logits processor's
    ``validate_params``, which vLLM 0.32 re-raises as its ``VLLMValidationError``."""
    import vllm.exceptions

    return (ValueError,) + tuple(getattr(vllm.exceptions, n) for n in ("VLLMValidationError",)
                                 if hasattr(vllm.exceptions, n))


def _engine_name(llm) -> str:
    config = llm.llm_engine.vllm_config
    uld = (config.additional_config or {}).get("uld")
    if uld:
        return f"uld_vllm engine: {config.model_config.model} + {uld.get('adapter')}"
    return f"vLLM engine: {config.model_config.model}"


class EngineBackend:
    """A built vLLM ``LLM`` (plain or ULD); the caller owns it (``close`` leaves it running)."""

    def __init__(self, llm, *, chat_template: str | None = None, progress: bool = True,
                 policy: str | None = None, source: str | None = None):
        self.llm, self.chat_template, self.progress = llm, chat_template, progress
        self.policy = policy
        self.source = source or _engine_name(llm)

    def check(self) -> None:
        tok = self.llm.get_tokenizer()
        if not self.chat_template and not getattr(tok, "chat_template", None):
            raise UldError(f"the tokenizer of {self.source} has no chat template",
                           "pass a Jinja template (--chat-template FILE, or chat_template=)")

    def _chat(self, prompts, params, progress):
        return self.llm.chat([p.messages for p in prompts], params, use_tqdm=progress,
                             chat_template=self.chat_template)

    def answer(self, prompts, desc: str) -> list[list[str]]:
        outs = self._chat(prompts, [sampling_params(p) for p in prompts], self.progress)
        return [[c.text.strip() for c in o.outputs] for o in outs]

    def attempt(self, prompts, extra_args: dict) -> dict:
        params = [sampling_params(p, dict(extra_args)) for p in prompts]
        try:
            # every request of an attempt carries the same arguments: admission refuses the
            # first, and vLLM aborts any it had already added
            outs = self._chat(prompts, params, False)
        except refusals() as exc:
            return _outcome([True] * len(prompts), [_one_line(exc)], [None] * len(prompts))
        return _outcome([False] * len(prompts), [],
                        [[c.text.strip() for c in o.outputs] for o in outs])

    def close(self) -> None:
        pass


class _OwnedEngine(EngineBackend):
    """An engine the audit builds when its side starts and shuts down when it ends."""

    def __init__(self, build, source: str, **kw):
        self._build, self.llm = build, None
        self.chat_template, self.progress = kw.get("chat_template"), kw.get("progress", True)
        self.policy, self.source = None, source

    def check(self) -> None:
        pass  # OfflineEngines.check looked at the model, adapter and template already

    def _chat(self, prompts, params, progress):
        if self.llm is None:
            self.llm, self.policy = self._build()
        return super()._chat(prompts, params, progress)

    def close(self) -> None:
        from uld_vllm.jobs.spec import shutdown

        if self.llm is not None:
            shutdown(self.llm)
            self.llm = None


def build_uld_engine(model: str, adapter, *, policy: str = POLICY, **kwargs):
    """``(uld_vllm.LLM(model, uld_adapter=adapter, uld_request_policy=policy, ...), policy)``:
    the audit's ULD engine under a server's request policy, so that its bypass attempts
    measure what a served model lets through."""
    from uld_vllm.engine.llm import LLM

    return LLM(model, uld_adapter=adapter, uld_request_policy=policy, **kwargs), policy


class OfflineEngines:
    """The target (plain vLLM) and ULD engines of an offline audit, built one after the other
    (two engines on a small machine would share its cores and memory)."""

    def __init__(self, model: str, adapter, *, uld_alpha=None, uld_filter_ratio=None,
                 chat_template: str | None = None, progress: bool = True,
                 vllm_kwargs: dict | None = None):
        from uld_vllm.core.models import resolve_model

        self.model, self.adapter = resolve_model(model), str(adapter)
        self.uld_kw = {"uld_alpha": uld_alpha, "uld_filter_ratio": uld_filter_ratio}
        self.chat_template, self.progress = chat_template, progress
        self.kwargs = dict(vllm_kwargs or {})

    def check(self) -> None:
        """The adapter fits the model and a chat template exists (before any engine starts)."""
        from transformers import AutoTokenizer

        from uld_vllm.engine.settings import engine_overrides

        engine_overrides(self.model, self.adapter, alpha=self.uld_kw["uld_alpha"],
                         filter_ratio=self.uld_kw["uld_filter_ratio"])
        tok = AutoTokenizer.from_pretrained(self.model)
        if not self.chat_template and not getattr(tok, "chat_template", None):
            raise UldError(f"the tokenizer of {self.model} has no chat template",
                           "pass --chat-template FILE (a Jinja template)")

    def target(self) -> EngineBackend:
        from uld_vllm.engine.llm import LLM

        return _OwnedEngine(lambda: (LLM(self.model, **self.kwargs), None),
                            f"vLLM engine: {self.model}", chat_template=self.chat_template,
                            progress=self.progress)

    def uld(self) -> EngineBackend:
        def build():
            return build_uld_engine(self.model, self.adapter, **self.uld_kw, **self.kwargs)

        return _OwnedEngine(build, f"uld_vllm engine: {self.model} + {self.adapter}",
                            chat_template=self.chat_template, progress=self.progress)


def read_chat_template(path) -> str | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise UldError(f"chat template {p} does not exist", "pass a Jinja template file")
    return p.read_text()


# --- online -------------------------------------------------------------------------------

def _base_url(url: str) -> str:
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def _error_text(r) -> str:
    try:
        return _one_line(r.json()["error"]["message"])
    except Exception:  # noqa: BLE001 - any body that is not vLLM's error JSON
        return _one_line(r.text)


class ServerBackend:
    """An OpenAI-compatible server: ``/v1/chat/completions`` (the server applies its chat
    template), ``concurrency`` requests in flight."""

    policy = "the server's"

    def __init__(self, url: str, *, model: str | None = None, concurrency: int = 32,
                 progress: bool = True, timeout: float = 600, flag: str = "--url"):
        self.url, self.model, self.flag = _base_url(url), model, flag
        self.concurrency, self.progress, self.timeout = concurrency, progress, timeout
        self.source = f"server {self.url}"

    def check(self) -> None:
        """The server answers and serves a model (its first one unless ``model`` was named)."""
        import httpx

        try:
            r = httpx.get(f"{self.url}/v1/models", timeout=10)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise UldError(f"cannot reach the server at {self.url} ({type(exc).__name__})",
                           f"start it (uld-vllm serve MODEL --uld-adapter DIR) or fix "
                           f"{self.flag}") from None
        try:
            served = [m["id"] for m in r.json()["data"]] if r.status_code == 200 else None
        except (ValueError, KeyError, TypeError):
            served = None
        if not served:
            raise UldError(f"{self.url}/v1/models answered {r.status_code} without a model "
                           "list", f"pass the base URL of an OpenAI-compatible server to "
                           f"{self.flag} (e.g. http://127.0.0.1:8000)")
        if self.model is not None and self.model not in served:
            raise UldError(f"the server at {self.url} serves {', '.join(served)}, not "
                           f"{self.model!r}", "fix --served-model")
        self.model = self.model or served[0]
        self.source = f"server {self.url} ({self.model})"

    def _body(self, prompt, extra_args: dict | None = None) -> dict:
        body = {"model": self.model, "messages": prompt.messages, "n": prompt.n,
                "temperature": prompt.temperature, "top_p": prompt.top_p,
                "max_tokens": prompt.max_tokens}
        if prompt.seed is not None:
            body["seed"] = prompt.seed
        if extra_args is not None:
            body["vllm_xargs"] = extra_args
        return body

    def _post_all(self, bodies: list[dict], desc: str, progress: bool) -> list:
        return asyncio.run(self._post_async(bodies, desc, progress))

    async def _post_async(self, bodies, desc, progress):
        import httpx
        from tqdm.auto import tqdm

        gate = asyncio.Semaphore(self.concurrency)
        bar = tqdm(total=len(bodies), desc=desc, unit="req", disable=not progress,
                   dynamic_ncols=True)

        async def one(client, body):
            async with gate:
                try:
                    r = await client.post("/v1/chat/completions", json=body)
                except httpx.HTTPError as exc:
                    raise UldError(f"the server at {self.url} stopped answering "
                                   f"({type(exc).__name__})", "check that it still runs, "
                                   "or lower --concurrency") from None
            bar.update(1)
            return r

        try:
            async with httpx.AsyncClient(base_url=self.url, timeout=self.timeout) as client:
                return await asyncio.gather(*(one(client, b) for b in bodies))
        finally:
            bar.close()

    def answer(self, prompts, desc: str) -> list[list[str]]:
        rs = self._post_all([self._body(p) for p in prompts], desc, self.progress)
        bad = next((r for r in rs if r.status_code != 200), None)
        if bad is not None:
            raise UldError(f"the server at {self.url} answered {bad.status_code} to an audit "
                           f"request ({_error_text(bad)})", "check the server's log and "
                           "--max-model-len (multi-turn and multiple-choice prompts are "
                           "longer)")
        return [[(c["message"]["content"] or "").strip() for c in r.json()["choices"]]
                for r in rs]

    def attempt(self, prompts, extra_args: dict) -> dict:
        rs = self._post_all([self._body(p, dict(extra_args)) for p in prompts], "bypass", False)
        if any(r.status_code not in (200, 400) for r in rs):
            bad = next(r for r in rs if r.status_code not in (200, 400))
            return {**_outcome([r.status_code == 400 for r in rs], [], [None] * len(rs)),
                    "status": "error", "message": f"HTTP {bad.status_code}: {_error_text(bad)}"}
        answers = [[(c["message"]["content"] or "").strip() for c in r.json()["choices"]]
                   if r.status_code == 200 else None for r in rs]
        return _outcome([r.status_code == 400 for r in rs],
                        [_error_text(r) for r in rs if r.status_code == 400], answers)

    def close(self) -> None:
        pass


def backend_for(engine, **kw):
    """A backend for a vLLM ``LLM``, a base URL (str) or a backend (returned as it is)."""
    if hasattr(engine, "answer") and hasattr(engine, "attempt"):
        return engine
    if isinstance(engine, str):
        return ServerBackend(engine, progress=kw.get("progress", True))
    kw = {k: v for k, v in kw.items() if k in ("chat_template", "progress", "policy")}
    if hasattr(engine, "chat") and hasattr(engine, "llm_engine"):
        return EngineBackend(engine, **kw)
    raise TypeError(f"cannot audit a {type(engine).__name__}: pass a vllm.LLM, a base URL or "
                    "an audit backend")
