"""`--uld-adapter/--uld-alpha/--uld-filter-ratio/--uld-mode/--uld-request-policy/
--uld-alpha-range` on vLLM's own command line.

vLLM loads general plugins at the top of ``AsyncEngineArgs.add_cli_args`` ("to update the
parser"), which then calls ``EngineArgs.add_cli_args``: wrapping that static method adds the
flags to ``vllm serve`` (and every other vLLM command that takes engine args). Wrapping
``EngineArgs.from_cli_args`` turns them into ``hf_overrides`` + ``additional_config`` after
validating the adapter, so a bad adapter stops the server before any engine starts, with one
line. Every other flag passes through untouched.
"""

from __future__ import annotations

import argparse
import sys

from uld_vllm.errors import UldError


def add_uld_args(parser, *, mode: bool = True,
                 adapter_help: str = "ULD adapter folder written by `uld-vllm train`") -> None:
    """The ULD engine flags: on ``vllm serve`` (all of them) and on the offline jobs (without
    ``--uld-mode``, which eval switches itself, and without the request policy, which guards
    a server's clients). The only parser of them."""
    # vLLM's --help lists each group's title and first paragraph only; `--help=ULD` shows
    # the flags, so the summary names them
    group = parser.add_argument_group(
        "ULD", "uld-vllm unlearning: --uld-adapter DIR, --uld-alpha A, --uld-filter-ratio R"
        + (", --uld-mode {generate,score}, --uld-request-policy {fixed,strengthen,any}, "
           "--uld-alpha-range MIN,MAX" if mode else "") + " (`--help=ULD` describes "
        "them).\n\nTokens are sampled from target - alpha * assistant after the plausibility "
        "filter." + (" The request policy bounds what a request's uld_* keys may change."
                     if mode else ""))
    group.add_argument("--uld-adapter", default=None, metavar="DIR", help=adapter_help)
    group.add_argument("--uld-alpha", type=float, default=None, metavar="A",
                       help="weight of the assistant's logits; unset: the adapter's alpha. "
                            "A request may set its own (vllm_xargs {\"uld_alpha\": A}; 0: "
                            "the target's own distribution) as far as --uld-request-policy "
                            "allows")
    group.add_argument("--uld-filter-ratio", type=float, default=None, metavar="R",
                       help="plausibility-filter ratio in [0, 1); unset: the adapter's")
    group.add_argument("--uld-penalty", default=None, metavar="P",
                       help="what is subtracted: 'above_uniform' (default: only where the "
                            "assistant puts more than uniform mass) or 'logit' (the paper's "
                            "l - alpha * l_a); unset: the adapter's")
    group.add_argument("--uld-gate", default=None, metavar="LOW,HIGH|off",
                       help="confidence gate: alpha is scaled by clip((KL(p_a||U) - LOW) / "
                            "(HIGH - LOW), 0, 1) per token, so rows where the assistant knows "
                            "nothing are left alone; 'off': the paper's ungated rule; unset: "
                            "the adapter's (default 1,3)")
    group.add_argument("--uld-rule", default=None, metavar="NAME",
                       help="a named rule: 'reference' is the paper's exactly (--uld-penalty "
                            "logit --uld-gate off), 'gated' this project's default")
    if not mode:
        return
    group.add_argument("--uld-mode", choices=["generate", "score"], default=None,
                       help="'score' keeps the target's logit on filtered-out tokens (TOFU "
                            "scoring through prompt_logprobs); 'generate' masks them. A "
                            "request may set its own for its sampled tokens (vllm_xargs "
                            "{\"uld_mode\": M}) as far as --uld-request-policy allows; "
                            "prompt_logprobs always use this one")
    group.add_argument("--uld-request-policy", default=None, metavar="POLICY",
                       help="what a request's uld_* keys (vllm_xargs) may change: 'strengthen' "
                            "(default) allows uld_alpha >= the served alpha and every other "
                            "key only at its served value; 'fixed' allows only the served "
                            "values; 'any' allows everything, the target's own distribution "
                            "(uld_alpha 0) included. Other values are refused with HTTP 400")
    group.add_argument("--uld-alpha-range", default=None, metavar="MIN,MAX",
                       help="bounds for a request's uld_alpha (with strengthen or any); must "
                            "contain the served alpha")


