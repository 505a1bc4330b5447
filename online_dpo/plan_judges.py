"""The judges' part of the run plan (plan.py): the judge sections turned into actor groups and JudgeSpecs.

A run has the training judge (`judge`) and, where `eval.judge` is set, an
independent judge of the held-out responses; either may be an ensemble of
members. Every judge config of a run, wherever it sits, is listed once by
`judge_configs`, so the model paths and rule imports of all of them are
checked the same way.
"""

from __future__ import annotations

from .config import Config, ConfigError
from .embedded import EMBEDDED, model_path
from .engine import engine_env
from .judges.llm import TEMPLATE as LLM_TEMPLATE
from .schema import JudgeConfig, JudgeMember
from .specs import Ask, Endpoint, GroupSpec, JudgeSpec, Principle, resources, threads


def judge_configs(cfg: Config) -> dict[str, JudgeConfig | JudgeMember]:
    """Every judge of the run by its field prefix: 'judge.', 'judge.members[x].', 'eval.judge.', ..."""
    out: dict[str, JudgeConfig | JudgeMember] = {}
    for prefix, j in (("judge.", cfg.judge), ("eval.judge.", cfg.eval.judge)):
        if j is not None:
            out[prefix] = j
            out.update({f"{prefix}members[{m.name}].": m for m in j.members})
    return out


def judge_models(cfg: Config) -> dict[str, str]:
    """Every judge model the run loads itself, by field (an endpoint judge's model is a name, not a path)."""
    return {f"{prefix}model": j.model for prefix, j in judge_configs(cfg).items() if j.model and j.kind != "openai"}


def judge_group(cfg: Config, files: str, evaluation: bool = False, caller: str = "") -> GroupSpec:
    """The training judge's actors, or (`evaluation`) eval.judge's: named judge-i / eval-judge-i."""
    j = cfg.eval.judge if evaluation else cfg.judge
    kind, section = ("eval-judge", "eval.judge") if evaluation else ("judge", "judge")
    ask = Ask(kind, j.num_actors, resources(j.num_cpus, j.num_gpus, j.resources), dict(j.node_labels),
              fields=f"{section}.num_actors / num_cpus / num_gpus / resources / node_labels")
    env = engine_env(threads(j.num_cpus, None), j.num_gpus > 0, cfg.run.log_level)
    return GroupSpec(kind, ask, j.max_restarts, env, judge_spec(j, files, caller), j.num_gpus > 0,
                     cfg.run.call_timeout, section=section)


def judge_spec(j: JudgeConfig | JudgeMember, files: str | None = None, caller: str = "") -> JudgeSpec:
    """A judge's plain arguments; an embedded generative judge runs in float32, as its policy does."""
    engine = dict(j.engine)
    if j.kind in ("llm", "constitutional") and j.model == EMBEDDED:
        engine.setdefault("dtype", "float32")
    endpoint = Endpoint(j.base_url, j.mode, j.api_key_env, j.concurrency, j.timeout, j.retries, j.logprobs) \
        if j.kind == "openai" else None
    common = dict(kind=j.kind, margin=j.margin, function=j.function,
                  model=model_path(j.model) if j.model and j.kind != "openai" else j.model, batch_size=j.batch_size,
                  max_length=j.max_length, template=j.template or (LLM_TEMPLATE if j.kind == "llm" else None),
                  max_new_tokens=j.max_new_tokens, constrained=j.constrained, engine=engine, file_server=files,
                  endpoint=endpoint, app=getattr(j, "app", None), caller=caller)
    if isinstance(j, JudgeMember):
        return JudgeSpec(**common, name=j.name, weight=j.weight, normalize=j.normalize)
    return JudgeSpec(**common, members=tuple(judge_spec(m, files) for m in j.members),
                     principles=tuple(Principle(p.name, p.text, p.weight) for p in j.principles))


def check_rules(cfg: Config) -> None:
    """Every rule judge's function imports (on the driver, as on the cluster)."""
    from .judges.rule import import_function

    for prefix, j in judge_configs(cfg).items():
        if j.kind == "rule":
            try:
                import_function(j.function)
            except ValueError as e:
                raise ConfigError(str(e).replace("judge.function", f"{prefix}function", 1)
                                  + "; give an importable 'pkg.module:function'") from None


def shared_judge(path: str, overrides: list[str]) -> tuple[JudgeSpec, dict]:
    """What `online-dpo judge serve CONFIG` deploys: the judge section's spec, and each replica's Ray
    resources (judge.num_cpus / num_gpus / resources)."""
    from .config import load_config

    cfg = load_config(path, overrides)
    j = cfg.judge
    if j.kind == "deployment":
        raise ConfigError("judge.kind is 'deployment' in this config: `judge serve` needs the judge itself "
                          "(rule, reward_model, llm, ensemble, constitutional or openai)")
    check_rules(cfg)
    env = engine_env(threads(j.num_cpus, None), j.num_gpus > 0, cfg.run.log_level)
    return judge_spec(j), {"num_cpus": j.num_cpus, "num_gpus": j.num_gpus, "resources": dict(j.resources),
                           "runtime_env": {"env_vars": env}}
