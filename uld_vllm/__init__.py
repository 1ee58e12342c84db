"""uld-vllm: LLM unlearning by logit difference (ULD), served at vLLM speed."""

__version__ = "0.1.0"

__all__ = ["LLM", "uld_logits", "UldError", "__version__"]


def __getattr__(name):
    # Lazy so that `import uld_vllm` (done by vLLM's plugin loader in every process) stays cheap.
    if name == "uld_logits":
        from uld_vllm.core.logits import uld_logits

        return uld_logits
    if name == "LLM":
        from uld_vllm.engine.llm import LLM

        return LLM
    if name == "UldError":
        from uld_vllm.errors import UldError

        return UldError
    raise AttributeError(f"module 'uld_vllm' has no attribute {name!r}")
