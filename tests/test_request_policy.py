"""The request policy without an engine: the rule per key, the settings that hold it, the
flags that set it (one-line refusals before any engine starts), the admission validator, the
worker's own check, the /v1/models entry."""

import dataclasses
import re
from types import SimpleNamespace

import pytest

from uld_vllm.engine.request_controls import (
    FQCN,
    KEYS,
    RowControls,
    check_policy,
    describe_policy,
    served_field,
)
from uld_vllm.engine.settings import UldSettings
from uld_vllm.errors import UldError


def settings(**kw):
    base = dict(adapter="/a", alpha=0.8, filter_ratio=0.1, mode="generate")
    return UldSettings(**{**base, **kw})


def refusal(extra, s) -> str | None:
    try:
        check_policy(extra, s)
    except ValueError as exc:
        msg = str(exc)
        assert "\n" not in msg
        return msg
    return None


ALLOWED = {
    "strengthen": [{"uld_alpha": 0.8}, {"uld_alpha": 2}, {"uld_mode": "generate"},
                   {"uld_alpha": 5.0, "uld_mode": "generate"}, {"other": 1}],
    "fixed": [{"uld_alpha": 0.8}, {"uld_mode": "generate"}, {"other": 1}],
    "any": [{"uld_alpha": 0}, {"uld_alpha": 0.5}, {"uld_mode": "score"}, {"uld_alpha": 3}],
}
# (policy, extra, words in the refusal): the key, the value, and the flag that allows it
REFUSED = [
    ("strengthen", {"uld_alpha": 0}, ["uld_alpha 0", "below the served 0.8", ">= 0.8",
                                      "--uld-request-policy any"]),
    ("strengthen", {"uld_alpha": 0.79}, ["uld_alpha 0.79", "--uld-request-policy any"]),
    ("strengthen", {"uld_mode": "score"}, ["uld_mode 'score'", "served 'generate'",
                                           "--uld-request-policy any"]),
    ("strengthen", {"uld_alpha": 2, "uld_mode": "score"}, ["uld_mode", "policy 'strengthen'"]),
    ("fixed", {"uld_alpha": 1.5}, ["uld_alpha 1.5", "'fixed'",
                                   "--uld-request-policy strengthen"]),
    ("fixed", {"uld_alpha": 0}, ["uld_alpha 0", "--uld-request-policy any"]),
    ("fixed", {"uld_mode": "score"}, ["uld_mode", "--uld-request-policy any"]),
]


@pytest.mark.parametrize("policy", ["strengthen", "fixed", "any"])
def test_allowed_values_pass(policy):
    for extra in ALLOWED[policy]:
        assert refusal(extra, settings(request_policy=policy)) is None, extra


@pytest.mark.parametrize("policy, extra, words", REFUSED)
def test_weakening_values_are_refused_naming_the_key_and_the_flag(policy, extra, words):
    msg = refusal(extra, settings(request_policy=policy))
    assert msg is not None
    for w in words:
        assert w in msg, msg


def test_alpha_range_bounds_every_policy_but_fixed():
    for policy in ("strengthen", "any"):
        s = settings(request_policy=policy, alpha_range=(0.5, 2.0))
        assert refusal({"uld_alpha": 2.0}, s) is None
        msg = refusal({"uld_alpha": 2.5}, s)
        assert "[0.5, 2]" in msg and "--uld-alpha-range" in msg and "uld_alpha 2.5" in msg
    assert refusal({"uld_alpha": 0.6}, settings(request_policy="any", alpha_range=(0.5, 2)))\
        is None
    assert "below the served" in refusal({"uld_alpha": 0.6}, settings(alpha_range=(0.5, 2)))


def test_every_per_request_key_has_a_served_value_and_a_rule():
    """A key added to KEYS needs a UldSettings field of its name (its served value)."""
    fields = {f.name for f in dataclasses.fields(UldSettings)}
    for key in KEYS:
        assert served_field(key) in fields, f"{key}: add UldSettings.{served_field(key)}"
    line = describe_policy(settings())
    assert all(k in line for k in KEYS) and "\n" not in line


