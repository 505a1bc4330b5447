"""The run YAML: schema, loading, `--set` overrides and readable errors. Imports only its building blocks (schema.py).

One file describes a run. It is validated here, at the edge, and plan.py turns it into one frozen
`RunPlan`; components get their part of the plan, never the config. Unknown keys, wrong types and
out-of-range values are refused as a `ConfigError` naming the dotted field and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from .schema import JudgeConfig, Placed, Section

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


class ConfigError(ValueError):
    """A run config that cannot be used; the message says what to change."""


class RunConfig(Section):
    name: str = Field("run", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    output_dir: str = "runs"
    seed: int = 0
    log_level: Literal["quiet", "info", "debug"] = "quiet"
    check_resources: bool = Field(True, description="refuse a plan the cluster cannot hold (off for autoscaling)")
    call_timeout: float = Field(600.0, gt=0, description="a sampler or judge call running longer: the actor is hung")
    stall_timeout: float = Field(1800.0, gt=0, description="no training step for this long stops the run (exit 1)")


class LoraSection(Section):
    """Train LoRA adapters instead of the full policy (PEFT); only the adapters travel at a sync."""
    rank: int = Field(8, ge=1, le=512)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"], min_length=1)


class ModelConfig(Section):
    policy: str = Field(..., min_length=1, description="HF directory, hub id, or embedded:reviews")
    reference: str | None = Field(None, description="defaults to the policy's starting weights")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="learner compute dtype (no float16: "
                                                                        "the learner has no loss scaling)")
    trust_remote_code: bool = False
    lora: LoraSection | None = Field(None, description="train LoRA adapters; leave out for full fine-tuning")


class DataConfig(Section):
    source: str = Field(..., min_length=1, description="hub id, local json/jsonl/parquet, or embedded:reviews")
    split: str = "train"
    eval_source: str | None = None
    eval_split: str = "test"
    prompt_field: str = "prompt"
    format: Literal["plain", "chat"] = "plain"
    system_prompt: str | None = None
    max_prompt_tokens: int = Field(256, gt=0)
    shuffle: bool = True


class SamplerConfig(Placed):
    num_actors: int = Field(1, ge=1)
    tensor_parallel_size: int = Field(1, ge=1)
    num_threads: int | None = Field(None, ge=1, description="torch/OpenMP threads per actor on CPU")
    n: int = Field(2, ge=2, description="completions per prompt")
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(64, gt=0)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    kv_cache_gib: float = Field(1.0, gt=0, description="CPU KV cache in GiB (vLLM's kv_cache_memory_bytes)")
    max_model_len: int | None = Field(None, gt=0)
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    logprobs: bool = Field(False, description="return the sampler's per-token log-probs (costs ~25% speed)")
    prompts_per_call: int | None = Field(None, gt=0, description="async: prompts per sampler request")
    calls_in_flight: int = Field(1, ge=1, le=4, description="async: requests each sampler runs at once, batched "
                                                            "together in its engine (needs sync.in_flight)")
    max_restarts: int = Field(3, ge=0, description="Ray restarts of a crashed sampler")
    engine: dict[str, Any] = Field(default_factory=dict, description="extra vllm.LLM arguments")


class TrainConfig(Section):
    num_workers: int = Field(1, ge=1)
    num_cpus_per_worker: float = Field(1.0, ge=0)
    use_gpu: bool = False
    num_threads: int | None = Field(None, ge=1)
    resources_per_worker: dict[str, float] = Field(default_factory=dict, description="custom Ray resources")
    node_labels: dict[str, str] = Field(default_factory=dict)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    loss: Literal["sigmoid", "ipo", "hinge", "robust", "sigmoid_norm", "simpo"] = "sigmoid"
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: target reward margin")
    length_penalty: float = Field(0.0, ge=0, description="R-DPO alpha: preference put down to length, per token")
    beta: float = Field(0.1, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    lr: float = Field(1e-6, gt=0, le=1)
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    batch_size: int = Field(32, gt=0, description="pairs per optimizer step, all workers together")
    micro_batch_size: int | None = Field(8, gt=0, description="pairs per worker per forward pass; null: a "
                                                              "worker's whole share of the batch in one pass")
    micro_batch_tokens: int | None = Field(None, gt=0, description="size micro-batches by padded tokens instead")
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="ddp: a copy per worker; fsdp: FSDP2 shards it all")
    logprob_chunk: int | None = Field(None, gt=0, description="LM head in chunks of this many positions")
    pack_sequences: bool = Field(True, description="run the model on sequences packed end to end, not padded")
    attention: Literal["eager", "sdpa", "flash_attention_2", "flex_attention"] | None = Field(
        None, description="transformers' attn_implementation for the learner's policy and reference")
    checkpoint_every_layers: int = Field(0, ge=0, description="recompute every k-th decoder layer in backward")
    liger_kernels: bool = Field(False, description="Liger's fused Triton kernels; needs train.use_gpu")
    max_steps: int = Field(100, gt=0)
    max_failures: int = Field(3, ge=-1, description="Ray Train restarts of the gang from its latest checkpoint")
    max_kl: float | None = Field(None, gt=0, description="stop once the KL (nats/seq, last 5 steps) passes this")
    seed: int | None = None

    @model_validator(mode="after")
    def _divides(self):
        per_pass = self.num_workers * (self.micro_batch_size or 0)
        if self.batch_size % self.num_workers:
            raise ValueError(f"train.batch_size ({self.batch_size}) must be a multiple of train.num_workers "
                             f"({self.num_workers})")
        if self.liger_kernels and not self.use_gpu:
            raise ValueError("train.liger_kernels needs train.use_gpu: true (Liger's kernels are Triton, CUDA "
                             "only); set train.liger_kernels: false on CPU")
        if self.micro_batch_tokens is None and self.micro_batch_size and self.batch_size % per_pass:
            raise ValueError(
                f"train.batch_size ({self.batch_size}) must be a multiple of train.num_workers x "
                f"train.micro_batch_size ({self.num_workers} x {self.micro_batch_size} = {per_pass}); "
                f"gradient accumulation steps are batch_size / that product")
        return self


class SyncConfig(Section):
    every_steps: int = Field(1, ge=1, description="publish the weights every N steps (and at the last)")
    mode: Literal["sync", "async"] = Field("sync", description="sync: lock-step; async: samplers run ahead")
    max_policy_lag: int = Field(1, ge=0, description="async: train on pairs at most this many versions old")
    buffer_pairs: int | None = Field(None, gt=0, description="async: pairs sampled ahead of the learner (default: two batches)")
    transport: Literal["object_store", "collective"] = Field(
        "object_store", description="Ray's object store, or pushed by trainer rank 0 through vLLM's transfer engines")
    bucket_mb: int = Field(64, ge=1, description="MiB per packed chunk (one broadcast each)")
    in_flight: bool = Field(True, description="an update lands between two engine steps, not two sampler batches")
    gpu_backend: Literal["nccl", "ipc"] = Field(
        "nccl", description="collective on GPUs: vLLM's NCCL engines, or IPC when samplers share the learner's GPUs")
    verify: Literal["off", "first", "every"] = Field(
        "first", description="compare vLLM's weight checksums with the trainer's after the first sync, or every")

    @model_validator(mode="after")
    def _lag(self):
        if self.mode == "async" and self.max_policy_lag < 1:
            raise ValueError("sync.mode 'async' needs sync.max_policy_lag >= 1 (with 0, use sync.mode: sync)")
        return self


class CheckpointConfig(Section):
    storage: str | None = Field(None, description="Ray Train storage path; default <run dir>/ray")
    every_steps: int = Field(0, ge=0, description="0 = only the final policy")
    keep: int = Field(2, ge=1)


class EvalConfig(Section):
    prompts: int = Field(64, ge=0, description="held-out prompts scored at start and end; 0 = off")
    every_steps: int = Field(0, ge=0, description="also evaluate every N steps (0: only at start and end)")
    temperature: float = Field(1.0, ge=0, description="sampling temperature of the held-out responses")
    judge: JudgeConfig | None = Field(None, description="an independent judge scoring the held-out responses too")


class PairsConfig(Section):
    log: bool = Field(True, description="write every judged pair to RUN_DIR/pairs/ (Parquet)")


class ServeConfig(Placed):
    enabled: bool = Field(False, description="deploy the policy server at the start of training")
    keep_alive: bool = Field(False, description="after training, keep serving until Ctrl-C")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = Field("/", pattern=r"^/")
    model_name: str | None = Field(None, description="name clients pass as `model`; default: run.name")
    num_replicas: int = Field(1, ge=1)
    min_replicas: int | None = Field(None, ge=0, description="autoscaling lower bound")
    max_replicas: int | None = Field(None, ge=1, description="autoscaling upper bound")
    num_threads: int | None = Field(None, ge=1, description="engine threads on CPU; default num_cpus - 1, >= 1")
    max_ongoing_requests: int = Field(64, ge=1)
    default_max_tokens: int = Field(128, ge=1)
    api_key_env: str | None = Field(None, description="environment variable holding the API key")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    kv_cache_gib: float = Field(1.0, gt=0, description="CPU KV cache in GiB per replica")
    max_model_len: int | None = Field(None, gt=0)
    poll_seconds: float = Field(0.5, gt=0, description="how often replicas look for a new policy version")
    max_drain_seconds: float = Field(30.0, gt=0, description="a load aborts requests still running after this")
    max_body_bytes: int = Field(2 << 20, ge=1024, description="larger request bodies get 413")
    max_n: int = Field(16, ge=1, description="most choices (n) one request may ask for")
    max_request_tokens: int = Field(65536, ge=1, description="most prompts x n x max_tokens one request may ask for")
    allow_unauthenticated: bool = Field(False, description="serve beyond loopback without serve.api_key_env")
    engine: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _bounds(self):
        if self.max_replicas is not None and self.max_replicas < max(self.num_replicas, self.min_replicas or 0):
            raise ValueError("serve.max_replicas must be at least serve.num_replicas and serve.min_replicas")
        return self


class MetricsConfig(Section):
    log_every_steps: int = Field(1, ge=1)
    tensorboard: bool = False
    wandb: bool = False


class Config(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig
    data: DataConfig
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    judge: JudgeConfig = Field(default_factory=lambda: JudgeConfig(
        function="online_dpo.judges.rule:vader_compound"))
    train: TrainConfig = Field(default_factory=TrainConfig)
    sync: SyncConfig = Field(default_factory=SyncConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    pairs: PairsConfig = Field(default_factory=PairsConfig)

    @model_validator(mode="after")
    def _cross(self):
        if self.sampler.num_gpus == 0 and self.sampler.tensor_parallel_size > 1:
            raise ValueError("sampler.tensor_parallel_size > 1 needs GPUs: set sampler.num_gpus")
        if self.model.lora is not None and self.model.reference not in (None, self.model.policy):
            raise ValueError("model.lora: the reference is the policy with its adapters disabled; leave "
                             "model.reference out (or equal to model.policy)")
        if self.eval.judge is not None and self.eval.judge.in_sampler:
            raise ValueError("eval.judge.in_sampler: the held-out judge always runs in its own actors; leave "
                             "eval.judge.in_sampler out (judge.in_sampler is the training judge's)")
        return self


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read, override and validate a run YAML; raise ConfigError on any problem."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if raw is None:
        raise ConfigError(f"{path} is empty: a run config needs at least 'model' and 'data' sections")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (model:, data:, ...), "
                          f"not a {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return validate(raw, source=str(path))


def validate(raw: dict, source: str = "config") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_errors(e, source)) from None


def apply_override(raw: dict, item: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set '{item}' must look like section.field=value, e.g. train.lr=1e-5")
    parts = key.strip().split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: '{'.'.join(parts[:i + 1])}' is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(value) if value.strip() else None


def format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parent = e["loc"][:-1]
            allowed = _fields_at(parent)
            msg = f"unknown key; allowed here: {', '.join(allowed)}" if allowed else "unknown key"
        elif e["type"] == "missing":
            msg = "required field is missing"
        got = e.get("input")
        shown = "" if e["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {where}: {msg}{shown}")
    return f"invalid config {source}:\n" + "\n".join(lines)


def _fields_at(loc: tuple) -> list[str]:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def dump(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

