"""The plain, frozen arguments each component takes. plan.py builds them from the config, once.

No component below the plan reads the config: a sampler gets an `EngineSpec`,
the learner a `LearnerSpec`, a judge a `JudgeSpec`, a serve replica a
`ServerSpec`, and each actor group an `Ask` that both places it (topology.py,
gang.py, serve) and checks that the cluster can hold it (placement.py).
Imports nothing heavy: no torch, no Ray, no vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The run's actors are scheduled on their own, never inside a placement group the caller runs in
# (a Ray Tune trial's, for `online-dpo tune`): Ray would otherwise try to fit them into its bundle.
OWN_PLACEMENT = {"scheduling_strategy": "DEFAULT"}


@dataclass(frozen=True)
class Ask:
    """What one actor group asks the cluster for: `count` actors of `resources` each."""
    group: str                 # "sampler", "judge", "trainer", "serve"
    count: int
    resources: dict[str, float]   # CPU, GPU and custom resources per actor (CPU left out when 0)
    labels: dict[str, str] = field(default_factory=dict)
    strategy: str | None = None  # the trainer gang's placement group strategy
    fields: str = ""           # the config fields to change when it does not fit

    @property
    def cpus(self) -> float:
        return self.resources.get("CPU", 0.0)

    @property
    def gpus(self) -> float:
        return self.resources.get("GPU", 0.0)

    @property
    def custom(self) -> dict[str, float]:
        return {k: v for k, v in self.resources.items() if k not in ("CPU", "GPU")}

    def actor_options(self) -> dict:
        """Ray actor options that place one actor of this ask."""
        out: dict = {"num_cpus": self.cpus, "num_gpus": self.gpus, **OWN_PLACEMENT}
        if self.custom:
            out["resources"] = self.custom
        if self.labels:
            out["label_selector"] = dict(self.labels)
        return out


def threads(num_cpus: float, explicit: int | None) -> int:
    """torch/OpenMP threads of an actor: as configured, else one per CPU it holds."""
    return explicit or max(1, int(num_cpus))


def resources(cpus: float, gpus: float, extra: dict[str, float]) -> dict[str, float]:
    out = {"CPU": cpus} if cpus else {}
    if gpus:
        out["GPU"] = gpus
    out.update(extra)
    return out


@dataclass(frozen=True)
class Names:
    """The Ray names of one run's actors and Serve app, unique per run (`run_id`), so that runs share a
    cluster: concurrent tune trials, or two serve-enabled runs. Messages use the short names (sampler-0)."""
    run_id: str

    def actor(self, short: str) -> str:
        return f"{self.run_id}.{short}"

    @property
    def files(self) -> str:
        return self.actor("file-server")

    @property
    def store(self) -> str:
        return self.actor("policy-store")

    @property
    def app(self) -> str:
        return f"online-dpo-{self.run_id}"


@dataclass(frozen=True)
class EngineSpec:
    """Plain arguments for building a vLLM engine."""
    model: str
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.85
    kv_cache_gib: float = 1.0   # the KV cache on CPU
    seed: int = 0
    trust_remote_code: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    lora_rank: int | None = None   # serve LoRA adapters of up to this rank (one slot: the policy's adapter)
    file_server: Any = None   # fetches `model` when this node cannot see it (artifacts.py)
    transfer: str | None = None   # vLLM weight-transfer backend (nccl | gloo) of an engine that follows the policy
    in_flight_updates: bool = True   # a sampler takes an update between two engine steps (else between batches)


@dataclass(frozen=True)
class GroupSpec:
    """An actor group of samplers or judges: what each actor is built from, and where it goes."""
    kind: str                  # "sampler" or "judge": actors are named kind-0, kind-1, ...
    ask: Ask
    max_restarts: int
    env: dict[str, str]        # the actors' environment (threads, vLLM's settings)
    spec: Any                  # EngineSpec (samplers) or JudgeSpec (judges)
    on_gpu: bool = False
    call_timeout: float = 600.0   # a call running longer means a hung actor (run.call_timeout)

    section: str = ""            # its config section, where that is not `kind` (eval.judge)
    judge: Any = None            # samplers: the JudgeSpec of a rule judge they run themselves (judge.in_sampler)

    @property
    def restarts_field(self) -> str:
        return f"{self.section or self.kind}.max_restarts"


@dataclass(frozen=True)
class Principle:
    """One principle of a constitutional judge."""
    name: str
    text: str
    weight: float = 1.0


@dataclass(frozen=True)
class Endpoint:
    """Where an endpoint judge (judge.kind: openai) sends its requests, and how."""
    base_url: str
    mode: str = "pairwise"               # pairwise | score
    api_key_env: str | None = None       # the variable holding the key (read on the judge's node)
    concurrency: int = 8
    timeout: float = 30.0
    retries: int = 3
    logprobs: bool = False               # score mode: the rating expected under the first token's log-probs


@dataclass(frozen=True)
class JudgeSpec:
    """Plain arguments for one judge (judges/registry.py); an ensemble's members are JudgeSpecs too."""
    kind: str
    margin: float = 0.0
    function: str | None = None          # rule: 'pkg.module:function'
    model: str | None = None             # reward_model / llm / constitutional: a path or hub id
    batch_size: int = 16
    max_length: int = 1024
    template: str | None = None
    max_new_tokens: int = 8
    constrained: bool = True
    engine: dict[str, Any] = field(default_factory=dict)
    members: tuple[JudgeSpec, ...] = ()  # ensemble
    principles: tuple[Principle, ...] = ()   # constitutional
    name: str = "judge"                  # an ensemble member's objective name
    weight: float = 1.0                  # an ensemble member's weight
    normalize: bool = False              # an ensemble member's z-scoring
    file_server: Any = None
    endpoint: Endpoint | None = None     # openai: the endpoint
    app: str | None = None               # deployment: the Serve application of a shared judge
    caller: str = ""                     # deployment: the run, as the shared judge counts its requests