def test_the_rule_keys_are_unordered_keys_a_change_of_which_weakens():
    # uld_penalty / uld_gate: any value but the served one weakens the unlearning
    assert "uld_penalty 'logit'" in refusal({"uld_penalty": "logit"}, settings())
    assert refusal({"uld_penalty": settings().penalty}, settings()) is None
    assert refusal({"uld_gate": "off"}, settings(request_policy="any")) is None
    assert "uld_gate" in refusal({"uld_gate": "off"}, settings())
    assert "uld_penalty" in describe_policy(settings())


@pytest.mark.parametrize("kw, words", [
    ({"request_policy": "lax"}, ["--uld-request-policy 'lax'", "fixed, strengthen, any"]),
    ({"alpha_range": (2.0, 1.0)}, ["--uld-alpha-range 2,1", "MIN > MAX"]),
    ({"alpha_range": (-1.0, 2.0)}, ["negative MIN"]),
    ({"alpha_range": (0.0, float("inf"))}, ["not finite"]),
    ({"alpha_range": (1.0, 2.0)}, ["leaves out the served alpha 0.8"]),
    ({"alpha_range": (0.5, 1.0), "request_policy": "fixed"}, ["no effect", "fixed"]),
])
def test_bad_policy_settings_are_one_line(kw, words):
    with pytest.raises(UldError) as e:
        settings(**kw).validate()
    msg = str(e.value)
    assert "\n" not in msg and ": " in msg
    for w in words:
        assert w in msg, msg


def test_policy_travels_in_additional_config():
    s = settings(request_policy="fixed")
    assert UldSettings.from_dict(s.to_dict()) == s
    s = settings(alpha_range=(0.5, 2.0))
    assert s.to_dict()["alpha_range"] == [0.5, 2.0]  # JSON, as vLLM hashes the config
    assert UldSettings.from_dict(s.to_dict()) == s
    raw = {"adapter": "/a", "alpha": 0.8, "filter_ratio": 0.1}
    assert UldSettings.from_dict(raw).request_policy == "strengthen"  # safe when unsaid
    with pytest.raises(UldError, match=re.escape("alpha_range'] is ['x', 1]")):
        UldSettings.from_dict({**raw, "alpha_range": ["x", 1]})


# ---------------------------------------------------------------- the flags (before any engine)


def _parse(argv):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from uld_vllm.engine import plugin

    plugin.register()
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    return AsyncEngineArgs.from_cli_args(parser.parse_args(argv))


@pytest.fixture
def flags(tiny_llama, llama_adapter, monkeypatch):
    """``--model M --uld-adapter A ARGS`` through vLLM's parser, as `vllm serve` does."""
    # a server sets these for its own process; keep them out of this one
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    monkeypatch.delenv("VLLM_SERVER_DEV_MODE", raising=False)

    def run(*args, adapter=True):
        base = ["--model", str(tiny_llama)] + (["--uld-adapter", str(llama_adapter)]
                                               if adapter else [])
        return _parse(base + list(args))

    return run


def test_policy_flags_reach_additional_config_and_the_log(flags, capsys):
    assert flags().additional_config["uld"]["request_policy"] == "strengthen"
    assert "request policy 'strengthen'" in capsys.readouterr().err
    uld = flags("--uld-request-policy", "any", "--uld-alpha-range", "0.5,2") \
        .additional_config["uld"]
    assert uld["request_policy"] == "any" and uld["alpha_range"] == [0.5, 2.0]
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "request policy" in ln]
    assert len(lines) == 1 and "'any'" in lines[0] and "[0.5, 2]" in lines[0]