def apply_uld_args(engine_args, args: argparse.Namespace) -> None:
    """Set the ULD model class and settings on ``engine_args`` from parsed ``--uld-*`` flags."""
    from uld_vllm.engine.request_controls import describe_policy
    from uld_vllm.engine.settings import (
        WORKER_EXTENSION,
        UldSettings,
        check_engine_options,
        engine_overrides,
        parse_alpha_range,
        v1_model_runner_for_server,
        with_request_controls,
    )

    loose = [f for f in ("uld_alpha", "uld_filter_ratio", "uld_request_policy",
                         "uld_alpha_range", "uld_penalty", "uld_gate", "uld_rule")
             if getattr(args, f, None) is not None]
    if not getattr(args, "uld_adapter", None):
        if loose:
            raise UldError(f"--{loose[0].replace('_', '-')} needs --uld-adapter",
                           "pass --uld-adapter DIR or drop the ULD flags")
        return
    hf = engine_args.hf_overrides
    if callable(hf):
        raise UldError("--uld-adapter cannot be combined with a callable hf_overrides",
                       "pass hf_overrides as a dict")
    check_engine_options(
        enable_lora=engine_args.enable_lora, speculative_config=engine_args.speculative_config,
        pipeline_parallel_size=engine_args.pipeline_parallel_size,
        enable_batch_sharded_sampling=getattr(engine_args, "enable_batch_sharded_sampling",
                                              None))
    alpha_range = getattr(args, "uld_alpha_range", None)
    if alpha_range is not None:
        alpha_range = parse_alpha_range(alpha_range)
    v1_model_runner_for_server()
    engine_args.logits_processors = with_request_controls(engine_args.logits_processors)
    if not engine_args.worker_extension_cls:
        engine_args.worker_extension_cls = WORKER_EXTENSION
    hf_overrides, additional = engine_overrides(
        engine_args.model, args.uld_adapter, alpha=args.uld_alpha,
        filter_ratio=args.uld_filter_ratio, mode=args.uld_mode,
        request_policy=getattr(args, "uld_request_policy", None), alpha_range=alpha_range,
        rule=rule_of_args(args), hf_overrides=hf, additional_config=engine_args.additional_config,
        revision=engine_args.revision, trust_remote_code=engine_args.trust_remote_code)
    settings = UldSettings.from_dict(additional["uld"])
    check_dev_mode(settings)
    engine_args.hf_overrides = hf_overrides
    engine_args.additional_config = additional
    from uld_vllm.engine.admission import show_policy_in_models, validate_at_request_parsing

    # this process serves the requests: 400 before any stream starts
    validate_at_request_parsing(settings)
    show_policy_in_models()
    print(f"uld-vllm: {describe_policy(settings)}", file=sys.stderr, flush=True)


def rule_of_args(args) -> dict:
    """``--uld-rule/--uld-penalty/--uld-gate`` as the settings they stand for (unset: none)."""
    from uld_vllm.engine.settings import UNSET, parse_gate, rule_settings

    gate = getattr(args, "uld_gate", None)
    return rule_settings(getattr(args, "uld_rule", None), getattr(args, "uld_penalty", None),
                         UNSET if gate is None else parse_gate(gate))


def check_dev_mode(settings) -> None:
    """vLLM's dev endpoints give every client the engine itself: ``/collective_rpc`` calls
    any worker method by name (``uld_set_mode`` included) and the RL endpoints replace
    weights. Only a server whose clients may do anything anyway can have them."""
    import vllm.envs as envs

    if envs.VLLM_SERVER_DEV_MODE and settings.request_policy != "any":
        raise UldError("VLLM_SERVER_DEV_MODE=1 serves /collective_rpc and the weight-update "
                       "endpoints, through which any client can change the ULD engine "
                       f"(request policy {settings.request_policy!r})",
                       "unset VLLM_SERVER_DEV_MODE, or give clients full control with "
                       "--uld-request-policy any")


def resolve_model_arg(args: argparse.Namespace) -> None:
    """``vllm serve smollm2-135m-instruct``: a short name of ``uld-vllm fetch-model`` becomes its
    converted folder, and stays the name clients use (``--served-model-name``)."""
    from uld_vllm.core.models import KNOWN_MODELS, resolve_model

    name = getattr(args, "model", None)
    if name not in KNOWN_MODELS:
        return
    folder = resolve_model(name)
    if folder == name:  # a folder of that name exists here: vLLM's own resolution applies
        return
    if getattr(args, "served_model_name", None) is None:
        args.served_model_name = [name]
    if getattr(args, "tokenizer", None) == name:
        args.tokenizer = folder
    args.model = folder


def patch_engine_args() -> None:
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs, "_uld_patched", False):
        return
    original_add = EngineArgs.add_cli_args
    original_from = EngineArgs.from_cli_args.__func__

    def add_cli_args(parser, *a, **kw):
        parser = original_add(parser, *a, **kw)
        if not any(o == "--uld-adapter" for act in parser._actions for o in act.option_strings):
            add_uld_args(parser)
        return parser

    def from_cli_args(cls, args: argparse.Namespace):
        try:
            resolve_model_arg(args)
            engine_args = original_from(cls, args)
            apply_uld_args(engine_args, args)
        except UldError as exc:
            print(f"uld-vllm: error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        return engine_args

    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)
    EngineArgs._uld_patched = True
