"""Sampler actor: a vLLM engine that samples n completions per prompt.

Each completion carries its token ids, text, finish reason, the policy
version that made it, and (when asked) per-token log-probs. A request may
carry the latest published weights (`weights`): the sampler loads them first
if it holds another version, so a load always lands between two batches and
never mixes versions inside one (the actor runs one call at a time). A
sampler that Ray restarted after a crash comes back with the starting
weights and moves to the current version with its next request.
"""

from __future__ import annotations

import os
import time

from .engine import build_llm
from .specs import EngineSpec
from .types import Completion, SampleBatch, SampleGroup
from .weight_sync import EngineWeights, WeightsHandle


class Sampler:
    def __init__(self, spec: EngineSpec, name: str = "sampler", on_gpu: bool = False, run: str = "run"):
        self.name = name
        self.llm = build_llm(spec, on_gpu)
        self.weights = EngineWeights()
        self.gauge, self.tags = _version_gauge(), {"run": run, "sampler": name}
        self._report_version()

    def _report_version(self) -> None:
        if self.gauge is not None:
            self.gauge.set(self.weights.version, tags=self.tags)

    def ready(self) -> dict:
        return {"name": self.name, "pid": os.getpid(), "version": self.weights.version}

    def policy_version(self) -> int:
        return self.weights.version

    def generate(self, prompt_ids: list[list[int]], prompts: list[str], *, n: int, temperature: float,
                 top_p: float = 1.0, max_tokens: int = 64, seed: int | None = None,
                 weights: WeightsHandle | None = None, logprobs: bool = False) -> SampleBatch:
        """n completions for each tokenized prompt; `prompts` are the raw texts the judge sees.

        Request i is seeded with `seed + i`, so a request gives the same completions
        on any sampler holding the same weights."""
        from vllm import SamplingParams, TokensPrompt

        load_seconds = self.load_weights(weights) if self.weights.wants(weights) else 0.0
        start = time.time()
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                 logprobs=0 if logprobs else None, seed=None if seed is None else seed + i)
                  for i in range(len(prompt_ids))]
        inputs = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids]
        outs = self.llm.generate(inputs, params, use_tqdm=False, lora_request=self.weights.lora)
        version = self.weights.version
        groups = []
        for raw, ids, out in zip(prompts, prompt_ids, outs):
            comps = tuple(
                Completion(token_ids=tuple(c.token_ids), text=c.text,
                           finish_reason=c.finish_reason or "length", policy_version=version,
                           logprobs=tuple(next(iter(d.values())).logprob for d in (c.logprobs or [])))
                for c in out.outputs)
            groups.append(SampleGroup(prompt=raw, prompt_ids=tuple(ids), completions=comps))
        return SampleBatch(groups=tuple(groups), version=version, seconds=time.time() - start,
                           load_seconds=load_seconds)

    def score_tokens(self, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        """vLLM's log-prob of each response token given the prompt (for parity checks)."""
        from vllm import SamplingParams, TokensPrompt

        seq = list(prompt_ids) + list(response_ids)
        out = self.llm.generate([TokensPrompt(prompt_token_ids=seq)], SamplingParams(max_tokens=1, prompt_logprobs=0),
                                use_tqdm=False, lora_request=self.weights.lora)[0]
        lps = out.prompt_logprobs[len(prompt_ids):]
        return [d[tok].logprob for d, tok in zip(lps, response_ids)]

    def join_weight_group(self, spec, first_rank: int) -> list[int]:
        """Listen to a generation of the collective weight group (collective.py): one rank per engine worker."""
        return self.llm.collective_rpc("join_weight_group",
                                       args=(spec.host, spec.port, spec.gen, spec.world, first_rank))

    def load_weights(self, handle: WeightsHandle) -> float:
        """Load a published version now; returns seconds."""
        seconds = self.weights.load(self.llm, handle)
        self._report_version()
        return seconds


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