@pytest.mark.parametrize("args, env, words", [
    (["--uld-request-policy", "lax"], {}, "--uld-request-policy 'lax' is unknown"),
    (["--uld-request-policy", ""], {}, "--uld-request-policy '' is unknown"),
    (["--uld-alpha-range", "2,1"], {}, "MIN > MAX"),
    (["--uld-alpha-range", "1"], {}, "is not MIN,MAX"),
    (["--uld-alpha-range", "a,b"], {}, "is not MIN,MAX"),
    (["--uld-alpha-range=-1,2"], {}, "negative MIN"),
    (["--uld-alpha-range", "1,2"], {}, "leaves out the served alpha 0.8"),
    (["--uld-request-policy", "fixed", "--uld-alpha-range", "0.5,1"], {}, "no effect"),
    ([], {"VLLM_SERVER_DEV_MODE": "1"}, "VLLM_SERVER_DEV_MODE=1"),
    (["--uld-request-policy", "fixed"], {"VLLM_SERVER_DEV_MODE": "1"}, "/collective_rpc"),
    ([], {"VLLM_USE_V2_MODEL_RUNNER": "1"}, "VLLM_USE_V2_MODEL_RUNNER=1"),
])
def test_bad_policy_flags_stop_the_server_with_one_line(flags, capsys, monkeypatch, args, env,
                                                        words):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as e:
        flags(*args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("uld-vllm: error:")]
    assert len(lines) == 1 and words in lines[0], err
    assert "Traceback" not in err


def test_dev_mode_is_allowed_when_clients_have_full_control(flags, monkeypatch):
    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "1")
    assert flags("--uld-request-policy", "any").additional_config["uld"]["request_policy"] \
        == "any"


def test_policy_flags_need_an_adapter(flags, capsys):
    with pytest.raises(SystemExit):
        flags("--uld-request-policy", "any", adapter=False)
    assert "--uld-request-policy needs --uld-adapter" in capsys.readouterr().err


# ------------------------------------------------------------ where the policy is enforced


def _processor(policy, arch="UldLlamaForCausalLM"):
    """What InputProcessor's validator builder reads of itself."""
    uld = settings(request_policy=policy).to_dict()
    model_config = SimpleNamespace(logits_processors=[FQCN], runner_type="generate",
                                   architectures=[arch])
    return SimpleNamespace(model_config=model_config, vllm_config=SimpleNamespace(
        use_v2_model_runner=False, model_config=model_config,
        additional_config={"uld": uld}))


def test_admission_validator_checks_the_engines_own_policy():
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.input_processor import InputProcessor

    from uld_vllm.engine.admission import patch_input_processor

    patch_input_processor()
    build = InputProcessor._build_logits_processors_params_validator
    weak = SamplingParams(extra_args={"uld_alpha": 0.0})
    with pytest.raises(VLLMValidationError, match="uld_alpha 0 is below the served 0.8"):
        build(_processor("strengthen"))(weak)
    build(_processor("strengthen"))(SamplingParams(extra_args={"uld_alpha": 1.0}))
    build(_processor("any"))(weak)
    # a plain engine's validator is vLLM's own
    build(_processor("strengthen", arch="LlamaForCausalLM"))(weak)
    with pytest.raises(VLLMValidationError, match="JSON number"):  # the format checks stay
        build(_processor("any"))(SamplingParams(extra_args={"uld_alpha": "0"}))


def test_the_worker_serves_a_request_past_admission_with_the_engine_settings():
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate

    rc = RowControls(settings())
    added = [(0, SamplingParams(extra_args={"uld_alpha": 0.0}), None, []),
             (1, SamplingParams(extra_args={"uld_alpha": "x"}), None, []),
             (2, SamplingParams(extra_args={"uld_alpha": 2.0}), None, [])]
    rc.update(BatchUpdate(batch_size=3, removed=[], moved=[], added=added))  # no exception
    assert rc.take(3) == {2: {"alpha": 2.0}}  # rows 0 and 1: the engine's settings
    open_rc = RowControls(settings(request_policy="any"))
    open_rc.update(BatchUpdate(batch_size=1, removed=[], moved=[], added=added[:1]))
    assert open_rc.take(1) == {0: {"alpha": 0.0}}


def test_model_card_shows_the_policy_and_no_paths():
    from uld_vllm.engine.admission import model_card_info

    info = model_card_info(settings(alpha_range=(0.5, 2.0)))
    assert info["request_policy"] == "strengthen" and info["alpha"] == 0.8
    assert info["alpha_range"] == [0.5, 2.0]
    assert info["request_keys"]["uld_alpha"].startswith(">= the served 0.8")
    assert "/a" not in str(info)
