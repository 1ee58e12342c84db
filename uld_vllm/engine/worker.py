"""Methods vLLM mixes into its workers (``worker_extension_cls``), called by name.

``llm.collective_rpc("uld_set_mode", args=("score",))`` runs ``uld_set_mode`` on every worker;
only the method name and plain arguments cross the process boundary, so no pickled function
(and no ``VLLM_ALLOW_INSECURE_SERIALIZATION``) is needed.
"""

from __future__ import annotations

from uld_vllm.core.logits import MODES


class UldWorkerExtension:
    def _uld_model(self):
        model = self.model_runner.get_model()
        if getattr(model, "uld_combiner", None) is None:
            return None
        return model

    def uld_set_mode(self, mode: str) -> str | None:
        """Switch the engine's default ULD mode; None on a plain (non-ULD) model.

        Requests that set their own ``uld_mode`` keep it. Callers switch between jobs, with
        nothing in flight: a request running across the switch would see both modes. The
        request policy compares with the configured mode, not this one; a server's clients
        cannot reach this method (``--uld-adapter`` refuses vLLM's dev endpoints, whose
        ``/collective_rpc`` could, unless the policy is ``any``)."""
        if mode not in MODES:
            raise ValueError(f"ULD mode {mode!r} is unknown: use one of {MODES}")
        model = self._uld_model()
        if model is None:
            return None
        model.uld_combiner.mode = mode
        return mode

    def uld_combiner_state(self) -> dict | None:
        """The combiner's settings, the path it chose at start (``description``, as logged)
        and its path counters; None on a plain model."""
        model = self._uld_model()
        if model is None:
            return None
        c = model.uld_combiner
        return {"alpha": c.alpha, "mode": c.mode, "filter_ratio": c.filter_ratio,
                "penalty": c.penalty, "gate": list(c.gate) if c.gate else None,
                "backend": c.backend, "description": c.description, "stats": dict(c.stats)}

    def uld_forward_state(self) -> dict | None:
        """Whether vLLM compiles the ULD forward, whether it is compiled now (in this run, or
        loaded from vLLM's AOT compile cache), and whether the target's inner ``*Model`` was
        compiled instead (it must not be: ULD never calls its forward). None on a plain model."""
        model = self._uld_model()
        if model is None:
            return None

        def compiled(mod) -> bool:
            return bool(getattr(mod, "compiled", False)
                        or getattr(mod, "aot_compiled_fn", None) is not None)

        fwd = model._uld_forward[0]
        return {"compiles": not fwd.do_not_compile, "compiled": compiled(fwd),
                "from_cache": bool(getattr(fwd, "was_aot_compile_fn_loaded_from_disk", False)),
                "inner_model_compiled": compiled(model.model)}