@dataclass(frozen=True)
class LearnerSpec:
    """Plain arguments for the learner's workers (worker.py, step.py)."""
    policy: str
    reference: str
    dtype: str = "float32"
    loss: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5      # SimPO's target reward margin
    length_penalty: float = 0.0   # R-DPO's alpha per token of length difference
    lr: float = 1e-6
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    batch_size: int = 32
    micro_batch_size: int = 8
    micro_batch_tokens: int | None = None   # size micro-batches by padded tokens instead of pairs
    max_steps: int = 100          # the length of the learning-rate schedule
    strategy: str = "ddp"         # ddp | fsdp (sharding.py)
    logprob_chunk: int | None = None   # LM head in chunks of this many positions (no full fp32 logits)
    pack_sequences: bool = True   # run the model on sequences packed into rows, not padded (sequences.Packing)
    attention: str | None = None  # transformers' attn_implementation for policy and reference (None: its default)
    checkpoint_every_layers: int = 0   # recompute every k-th decoder layer in backward (0: off)
    liger_kernels: bool = False   # Liger's fused RMSNorm, SwiGLU, RoPE and linear cross-entropy (CUDA)
    seed: int = 0
    num_threads: int | None = None
    trust_remote_code: bool = False
    lora: dict | None = None      # {rank, alpha, dropout, target_modules}: train PEFT LoRA adapters
    weights_transport: str = "object_store"   # object_store | collective (syncer.py)
    transfer: str = "gloo"        # collective: vLLM's weight-transfer backend (nccl on GPU, gloo on CPU)
    bucket_bytes: int = 64 << 20  # bytes per packed chunk
    store_copy: bool = False      # collective: also put each version in the store (serve replicas read it)
    verify: str = "first"         # sync.verify: off | first | every (send checksums for the controller to compare)
    engine_dtype: str = "float32"   # the samplers' dtype (what their checksums are of)
    file_server: Any = None   # fetches local model paths this node cannot see (artifacts.py)


@dataclass(frozen=True)
class GangSpec:
    """The Ray Train gang: its workers' ask, how often it may restart, where checkpoints go."""
    ask: Ask
    use_gpu: bool
    max_failures: int
    keep_checkpoints: int
    storage: str | None        # None: <run dir>/ray


@dataclass(frozen=True)
class Sampling:
    """How samplers sample for training (n >= 2) and for evaluation (n = 1)."""
    n: int = 2
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    logprobs: bool = False

    def kwargs(self) -> dict:
        return {"n": self.n, "temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens,
                "logprobs": self.logprobs}


@dataclass(frozen=True)
class RolloutSpec:
    """Lock-step or pipelined rollouts (rollout.py)."""
    mode: str                  # sync | async
    sampling: Sampling
    seed: int
    capacity: int              # pairs the buffer holds
    prompts_per_call: int      # async: prompts per sampler request
    calls_in_flight: int       # async: requests each sampler runs at once (sampler.py)
    judge_in_sampler: bool     # samplers label their own batches (judge.in_sampler): no judge calls
    max_lag: int               # versions a training pair may lag behind the learner (0 in lock step)


@dataclass(frozen=True)
class DataSpec:
    """Where prompts come from and how they are rendered (data.py)."""
    source: str
    split: str = "train"
    eval_source: str | None = None
    eval_split: str = "test"
    prompt_field: str = "prompt"
    format: str = "plain"
    system_prompt: str | None = None
    max_prompt_tokens: int = 256
    max_new_tokens: int = 64             # the sampler's: a prompt leaves it room in the context
    max_model_len: int | None = None     # sampler.max_model_len (None: the model's own context)
    shuffle: bool = True
    seed: int = 0
    eval_prompts: int = 64


@dataclass(frozen=True)
class EvalSpec:
    """Held-out evaluation: how many prompts, how often, sampled how."""
    prompts: int
    every_steps: int
    sampling: Sampling


@dataclass(frozen=True)
class ServerSpec:
    """Plain arguments for a serve replica."""
    model: str
    served_name: str
    dtype: str = "auto"
    max_model_len: int | None = None
    default_max_tokens: int = 128
    api_key_env: str | None = None
    api_key_sha256: str | None = None    # the replicas hold a hash of the key, never the key
    store_name: str = "policy-store"     # the run's PolicyStore actor (Names.store)
    store_namespace: str | None = None   # where the PolicyStore lives; None = no live updates
    poll_seconds: float = 0.5
    max_drain_seconds: float = 30.0
    max_body_bytes: int = 2 << 20
    max_n: int = 16
    max_request_tokens: int = 65536     # prompts x n x max_tokens per request
    gpu_memory_utilization: float = 0.85
    kv_cache_gib: float = 1.0            # the KV cache on CPU
    engine: dict[str, Any] = field(default_factory=dict)
    lora_rank: int | None = None      # model.lora runs: serve the base model with the policy's adapter
    adapter_dir: str | None = None    # a LoRA run's final adapter (PEFT format) to start from
    file_server: Any = None   # fetches `model` when this node cannot see it (artifacts.py)


@dataclass(frozen=True)
class ServePlan:
    """A Serve deployment: the replicas' spec, their deployment options and the proxy's address."""
    spec: ServerSpec
    ask: Ask
    options: dict              # Ray Serve deployment options (replicas or autoscaling, actor options)
    host: str = "127.0.0.1"
    port: int = 8000
    route_prefix: str = "/"
    keep_alive: bool = False
    app_name: str = "online-dpo"       # the Serve application (Names.app for a run's own server)
