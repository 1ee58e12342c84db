"""The vllm.general_plugins entry point and its idempotent register()."""

from importlib.metadata import entry_points


def test_entry_point_is_installed():
    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("uld") == "uld_vllm.engine.plugin:register"


def test_register_is_idempotent_and_lazy(monkeypatch):
    import sys

    from vllm import ModelRegistry
    from vllm.engine.arg_utils import EngineArgs

    from uld_vllm.engine import cli_args, plugin

    # vLLM may already have loaded the plugin in this process: start from an unregistered one
    monkeypatch.setattr(plugin, "_registered", False)
    calls = {"register_model": 0, "patch": 0}
    real_register = ModelRegistry.register_model
    real_patch = cli_args.patch_engine_args

    def counting_register(*a, **kw):
        calls["register_model"] += 1
        return real_register(*a, **kw)

    def counting_patch():
        calls["patch"] += 1
        return real_patch()

    monkeypatch.setattr(ModelRegistry, "register_model", counting_register)
    monkeypatch.setattr(cli_args, "patch_engine_args", counting_patch)
    plugin.register()
    first = dict(calls)
    add_cli_args = EngineArgs.__dict__["add_cli_args"]
    plugin.register()
    assert calls == first and first["patch"] == 1  # the second call does nothing
    archs = set(ModelRegistry.get_supported_archs())
    assert {"UldLlamaForCausalLM", "UldMistralForCausalLM", "UldQwen2ForCausalLM"} <= archs
    # patching vLLM's parser twice would wrap it twice (and add the --uld-* flags twice)
    real_patch()
    assert EngineArgs.__dict__["add_cli_args"] is add_cli_args
    assert "uld_vllm.engine.model" not in sys.modules  # model code loads only when used


def test_uld_flags_join_vllms_own_parser():
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from uld_vllm.engine import plugin

    plugin.register()
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--model", "m", "--uld-adapter", "/a", "--uld-alpha", "0.5",
                              "--max-model-len", "64"])
    assert args.uld_adapter == "/a" and args.uld_alpha == 0.5 and args.max_model_len == 64
    # without --uld-adapter nothing changes
    plain = AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", "m"]))
    assert plain.hf_overrides in (None, {}) and not (plain.additional_config or {})


def test_uld_flags_are_applied_to_engine_args(tiny_llama, llama_adapter):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from uld_vllm.engine import plugin

    plugin.register()
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--model", str(tiny_llama), "--uld-adapter", str(llama_adapter),
                              "--uld-filter-ratio", "0.01",
                              "--additional-config", '{"other": 1}'])
    ea = AsyncEngineArgs.from_cli_args(args)
    assert ea.hf_overrides == {"architectures": ["UldLlamaForCausalLM"]}
    assert ea.additional_config["other"] == 1  # the user's own config survives
    uld = ea.additional_config["uld"]
    assert uld["filter_ratio"] == 0.01 and uld["alpha"] == 0.8 and uld["mode"] == "generate"
    assert uld["adapter"] == str(llama_adapter)


def test_adapter_hash_keys_the_compile_cache_on_the_adapters_contents(tiny_llama, tmp_path):
    """vLLM's compile cache is keyed on the config hash (additional_config included): an
    adapter rewritten in place with another K must change it."""
    from uld_vllm.dev.tiny import make_random_adapter
    from uld_vllm.engine.settings import engine_overrides

    path = tmp_path / "adapter"
    make_random_adapter(tiny_llama, path, num_layers=2, seed=3)
    first = engine_overrides(str(tiny_llama), path)[1]["uld"]["adapter_hash"]
    assert engine_overrides(str(tiny_llama), path)[1]["uld"]["adapter_hash"] == first
    make_random_adapter(tiny_llama, path, num_layers=1, seed=3, overwrite=True)
    assert engine_overrides(str(tiny_llama), path)[1]["uld"]["adapter_hash"] != first
