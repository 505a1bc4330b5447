"""vLLM engines: how they are built, and how new weights get into a running one.

Samplers, the LLM judge and serve replicas all build their engines here, so
the environment and engine arguments are decided in one place. On CPU the
engine core runs in the calling process (no IPC per step, and weights load
without crossing a process boundary) and runs eagerly: measured on 2 cores
with the embedded default, compiling costs ~18 s at start for no faster
sampling (the decode loop is bound by Python, not by matmuls).

`WeightLoader` is mixed into vLLM's worker class (`worker_extension_cls`);
callers reach it through `collective_rpc("load_packed", ...)`. Weights arrive
as one flat byte buffer and its layout (weight_sync.pack), which survive vLLM's
rpc serialisation intact (tensors would arrive as nested lists), and are
loaded in place with `reload_weights`, without restarting the engine. With
`sync.transport: collective` each worker instead joins the weight group
(`join_weight_group`), stages broadcast versions in a listener thread, and
`load_received` loads the staged one (collective.py).

Tied embeddings: on the CPU backend, the tied `lm_head` keeps a pre-packed copy
of the old embedding after `reload_weights`, so vLLM would silently sample from
the new body with the old output layer. Re-running the head's
`process_weights_after_loading` re-packs it; the parity test catches a miss.
"""

from __future__ import annotations

from .specs import EngineSpec

EXTENSION = "online_dpo.engine.WeightLoader"


def engine_env(num_threads: int, kv_cache_gib: int, on_gpu: bool, log_level: str,
               in_process: bool = True) -> dict[str, str]:
    """Environment for a process that builds a vLLM engine (set before vllm is imported).

    Threads are set explicitly: building an engine otherwise cuts torch in that
    process to one thread."""
    env = {
        "OMP_NUM_THREADS": str(num_threads),
        "MKL_NUM_THREADS": str(num_threads),
        "VLLM_LOGGING_LEVEL": {"quiet": "WARNING", "info": "INFO", "debug": "DEBUG"}[log_level],
        "VLLM_CONFIGURE_LOGGING": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if not on_gpu:
        env.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "0" if in_process else "1",
                    "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
                    "VLLM_CPU_OMP_THREADS_BIND": "nobind"})
    return env


def engine_kwargs(model: str, dtype: str, max_model_len: int | None, gpu_memory_utilization: float,
                  extra: dict, on_gpu: bool, file_server=None, **more) -> dict:
    """vLLM engine arguments shared by samplers, LLM judges and serve replicas."""
    from .artifacts import local_model

    kwargs = dict(model=local_model(model, file_server), dtype=dtype, worker_extension_cls=EXTENSION, **more)
    if max_model_len:
        kwargs["max_model_len"] = max_model_len
    if on_gpu:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    else:
        kwargs["enforce_eager"] = True
    kwargs.update(extra)
    return kwargs


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)   # vLLM's allowed max_lora_rank values


def lora_kwargs(rank: int | None) -> dict:
    if not rank:
        return {}
    return {"enable_lora": True, "max_loras": 1, "max_lora_rank": min(r for r in VLLM_LORA_RANKS if r >= rank)}


def build_llm(spec: EngineSpec, on_gpu: bool):
    from vllm import LLM

    return LLM(**engine_kwargs(spec.model, spec.dtype, spec.max_model_len, spec.gpu_memory_utilization,
                               spec.extra, on_gpu, spec.file_server, seed=spec.seed,
                               tensor_parallel_size=spec.tensor_parallel_size,
                               trust_remote_code=spec.trust_remote_code, **lora_kwargs(spec.lora_rank)))


class WeightLoader:
    """Mixed into vLLM's worker class; `self` is the worker."""

    def load_packed(self, blob: bytes, layout) -> int:
        """Load weights packed by weight_sync.pack (bytes + layout) in place."""
        from .weight_sync import unpack

        return self._load(unpack(bytearray(blob), layout))   # writable: the loader may copy from these views

    def join_weight_group(self, host: str, port: int, gen: int, world: int, first_rank: int) -> int:
        """Listen to a generation of the collective weight group (collective.py); returns this worker's rank."""
        from .collective import GroupSpec, Receiver

        if getattr(self, "weight_receiver", None) is None:
            import torch

            self.weight_receiver = Receiver(getattr(self, "device", None) or torch.device("cpu"))
        rank = first_rank + _tp_rank()
        self.weight_receiver.join(GroupSpec(host, port, gen, world), rank)
        return rank

    def load_received(self, serial: int, layout, timeout: float):
        """Load the version the collective group delivered (serial or newer) in place;
        (serial, version) loaded, or None if it did not arrive within `timeout` seconds."""
        from .weight_sync import unpack

        receiver = getattr(self, "weight_receiver", None)
        got = receiver.wait(serial, timeout) if receiver is not None else None
        if got is None:
            return None
        self._load(unpack(got[2], layout))
        return got[0], got[1]

    def _load(self, weights: dict) -> int:
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


def _tp_rank() -> int:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank()
    except Exception:
        return 0
