"""The run plan: the config turned, once, into every component's spec and every actor group's ask.

    RunPlan.from_config(cfg)   cli.py and tune.py call it at the edge

Every rule derived from the config lives in one function here: which weight
transport a run uses (LoRA adapters always go through the object store), the
LoRA rank vLLM must accept, the threads and environment of each actor, what
each actor group asks the cluster for. `placement` checks the plan's asks,
`Topology` starts them, the `Gang` places its workers by its ask, and serve
deploys its own. Below the CLI and this module, nothing reads the config.

Checks that need more than the schema (local paths exist, a rule judge's
function imports, an option's package is installed) are made here too, and
raise `ConfigError` naming the field.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import secrets
from dataclasses import dataclass, field, replace
from pathlib import Path

from .config import Config, ConfigError, ServeConfig, dump
from .embedded import EMBEDDED, model_path
from .engine import engine_env
from .plan_judges import check_rules, judge_group, judge_models
from .schedule import Schedule
from .specs import (Ask, DataSpec, EngineSpec, EvalSpec, GangSpec, GroupSpec, LearnerSpec, Names, RolloutSpec,
                    Sampling, ServePlan, ServerSpec, resources, threads)


@dataclass(frozen=True)
class RunPlan:
    """One run, decided: what to start, where, with which arguments, on which schedule."""
    name: str
    names: Names                       # the Ray names of this run's actors and Serve app
    output_dir: str
    log_level: str
    check_resources: bool
    config_yaml: str                   # the resolved config, as config.yaml holds it
    config: dict                       # the same, as plain data (W&B)
    models: tuple[str, ...]            # every model and data name the run uses (to build the embedded one)
    data: DataSpec
    samplers: GroupSpec
    judges: GroupSpec | None           # None: the samplers run the judge themselves (judge.in_sampler)
    evaluators: GroupSpec | None       # eval.judge: an independent judge of the held-out responses
    learner: LearnerSpec
    gang: GangSpec
    rollouts: RolloutSpec
    schedule: Schedule
    eval: EvalSpec
    serve: ServePlan | None
    weights_transport: str             # object_store | collective
    max_kl: float | None = None
    stall_timeout: float = 1800.0      # no step for this long stops the run
    log_every_steps: int = 1
    tensorboard: bool = False
    wandb: bool = False
    pairs_log: bool = True             # RUN_DIR/pairs/ (pairs_log.py)
    asks: tuple[Ask, ...] = field(default=())
    resume_changes: tuple[str, ...] = ()   # what `--resume` changed: "field: old -> new"

    @classmethod
    def from_config(cls, cfg: Config) -> RunPlan:
        check_paths(cfg)
        check_imports(cfg)
        policy = model_path(cfg.model.policy)
        transport = weights_transport(cfg)
        names = Names(f"{cfg.run.name}-{secrets.token_hex(3)}")
        samplers = sampler_group(cfg, policy, names.files, transport)
        judges = judge_group(cfg, names.files, caller=names.run_id)
        if cfg.judge.in_sampler:
            samplers, judges = replace(samplers, judge=judges.spec), None
        evaluators = judge_group(cfg, names.files, evaluation=True, caller=names.run_id) if cfg.eval.judge else None
        gang = gang_spec(cfg)
        serve = serve_plan(cfg.serve, policy, cfg.serve.model_name or cfg.run.name, cfg.run.log_level,
                           lora_rank(cfg), file_server=names.files, names=names) if cfg.serve.enabled else None
        return cls(
            name=cfg.run.name, names=names, output_dir=cfg.run.output_dir, log_level=cfg.run.log_level,
            check_resources=cfg.run.check_resources, config_yaml=dump(cfg), config=cfg.model_dump(mode="json"),
            models=model_names(cfg), data=data_spec(cfg), samplers=samplers, judges=judges,
            evaluators=evaluators, pairs_log=cfg.pairs.log,
            learner=learner_spec(cfg, policy, transport, names.files), gang=gang, rollouts=rollout_spec(cfg),
            schedule=Schedule(cfg.train.max_steps, cfg.sync.every_steps, cfg.checkpoint.every_steps,
                              cfg.eval.every_steps),
            eval=EvalSpec(cfg.eval.prompts, cfg.eval.every_steps, eval_sampling(cfg)), serve=serve,
            weights_transport=transport, max_kl=cfg.train.max_kl, stall_timeout=cfg.run.stall_timeout,
            log_every_steps=cfg.metrics.log_every_steps,
            tensorboard=cfg.metrics.tensorboard, wandb=cfg.metrics.wandb,
            asks=(samplers.ask, gang.ask) + tuple(g.ask for g in (judges, evaluators, serve) if g))

    @classmethod
    def resumed(cls, path, overrides) -> RunPlan:
        """The plan of `--resume`: a run directory's config.yaml with overrides that only extend or tune
        the run (ConfigError naming a field that would make it another run)."""
        from .config import load_config

        new = load_config(path, overrides)
        return replace(cls.from_config(new), resume_changes=resume_changes(load_config(path), new))

    @property
    def needs_embedded(self) -> bool:
        return EMBEDDED in self.models


# ---------------------------------------------------------------- derived rules, each once

def weights_transport(cfg: Config) -> str:
    """LoRA adapters are a few MB and go through the object store; full weights as configured."""
    return "object_store" if cfg.model.lora else cfg.sync.transport


def lora_rank(cfg: Config) -> int | None:
    """The adapter rank vLLM engines must accept (None: full fine-tuning)."""
    return cfg.model.lora.rank if cfg.model.lora else None


def model_names(cfg: Config) -> tuple[str, ...]:
    names = [cfg.model.policy, cfg.model.reference, cfg.data.source, cfg.data.eval_source]
    return tuple(n for n in names + list(judge_models(cfg).values()) if n)


# ---------------------------------------------------------------- specs

def transfer_backend(cfg: Config, transport: str) -> str:
    """vLLM's weight-transfer backend for the samplers: vLLM's NCCL (or IPC) engines for a push on GPUs,
    else ours (gloo)."""
    return cfg.sync.gpu_backend if cfg.sampler.num_gpus > 0 and transport == "collective" else "gloo"


def sampler_group(cfg: Config, policy: str, files: str, transport: str) -> GroupSpec:
    s = cfg.sampler
    on_gpu = s.num_gpus > 0
    spec = EngineSpec(model=policy, dtype=s.dtype, tensor_parallel_size=s.tensor_parallel_size,
                      max_model_len=s.max_model_len, gpu_memory_utilization=s.gpu_memory_utilization,
                      kv_cache_gib=s.kv_cache_gib, seed=cfg.run.seed, trust_remote_code=cfg.model.trust_remote_code,
                      extra=dict(s.engine), lora_rank=lora_rank(cfg), file_server=files,
                      transfer=transfer_backend(cfg, transport), in_flight_updates=cfg.sync.in_flight)
    ask = Ask("sampler", s.num_actors, resources(s.num_cpus, s.num_gpus * s.tensor_parallel_size, s.resources),
              dict(s.node_labels), fields="sampler.num_actors / num_cpus / num_gpus / resources / node_labels")
    env = engine_env(threads(s.num_cpus, s.num_threads), on_gpu, cfg.run.log_level)
    return GroupSpec("sampler", ask, s.max_restarts, env, spec, on_gpu, cfg.run.call_timeout)


def learner_spec(cfg: Config, policy: str, transport: str, files: str) -> LearnerSpec:
    t = cfg.train
    reference = model_path(cfg.model.reference) if cfg.model.reference else policy
    return LearnerSpec(policy=policy, reference=reference, dtype=cfg.model.dtype, loss=t.loss, beta=t.beta,
                       label_smoothing=t.label_smoothing, simpo_gamma=t.simpo_gamma,
                       length_penalty=t.length_penalty, lr=t.lr, lr_schedule=t.lr_schedule,
                       warmup_steps=t.warmup_steps, weight_decay=t.weight_decay, grad_clip=t.grad_clip,
                       batch_size=t.batch_size, micro_batch_size=t.micro_batch_size or t.batch_size // t.num_workers,
                       micro_batch_tokens=t.micro_batch_tokens, max_steps=t.max_steps, strategy=t.strategy,
                       logprob_chunk=t.logprob_chunk, pack_sequences=t.pack_sequences, attention=t.attention,
                       checkpoint_every_layers=t.checkpoint_every_layers,
                       liger_kernels=t.liger_kernels, seed=cfg.run.seed if t.seed is None else t.seed,
                       num_threads=threads(t.num_cpus_per_worker, t.num_threads),
                       trust_remote_code=cfg.model.trust_remote_code,
                       lora=cfg.model.lora.model_dump() if cfg.model.lora else None,
                       weights_transport=transport, bucket_bytes=cfg.sync.bucket_mb << 20,
                       store_copy=cfg.serve.enabled, file_server=files, verify=cfg.sync.verify,
                       transfer=transfer_backend(cfg, transport), engine_dtype=cfg.sampler.dtype)


def gang_spec(cfg: Config) -> GangSpec:
    t = cfg.train
    ask = Ask("trainer", t.num_workers, resources(t.num_cpus_per_worker, 1 if t.use_gpu else 0,
                                                  t.resources_per_worker),
              dict(t.node_labels), strategy=t.placement_strategy,
              fields="train.num_workers / num_cpus_per_worker / use_gpu / resources_per_worker / node_labels")
    return GangSpec(ask=ask, use_gpu=t.use_gpu, max_failures=t.max_failures, keep_checkpoints=cfg.checkpoint.keep,
                    storage=cfg.checkpoint.storage)


def train_sampling(cfg: Config) -> Sampling:
    s = cfg.sampler
    return Sampling(n=s.n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens,
                    logprobs=s.logprobs)


def eval_sampling(cfg: Config) -> Sampling:
    s = cfg.sampler
    return Sampling(n=1, temperature=cfg.eval.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens)


def rollout_spec(cfg: Config) -> RolloutSpec:
    s, batch = cfg.sampler, cfg.train.batch_size
    if s.calls_in_flight > 1 and not cfg.sync.in_flight:
        raise ConfigError(f"sampler.calls_in_flight: {s.calls_in_flight} overlaps a sampler's requests, so there is "
                          "no gap between batches for an update to wait for: set sync.in_flight: true, or "
                          "sampler.calls_in_flight: 1")
    return RolloutSpec(mode=cfg.sync.mode, sampling=train_sampling(cfg), seed=cfg.run.seed,
                       capacity=cfg.sync.buffer_pairs or 2 * batch,
                       prompts_per_call=s.prompts_per_call or max(4, batch // max(1, s.num_actors)),
                       calls_in_flight=s.calls_in_flight, judge_in_sampler=cfg.judge.in_sampler,
                       max_lag=0 if cfg.sync.mode == "sync" else cfg.sync.max_policy_lag)


def data_spec(cfg: Config) -> DataSpec:
    d, s = cfg.data, cfg.sampler
    if s.max_model_len is not None and d.max_prompt_tokens + s.max_new_tokens > s.max_model_len:
        raise ConfigError(f"data.max_prompt_tokens ({d.max_prompt_tokens}) + sampler.max_new_tokens "
                          f"({s.max_new_tokens}) is more than sampler.max_model_len ({s.max_model_len}): the longest "
                          "prompts would have no room to answer; lower one of the first two or raise the third")
    return DataSpec(source=d.source, split=d.split, eval_source=d.eval_source, eval_split=d.eval_split,
                    prompt_field=d.prompt_field, format=d.format, system_prompt=d.system_prompt,
                    max_prompt_tokens=d.max_prompt_tokens, max_new_tokens=s.max_new_tokens,
                    max_model_len=s.max_model_len, shuffle=d.shuffle, seed=cfg.run.seed,
                    eval_prompts=cfg.eval.prompts)


def serve_plan(s: ServeConfig, model: str, served_name: str, log_level: str = "quiet", lora_rank: int | None = None,
               adapter_dir: str | None = None, file_server=None, names: Names | None = None) -> ServePlan:
    """A Serve deployment of `model` from a validated `serve` section (also `online-dpo serve`)."""
    from .cluster import loopback

    if s.api_key_env and not os.environ.get(s.api_key_env):
        raise ConfigError(f"serve.api_key_env names {s.api_key_env}, but that environment variable is not set; "
                          "export it or remove serve.api_key_env")
    if not loopback(s.host) and not s.api_key_env and not s.allow_unauthenticated:
        raise ConfigError(f"serve.host {s.host} is reachable beyond this machine and serve.api_key_env is not set: "
                          "set serve.api_key_env (and export the key), or serve.allow_unauthenticated: true")
    # One core fewer than the replica has: its Python (HTTP, vLLM's front end) needs one, and the
    # engine's OpenMP threads spin (2 cores: 69 -> 95 req/s with 1 engine thread instead of 2).
    env = engine_env(s.num_threads or max(1, int(s.num_cpus) - 1), s.num_gpus > 0, log_level,
                     in_process=True)
    key = hashlib.sha256(os.environ[s.api_key_env].encode()).hexdigest() if s.api_key_env else None
    spec = ServerSpec(model=model, served_name=served_name, dtype=s.dtype, max_model_len=s.max_model_len,
                      default_max_tokens=s.default_max_tokens, api_key_env=s.api_key_env, api_key_sha256=key,
                      max_request_tokens=s.max_request_tokens,
                      poll_seconds=s.poll_seconds, max_drain_seconds=s.max_drain_seconds,
                      max_body_bytes=s.max_body_bytes, max_n=s.max_n, kv_cache_gib=s.kv_cache_gib,
                      engine=dict(s.engine), lora_rank=lora_rank,
                      adapter_dir=adapter_dir, file_server=file_server,
                      store_name=names.store if names else "policy-store")
    start = s.min_replicas if s.min_replicas is not None else s.num_replicas   # replicas at deploy time
    ask = Ask("serve", start, resources(s.num_cpus, s.num_gpus, s.resources), dict(s.node_labels),
              fields="serve.num_replicas / num_cpus / num_gpus / resources / node_labels")
    return ServePlan(spec=spec, ask=ask, options=deployment_options(s, env), host=s.host, port=s.port,
                     route_prefix=s.route_prefix, keep_alive=s.keep_alive,
                     app_name=names.app if names else f"online-dpo-{secrets.token_hex(3)}")


def deployment_options(s: ServeConfig, env: dict[str, str]) -> dict:
    """Ray Serve deployment options: a fixed replica count, or autoscaling between the bounds."""
    actor: dict = {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus, "runtime_env": {"env_vars": env}}
    if s.resources:
        actor["resources"] = dict(s.resources)
    if s.node_labels:
        actor["label_selector"] = dict(s.node_labels)
    opts: dict = dict(max_ongoing_requests=s.max_ongoing_requests, ray_actor_options=actor)
    if s.max_replicas and s.max_replicas > (s.min_replicas or s.num_replicas):
        opts["autoscaling_config"] = {"min_replicas": s.min_replicas if s.min_replicas is not None else s.num_replicas,
                                      "max_replicas": s.max_replicas,
                                      "target_ongoing_requests": max(1, s.max_ongoing_requests // 2)}
    else:
        opts["num_replicas"] = s.num_replicas
    return opts


# ---------------------------------------------------------------- checks beyond the schema

def check_paths(cfg: Config) -> None:
    """Refuse local paths that do not exist (hub ids and embedded:reviews pass)."""
    fields = {"model.policy": cfg.model.policy, "model.reference": cfg.model.reference,
              "data.source": cfg.data.source, "data.eval_source": cfg.data.eval_source, **judge_models(cfg)}
    for name, value in fields.items():
        if value and value.startswith(("/", "./", "../", "~")) and not Path(value).expanduser().exists():
            raise ConfigError(f"{name}: {value} does not exist; give an existing local path, "
                              f"a hub id, or {EMBEDDED}")


def check_imports(cfg: Config) -> None:
    """A rule judge's function must import (on the driver, as on the cluster), and the packages an
    option needs must be installed."""
    if cfg.train.liger_kernels and importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError("train.liger_kernels needs the liger-kernel package, which is not installed: "
                          "pip install -e '.[gpu]', or set train.liger_kernels: false")
    check_rules(cfg)


# ---------------------------------------------------------------- `online-dpo train --resume`

# What `--resume` may change: what extends or tunes the run (its length, guards, deadlines, cadence,
# logging, restarts, serving). Anything else (model, tokenizer, reference, data, sampling, judge, loss,
# LoRA shape, batch, sync) would continue the checkpoint as another run.
RESUMABLE = ("run.log_level", "run.check_resources", "run.call_timeout", "run.stall_timeout", "train.max_steps",
             "train.max_kl", "train.max_failures", "sampler.max_restarts", "judge.max_restarts", "eval.every_steps",
             "checkpoint.every_steps", "checkpoint.keep", "metrics.", "serve.", "pairs.", "judge.base_url",
             "judge.timeout", "judge.retries", "judge.concurrency", "judge.api_key_env", "judge.in_sampler")


def flat(data: dict, prefix: str = "") -> dict:
    """{'train.lr': 1e-4, ...} from nested sections."""
    out = {}
    for k, v in data.items():
        if isinstance(v, dict) and v and k not in ("engine", "resources", "node_labels"):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_changes(saved: Config, new: Config) -> tuple[str, ...]:
    """What `--resume` changes, as "field: old -> new"; ConfigError naming the first change that would
    make it another run."""
    old, cur = flat(saved.model_dump(mode="json")), flat(new.model_dump(mode="json"))
    changed = [k for k in sorted(set(old) | set(cur)) if old.get(k) != cur.get(k)]
    for k in changed:
        if not k.startswith(RESUMABLE):
            raise ConfigError(f"--resume cannot change {k} ({old.get(k)!r} -> {cur.get(k)!r}): the checkpoint was "
                              "made with the old value, so the run would go on as another one; start a new run "
                              "instead. --resume may change: " + ", ".join(r.rstrip(".") + ("*" if r.endswith(".") else "")
                                                                          for r in RESUMABLE))
    return tuple(f"{k}: {old.get(k)!r} -> {cur.get(k)!r}" for k in changed)


# ---------------------------------------------------------------- `online-dpo serve PATH`

def standalone_serve(path: str, s: ServeConfig, log_level: str = "quiet") -> tuple[ServePlan, str]:
    """What `online-dpo serve PATH` deploys: a run directory's policy/ (a LoRA run's base model with its
    adapter), an HF model directory, or embedded:reviews. Returns the plan and a line saying what it
    serves."""
    from .config import load_config
    from .embedded import resolve_model

    where = Path(path)
    model = where / "policy" if (where / "policy" / "config.json").exists() else where
    adapter = where / "policy" if (where / "policy" / "adapter_config.json").exists() else None
    rank = None
    if adapter is not None:   # a LoRA run: its base model with the final adapter
        try:
            run_cfg = load_config(where / "config.yaml")
        except ConfigError as e:
            raise ConfigError(f"{path} holds a LoRA adapter but no readable config.yaml: {e}") from None
        base, rank = resolve_model(run_cfg.model.policy), lora_rank(run_cfg)
    elif path == EMBEDDED:
        base = resolve_model(EMBEDDED)
    elif (model / "config.json").exists():
        base = str(model.resolve())
    else:
        raise ConfigError(f"{path} is neither a run directory (with policy/) nor a model directory "
                          "(with config.json)")
    name = s.model_name or (where.name if model != where or adapter is not None else model.name)
    plan = serve_plan(s, base, name, log_level, rank, str(adapter.resolve()) if adapter is not None else None)
    return plan, f"{base} with the adapter {adapter}" if adapter is not None else base


def merge_target(run_dir: str) -> tuple[str, str, bool]:
    """`online-dpo export RUN_DIR --merge`: (base model path, adapter directory, trust_remote_code) of a
    finished LoRA run; ConfigError naming what is missing otherwise."""
    from .config import load_config
    from .embedded import resolve_model

    run, policy = Path(run_dir), Path(run_dir) / "policy"
    if not (run / "config.yaml").exists() or not policy.is_dir():
        raise ConfigError(f"{run} is not a finished run directory (it needs config.yaml and policy/)")
    cfg = load_config(run / "config.yaml")
    if not (policy / "adapter_config.json").exists():
        raise ConfigError(f"{policy} is a full model already (the run had no model.lora); use it as it is")
    return resolve_model(cfg.model.policy), str(policy), cfg.model.trust_remote_code
