"""vLLM engines: how they are built (their environment and engine arguments).

Samplers, the LLM judge and serve replicas all build their engines here, so
the environment and engine arguments are decided in one place. On CPU the
engine core runs in the calling process (no IPC per step, and weights load
without crossing a process boundary) and runs eagerly: measured on 2 cores
with the embedded default, compiling costs ~18 s at start for no faster
sampling (the decode loop is bound by Python, not by matmuls).

Engines that follow the policy are built with vLLM's weight-transfer config
(`transfer`: its backend), and take new weights only through that API
(transfer.py); the LLM judge's engine does not follow the policy and has none.
"""

from __future__ import annotations

from .specs import EngineSpec


def engine_env(num_threads: int, on_gpu: bool, log_level: str,
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
                    "VLLM_CPU_OMP_THREADS_BIND": "nobind"})
    return env


def use_env(env: dict[str, str] | None) -> None:
    """Apply engine_env in this actor's process, before it imports torch or vLLM. An actor created with
    the variables as a runtime_env needs a process of its own; without one it can take a worker Ray
    started with the cluster (one process fewer to start). Torch, if a reused worker imported it
    already, gets its thread count here."""
    import os
    import sys

    if not env:
        return
    os.environ.update(env)
    if "torch" in sys.modules and "OMP_NUM_THREADS" in env:
        sys.modules["torch"].set_num_threads(int(env["OMP_NUM_THREADS"]))


def engine_kwargs(model: str, dtype: str, max_model_len: int | None, gpu_memory_utilization: float,
                  extra: dict, on_gpu: bool, file_server=None, transfer: str | None = None,
                  kv_cache_gib: float = 1.0, **more) -> dict:
    """vLLM engine arguments shared by samplers, LLM judges and serve replicas; `transfer`: the
    weight-transfer backend of an engine that follows the policy (transfer.py). On CPU the KV cache
    is `kv_cache_gib` (vLLM zero-fills it while it starts: 1 GiB cost the embedded default's sampler
    1-3 s of its start-up on 2 cores, where its 64 sequences need 32 MiB)."""
    from .artifacts import local_model

    kwargs = dict(model=local_model(model, file_server), dtype=dtype, **more)
    if transfer:
        from .transfer import register

        register()   # this process builds the engine in process on CPU; others load the vLLM plugin
        kwargs["weight_transfer_config"] = {"backend": transfer}
    if max_model_len:
        kwargs["max_model_len"] = max_model_len
    if on_gpu:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    else:
        kwargs["enforce_eager"] = True
        kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
    kwargs.update(extra)
    return kwargs


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)   # vLLM's allowed max_lora_rank values


def lora_kwargs(rank: int | None) -> dict:
    if not rank:
        return {}
    return {"enable_lora": True, "max_loras": 1, "max_lora_rank": min(r for r in VLLM_LORA_RANKS if r >= rank)}


def build_llm(spec: EngineSpec, on_gpu: bool):
    """vLLM's offline engine; its import and build with the garbage collector paused (gc_pause.py)."""
    from .gc_pause import paused_gc

    with paused_gc():   # frozen once imported: vLLM's own full collections while it builds skip them
        from vllm import LLM
    with paused_gc():
        return LLM(**engine_kwargs(spec.model, spec.dtype, spec.max_model_len, spec.gpu_memory_utilization,
                                   spec.extra, on_gpu, spec.file_server, spec.transfer, spec.kv_cache_gib,
                                   seed=spec.seed,
                                   tensor_parallel_size=spec.tensor_parallel_size,
                                   trust_remote_code=spec.trust_remote_code, **lora_kwargs(spec.lora_rank)))
