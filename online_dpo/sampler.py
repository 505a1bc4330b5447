"""Sampler actor: a vLLM engine that samples n completions per prompt.

Each completion carries its token ids, text, finish reason, per-token
log-probs, and the policy version that made it. New weights arrive through
`load_weights` (see weight_sync.py) and are loaded in place into the running
engine. The actor runs one method at a time (Ray's default for a sync actor),
so a generate call never sees half-loaded weights: a sync waits for the
running batch to finish, and the next batch starts on the new version.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from .types import Completion, SampleGroup


@dataclass(frozen=True)
class EngineSpec:
    """Plain arguments for building a vLLM engine."""
    model: str
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.85
    seed: int = 0
    trust_remote_code: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    file_server: Any = None   # fetches `model` when this node cannot see it (artifacts.py)


def engine_env(num_threads: int, kv_cache_gib: int, on_gpu: bool, log_level: str,
               in_process: bool = True) -> dict[str, str]:
    """Environment for a process that builds a vLLM engine (set before vllm is imported).

    `in_process` keeps the CPU engine core inside the calling process, so weights
    load without crossing a process boundary and no step pays for IPC."""
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

    kwargs = dict(model=local_model(model, file_server), dtype=dtype,
                  worker_extension_cls="online_dpo.vllm_ext.WeightLoader", **more)
    if max_model_len:
        kwargs["max_model_len"] = max_model_len
    if on_gpu:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    else:
        kwargs["enforce_eager"] = True
    kwargs.update(extra)
    return kwargs


def build_llm(spec: EngineSpec, on_gpu: bool):
    from vllm import LLM

    return LLM(**engine_kwargs(spec.model, spec.dtype, spec.max_model_len, spec.gpu_memory_utilization,
                               spec.extra, on_gpu, spec.file_server, seed=spec.seed,
                               tensor_parallel_size=spec.tensor_parallel_size,
                               trust_remote_code=spec.trust_remote_code))


class Sampler:
    def __init__(self, spec: EngineSpec, name: str = "sampler", on_gpu: bool = False, run: str = "run"):
        self.name = name
        self.version = 0
        self.llm = build_llm(spec, on_gpu)
        self.gauge, self.tags = _version_gauge(), {"run": run, "sampler": name}
        self._report_version()

    def _report_version(self) -> None:
        if self.gauge is not None:
            self.gauge.set(self.version, tags=self.tags)

    def ready(self) -> dict:
        return {"name": self.name, "pid": os.getpid(), "version": self.version}

    def policy_version(self) -> int:
        return self.version

    def generate(self, prompt_ids: list[list[int]], prompts: list[str], *, n: int, temperature: float,
                 top_p: float = 1.0, max_tokens: int = 64, seed: int | None = None) -> list[SampleGroup]:
        """n completions for each tokenized prompt; `prompts` are the raw texts the judge sees."""
        from vllm import SamplingParams, TokensPrompt

        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                 logprobs=0, seed=None if seed is None else seed + i)
                  for i in range(len(prompt_ids))]
        inputs = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids]
        outs = self.llm.generate(inputs, params, use_tqdm=False)
        groups = []
        for raw, ids, out in zip(prompts, prompt_ids, outs):
            comps = tuple(
                Completion(token_ids=tuple(c.token_ids), text=c.text,
                           finish_reason=c.finish_reason or "length", policy_version=self.version,
                           logprobs=tuple(next(iter(d.values())).logprob for d in (c.logprobs or [])))
                for c in out.outputs)
            groups.append(SampleGroup(prompt=raw, prompt_ids=tuple(ids), completions=comps))
        return groups

    def score_tokens(self, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        """vLLM's log-prob of each response token given the prompt (for parity checks)."""
        from vllm import SamplingParams, TokensPrompt

        seq = list(prompt_ids) + list(response_ids)
        out = self.llm.generate([TokensPrompt(prompt_token_ids=seq)],
                                SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
        lps = out.prompt_logprobs[len(prompt_ids):]
        return [d[tok].logprob for d, tok in zip(lps, response_ids)]

    def load_weights(self, handle) -> int:
        from .weight_sync import get_transport

        blob = get_transport(handle.transport).fetch(handle)
        self.llm.collective_rpc("load_safetensors", args=(blob,))
        self.llm.reset_prefix_cache()
        self.version = handle.version
        self._report_version()
        return self.version


def _version_gauge():
    """The sampler's policy-version gauge when running under Ray, else None."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        from .metrics import sampler_version_gauge
        return sampler_version_gauge()
    except ImportError:
        return None
