"""Where a ULD engine's request policy is enforced in vLLM's frontend, and where it is shown.

ULD leaves the target's weights untouched, so what the served API lets a request ask is the
guarantee. The policy (``UldSettings.request_policy``, checked by
``request_controls.check_policy``) is enforced:

* at admission, for every engine and every request path: vLLM's ``InputProcessor`` runs the
  logits processors' per-request validator for each request it admits, in the frontend
  process, and builds that validator once from its engine's config.
  ``patch_input_processor`` (installed by the plugin's ``register()`` in every vLLM
  process) makes the validator of a ULD engine also check that engine's own policy, so
  offline engines, the OpenAI endpoints, the token-in/token-out endpoint and anything else
  that submits a request are covered alike;
* when the OpenAI server parses a request (``validate_at_request_parsing``, installed by
  ``--uld-adapter`` in the server process), so a refused ``stream=true`` request gets a 400
  before its event stream starts, and a ``use_beam_search`` request with ``uld_*`` keys
  (which vLLM's beam search would drop: it sends its own per-step requests) is refused;
* in the worker (``request_controls.RowControls``), which serves a request that got past
  both with the engine's settings.

``GET /v1/models`` shows each ULD model's settings and policy under ``"uld"``::

    {"id": "tiny-uld", ..., "uld": {"alpha": 0.8, "filter_ratio": 0.1,
     "penalty": "above_uniform", "gate": [1.0, 3.0], "mode": "generate",
     "request_policy": "strengthen", "alpha_range": null,
     "request_keys": {"uld_alpha": ">= the served 0.8", "uld_mode": "only the served
     'generate'"}}}
"""

from __future__ import annotations

from uld_vllm.engine.request_controls import UldRequestControls, check_policy, policy_rules
from uld_vllm.engine.settings import settings_of


def patch_input_processor() -> None:
    """Make every ULD engine's admission-time validator check the engine's own policy."""
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.input_processor import InputProcessor

    if getattr(InputProcessor, "_uld_policy", False):
        return
    original = InputProcessor._build_logits_processors_params_validator

    def build(self):
        validate = original(self)
        settings = settings_of(self.vllm_config)
        if settings is None:  # a plain engine: vLLM's own validator
            return validate

        def validate_with_policy(params) -> None:
            validate(params)  # the format checks (UldRequestControls.validate_params)
            try:
                check_policy(params.extra_args, settings)
            except ValueError as exc:
                raise VLLMValidationError(str(exc), parameter="vllm_xargs") from None

        return validate_with_policy

    InputProcessor._build_logits_processors_params_validator = build
    InputProcessor._uld_policy = True


def check_parsed_request(params, settings) -> None:
    """The checks admission runs, on a request's ``SamplingParams`` (``ValueError``)."""
    UldRequestControls.validate_params(params)
    check_policy(params.extra_args, settings)


_served = {}


def validate_at_request_parsing(settings) -> None:
    """Check ``uld_*`` arguments when the OpenAI server builds a request's SamplingParams.

    vLLM runs the admission checks when the request enters the engine client, which for
    ``stream=true`` happens after the 200 response has started: the refusal would be an error
    event inside a 200 stream. The OpenAI protocols build their SamplingParams with
    ``SamplingParams.from_optional`` (beam-search requests their BeamSearchParams with
    ``to_beam_search_params``; the token-in/token-out endpoint takes SamplingParams as JSON)
    while the handler can still answer 400, so the server process,
    which serves this one engine, checks there with its ``settings``."""
    from vllm import SamplingParams
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.exceptions import VLLMValidationError

    _served["settings"] = settings
    if getattr(SamplingParams, "_uld_checked", False):
        return
    original = SamplingParams.from_optional

    def from_optional(*args, **kwargs):
        params = original(*args, **kwargs)
        try:
            check_parsed_request(params, _served["settings"])
        except ValueError as exc:
            raise VLLMValidationError(str(exc), parameter="vllm_xargs") from None
        return params

    SamplingParams.from_optional = staticmethod(from_optional)
    SamplingParams._uld_checked = True
    for cls in (CompletionRequest, ChatCompletionRequest):
        _refuse_uld_keys_with_beam_search(cls, VLLMValidationError)
    _check_token_requests()


def _check_token_requests() -> None:
    # /inference/v1/generate (--enable-scale-out) takes its SamplingParams as JSON, not
    # through from_optional
    from vllm.entrypoints.scale_out.token_in_token_out.serving import ServingTokens

    original = ServingTokens.serve_tokens

    async def serve_tokens(self, request, raw_request=None):
        try:
            check_parsed_request(request.sampling_params, _served["settings"])
        except ValueError as exc:
            return self.create_error_response(str(exc), param="sampling_params.extra_args")
        return await original(self, request, raw_request)

    ServingTokens.serve_tokens = serve_tokens


def _refuse_uld_keys_with_beam_search(cls, error) -> None:
    original = cls.to_beam_search_params

    def to_beam_search_params(self, *args, **kwargs):
        asked = sorted(k for k in (self.vllm_xargs or {}) if str(k).startswith("uld_"))
        if asked:
            raise error(f"{', '.join(asked)} with use_beam_search: vLLM's beam search sends "
                        "its own per-step requests, which carry no uld_* keys and use the "
                        "served --uld-alpha/--uld-mode: drop the uld_* keys or "
                        "use_beam_search", parameter="vllm_xargs")
        return original(self, *args, **kwargs)

    cls.to_beam_search_params = to_beam_search_params


def model_card_info(settings) -> dict:
    """The ``"uld"`` entry of a ULD model's ``/v1/models`` card (no file paths)."""
    return {"alpha": settings.alpha, "filter_ratio": settings.filter_ratio,
            "penalty": settings.penalty, "gate": list(settings.gate) if settings.gate else None,
            "mode": settings.mode, "request_policy": settings.request_policy,
            "alpha_range": list(settings.alpha_range) if settings.alpha_range else None,
            "request_keys": policy_rules(settings)}


def show_policy_in_models() -> None:
    """``GET /v1/models``: each base model of a ULD engine carries ``model_card_info``."""
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels

    if getattr(OpenAIServingModels, "_uld_info", False):
        return
    original = OpenAIServingModels.show_available_models

    async def show_available_models(self):
        models = await original(self)
        settings = settings_of(self.engine_client.vllm_config)
        if settings is not None:
            base = {b.name for b in self.base_model_paths}
            for card in models.data:
                if card.id in base:
                    card.uld = model_card_info(settings)
        return models

    OpenAIServingModels.show_available_models = show_available_models
    OpenAIServingModels._uld_info = True

