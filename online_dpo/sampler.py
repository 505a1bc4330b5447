"""Sampler actor: a vLLM engine that samples n completions per prompt.

Each completion carries its token ids, text, finish reason, per-token
log-probs (when asked) and the policy versions that made it: vLLM's
`get_weight_version()` when its request started, and when it finished.

Weights arrive through vLLM's weight-transfer API only (transfer.py):
- pushed by trainer rank 0 (`sync.transport: collective`): the trainer's
  engine calls `init_transfer` and `receive` here (syncer.py);
- pulled from the PolicyStore (`object_store`, or a LoRA adapter): a request
  carries the latest handle and the sampler loads it first.

The actor is threaded, so an update can land while a batch runs: every engine
step holds the engine lock, and `receive` takes it between two steps (vLLM's
"keep" pause: running requests stay, and go on with the new weights). With
`sync.in_flight: false` an update waits for the batch to finish instead. A
request that names a pushed version the sampler does not hold yet waits for
it (weight_sync.RECEIVE_SECONDS). A sampler that Ray restarted after a crash
comes back with the starting weights; the trainer sends it the current
version when the weight group re-forms.

Requests can overlap (`sampler.calls_in_flight`): each `generate` adds its
prompts to the one engine and steps it, one step at a time under the engine
lock, until its own requests are done; a step advances every running request,
so a request's first tokens ride on the last steps of the one before it
(continuous batching across requests; fewer, fuller steps per pair).

With `judge.in_sampler` the sampler also holds the run's rule judge: a
`generate(..., label=True)` returns its batch labelled, with no judge actor
and no round trip, and evaluation asks the sampler (`Judging`) for scores.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

from .engine import build_llm, use_env
from .judges.actor import Judging
from .specs import EngineSpec, JudgeSpec
from .types import Completion, SampleBatch, SampleGroup
from .weight_sync import EngineWeights, WeightsHandle

MAX_CONCURRENCY = 6   # generates (sampler.calls_in_flight), receive, and the probes beside them


class Sampler(Judging):
    def __init__(self, spec: EngineSpec, name: str = "sampler", on_gpu: bool = False, run: str = "run",
                 run_id: str = "", env: dict[str, str] | None = None, judge: JudgeSpec | None = None):
        use_env(env)   # engine_env, before vLLM's import
        self.name, self.in_flight = name, spec.in_flight_updates
        self.llm = build_llm(spec, on_gpu)
        if judge is not None:   # judge.in_sampler: a rule judge, built beside the engine
            from .judges import build_judge
            self.judge, self.margin = build_judge(judge), judge.margin
        self.weights = EngineWeights(spec.transfer)
        self.batch = threading.Lock()    # one generate (or score) at a time
        self.engine = TurnLock()         # one engine step, or one weight update, at a time, in turn
        self.done: dict[str, tuple] = {}   # request id -> (its finished output, the version then)
        self.gauge, self.tags = _version_gauge(), {"run": run, "run_id": run_id or run, "sampler": name}
        self._report_version()

    def _run(self, inputs: list, params) -> list:
        """[(output, version when it finished)] for `inputs`, in order: added to the engine, which this
        thread steps (and any other generate in flight beside it) until they are all done."""
        with self.engine:
            added = self.llm.enqueue(inputs, params, lora_request=self.weights.lora, use_tqdm=False)
        ids = [rid.rsplit("-", 1)[0] for rid in added]   # vLLM's internal ids: "<request id>-<suffix>"
        want, outs = set(ids), {}
        while want:
            with self.engine:
                for rid in want & self.done.keys():
                    outs[rid] = self.done.pop(rid)
                want -= outs.keys()
                if want:
                    finished = [o for o in self.llm.llm_engine.step() if o.finished]
                    self.done.update((o.request_id, (o, self.weights.version)) for o in finished)
        return [outs[rid] for rid in ids]

    def _generating(self):
        """Updates in flight: generates overlap; otherwise one at a time (updates wait between them)."""
        return contextlib.nullcontext() if self.in_flight else self.batch

    def _report_version(self) -> None:
        if self.gauge is not None:
            self.gauge.set(self.weights.version, tags=self.tags)

    def ready(self) -> dict:
        return {"name": self.name, "pid": os.getpid(), "version": self.weights.version}

    def policy_version(self) -> int:
        return self.weights.version

    def context(self) -> int:
        """The engine's context length (sampler.max_model_len, else the model's)."""
        return self.llm.llm_engine.model_config.max_model_len

    def render_prompts(self, rows: list, fmt: str, system_prompt: str | None) -> list[list[int]]:
        """The run's prompt rows rendered and tokenized with the engine's tokenizer (data.renderer): the
        driver reads the rows and filters them, and never loads a tokenizer itself."""
        from .data import renderer

        return renderer(self.llm.get_tokenizer())(rows, fmt, system_prompt)

    def generate(self, prompt_ids: list[list[int]], prompts: list[str], *, n: int, temperature: float,
                 top_p: float = 1.0, max_tokens: int = 64, seed: int | None = None,
                 weights: WeightsHandle | None = None, logprobs: bool = False, label: bool = False) -> SampleBatch:
        """n completions for each tokenized prompt; `prompts` are the raw texts the judge sees. `label`:
        the sampler's own judge labels them too (judge.in_sampler).

        Request i is seeded with `seed + i`, so a request gives the same completions
        on any sampler holding the same weights."""
        from vllm import SamplingParams, TokensPrompt

        load_seconds = self.load_weights(weights) if self.weights.wants(weights) else 0.0
        with self._generating():
            start, version = time.time(), self.weights.version
            params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                     logprobs=0 if logprobs else None, seed=None if seed is None else seed + i)
                      for i in range(len(prompt_ids))]
            outs = self._run([TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids], params)
        groups = []
        for raw, ids, (out, end) in zip(prompts, prompt_ids, outs):
            comps = tuple(
                Completion(token_ids=tuple(c.token_ids), text=c.text,
                           finish_reason=c.finish_reason or "length", policy_version=version, end_version=end,
                           logprobs=tuple(next(iter(d.values())).logprob for d in (c.logprobs or [])))
                for c in out.outputs)
            groups.append(SampleGroup(prompt=raw, prompt_ids=tuple(ids), completions=comps))
        ended = time.time()
        labels = self.label(groups) if label else None
        return SampleBatch(groups=tuple(groups), version=version, seconds=ended - start, load_seconds=load_seconds,
                           ended=ended, labels=labels, judge_seconds=time.time() - ended if label else 0.0)

    def score_tokens(self, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        """vLLM's log-prob of each response token given the prompt (for parity checks)."""
        from vllm import SamplingParams, TokensPrompt

        seq = list(prompt_ids) + list(response_ids)
        with self._generating():
            out = self._run([TokensPrompt(prompt_token_ids=seq)], [SamplingParams(max_tokens=1, prompt_logprobs=0)])[0][0]
        lps = out.prompt_logprobs[len(prompt_ids):]
        return [d[tok].logprob for d, tok in zip(lps, response_ids)]

    def _update_lock(self) -> threading.Lock:
        """In flight: between two engine steps; otherwise between two batches."""
        return self.engine if self.in_flight else self.batch

    def init_transfer(self, init_info: dict) -> None:
        """vLLM's `init_weight_transfer_engine` for a new generation of the weight group (syncer.py)."""
        from .cluster import node_ip

        if self.weights.backend == "gloo":
            init_info = dict(init_info, bind_address=node_ip())
        with self.engine:
            self.llm.init_weight_transfer_engine({"init_info": init_info})

    def receive(self, update_info: dict, serial: int, version: int) -> float:
        """One pushed version: vLLM's start, update and finish, between two engine steps; returns seconds."""
        with self._update_lock():
            seconds = self.weights.receive(self.llm, update_info, serial, version)
        self._report_version()
        return seconds

    def checksums(self) -> tuple[int, dict]:
        """(serial held, vLLM's `compute_weight_checksums` of the weights held), for a checked sync."""
        with self.engine:
            return self.weights.serial, self.llm.llm_engine.collective_rpc("compute_weight_checksums")[0]

    def load_weights(self, handle: WeightsHandle) -> float:
        """Move to a published version now (pulled from the store, or waited for); returns seconds."""
        if handle.transport == "collective":
            seconds = self.weights.wait(handle.serial)
        else:
            with self._update_lock():
                seconds = self.weights.load(self.llm, handle)
        self._report_version()
        return seconds


class TurnLock:
    """A lock taken in the order it was asked for. A thread that steps the engine in a loop would take a
    plain `threading.Lock` straight back after releasing it, so a generate that wants to add its requests,
    or an update that wants to land between two steps, could wait for the whole batch."""

    def __init__(self):
        self.turns = threading.Condition()
        self.next = self.serving = 0

    def __enter__(self):
        with self.turns:
            mine, self.next = self.next, self.next + 1
            self.turns.wait_for(lambda: self.serving == mine)

    def __exit__(self, *exc):
        with self.turns:
            self.serving += 1
            self.turns.notify_all()


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
