"""vLLM worker extension: load new policy weights into a running engine.

vLLM builds its workers with this class mixed in (`worker_extension_cls`), and
the sampler calls these methods through `llm.collective_rpc`. Weights arrive as
safetensors bytes, which survive vLLM's rpc serialisation intact (tensors
would arrive as nested lists), and are loaded in place with
`reload_weights`, without restarting the engine.

Tied embeddings: on the CPU backend, the tied `lm_head` keeps a pre-packed copy
of the old embedding after `reload_weights`, so vLLM would silently sample from
the new body with the old output layer. Re-running the head's
`process_weights_after_loading` re-packs it; the parity test catches a miss.
"""

from __future__ import annotations


class WeightLoader:
    """Mixed into vLLM's worker class; `self` is the worker."""

    def load_safetensors(self, blob: bytes) -> int:
        from safetensors.torch import load

        weights = load(blob)
        model = self.model_runner.get_model()
        tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
        if tied:
            weights.pop("lm_head.weight", None)
        self.model_runner.reload_weights(weights_iterator=iter(weights.items()))
        head = getattr(model, "lm_head", None)
        method = getattr(head, "quant_method", None)
        if tied and method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(head)
        return len(weights)
