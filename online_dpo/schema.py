"""The run YAML's building blocks (`Section`, `Placed`) and its judge section; config.py holds the rest.

Imports nothing from the package: with config.py, the ground floor of the schema.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Placed(Section):
    """Where an actor group goes: what each of its actors asks of a node."""
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per actor")
    node_labels: dict[str, str] = Field(default_factory=dict, description="place only on nodes with these labels")


def _judge_needs(kind: str, function: str | None, model: str | None, where: str) -> None:
    if kind == "rule" and not function:
        raise ValueError(f"{where}kind 'rule' needs {where}function, an import path "
                         "such as 'online_dpo.judges.rule:vader_compound'")
    if kind in ("reward_model", "llm") and not model:
        raise ValueError(f"{where}kind '{kind}' needs {where}model, a model directory or hub id")
    if kind == "openai" and not model:
        raise ValueError(f"{where}kind 'openai' needs {where}model, the model name the endpoint serves")
    if function and ":" not in function:
        raise ValueError(f"{where}function must look like 'pkg.module:function'")


def _unique(field: str, names: list[str]) -> None:
    if len(set(names)) != len(names):
        raise ValueError(f"{field} names must differ; got {names}")


class JudgeFields(Section):
    """What every judge kind reads; an ensemble's members and the judge section share them."""
    function: str | None = Field(None, description="rule: import path 'pkg.module:function'")
    model: str | None = Field(None, description="reward_model / llm: HF directory or hub id")
    batch_size: int = Field(16, gt=0)
    max_length: int = Field(1024, gt=0)
    template: str | None = Field(None, description="llm: prompt with {prompt}, {a}, {b}")
    max_new_tokens: int = Field(8, gt=0)
    constrained: bool = Field(True, description="llm: restrict the verdict to 'A' or 'B'; openai: through vLLM's "
                                                "structured_outputs (false for other endpoints)")
    engine: dict[str, Any] = Field(default_factory=dict)
    base_url: str | None = Field(None, pattern=r"^https?://", description="openai: the endpoint, e.g. "
                                 "http://127.0.0.1:8000/v1")
    api_key_env: str | None = Field(None, description="openai: the environment variable holding the API key")
    mode: Literal["pairwise", "score"] = Field("pairwise", description="openai: compare two, or rate one 1-10")
    concurrency: int = Field(8, ge=1, le=256, description="openai: requests in flight per judge actor")
    timeout: float = Field(30.0, gt=0, description="openai: seconds per request")
    retries: int = Field(3, ge=0, le=10, description="openai: retries on 429, 5xx and connection errors")
    logprobs: bool = Field(False, description="openai score mode: the rating expected under the log-probs")
    app: str | None = Field(None, min_length=1, description="deployment: the Serve app of a shared judge "
                            "(online-dpo judge serve)")

    @model_validator(mode="after")
    def _endpoint(self):
        kind = getattr(self, "kind", None)
        if kind == "openai" and not self.base_url:
            raise ValueError("judge kind 'openai' needs base_url, the endpoint (e.g. http://127.0.0.1:8000/v1)")
        if kind != "openai" and self.base_url:
            raise ValueError(f"base_url is only for judge kind 'openai' (kind is '{kind}')")
        if (kind == "deployment") != bool(self.app):
            raise ValueError("judge kind 'deployment' needs app, the name given to `online-dpo judge serve --app`"
                             if self.app is None else f"app is only for judge kind 'deployment' (kind is '{kind}')")
        return self


class JudgeMember(JudgeFields):
    """One objective of an ensemble judge (judges/ensemble.py)."""
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_]+$", description="the objective's name in metrics")
    kind: Literal["rule", "reward_model", "llm", "openai"] = "rule"
    weight: float = Field(1.0, description="its weight in the combined score (negative: lower is better)")
    normalize: bool = Field(False, description="z-score with the mean and spread of the first batch it scores")
    margin: float = Field(0.0, ge=0, description="its raw-score gaps at or below this count as zero")

    @model_validator(mode="after")
    def _needs(self):
        _judge_needs(self.kind, self.function, self.model, f"judge.members[{self.name}].")
        if self.weight == 0:
            raise ValueError(f"judge.members[{self.name}].weight is 0: give it a weight or remove it")
        return self


class JudgePrinciple(Section):
    """One principle of a constitutional judge (judges/constitution.py)."""
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_]+$", description="the principle's name in metrics")
    text: str = Field(min_length=1, description="what the judge is asked to judge by")
    weight: float = Field(1.0, gt=0)


class JudgeConfig(JudgeFields, Placed):
    kind: Literal["rule", "reward_model", "llm", "ensemble", "constitutional", "openai", "deployment"] = "rule"
    members: list[JudgeMember] = Field(default_factory=list, description="ensemble: the judges it combines")
    principles: list[JudgePrinciple] = Field(default_factory=list, description="constitutional: the principles")
    margin: float = Field(0.0, ge=0, description="score gaps at or below this are ties")
    num_actors: int = Field(1, ge=1)
    max_restarts: int = Field(3, ge=0, description="Ray restarts of a crashed judge")
    in_sampler: bool = Field(False, description="rule: each sampler runs the judge in its own process (no judge "
                             "actor, no round trip; judge.num_actors / num_cpus / max_restarts are unused)")

    @model_validator(mode="after")
    def _needs(self):
        if self.in_sampler and self.kind != "rule":
            raise ValueError(f"judge.in_sampler is only for judge.kind 'rule', a cheap function (judge.kind is "
                             f"'{self.kind}'): set judge.in_sampler: false, so the judge gets its own actors")
        if self.kind == "ensemble":
            if not self.members:
                raise ValueError("judge.kind 'ensemble' needs judge.members: a list of judges, each with a "
                                 "name, a kind and a weight")
            _unique("judge.members", [m.name for m in self.members])
            if self.function or self.model:
                raise ValueError("judge.kind 'ensemble' takes its judges from judge.members; move "
                                 "judge.function / judge.model into a member")
            return self
        if self.members:
            raise ValueError(f"judge.members is only for judge.kind 'ensemble' (judge.kind is '{self.kind}')")
        if self.kind == "constitutional":
            if not self.model:
                raise ValueError("judge.kind 'constitutional' needs judge.model, a generative model directory or hub id")
            if not self.principles:
                raise ValueError("judge.kind 'constitutional' needs judge.principles: a list of {name, text, weight}")
            _unique("judge.principles", [p.name for p in self.principles])
            missing = [k for k in ("{principle}", "{prompt}", "{a}", "{b}") if self.template and k not in self.template]
            if missing:
                raise ValueError(f"judge.template lacks {', '.join(missing)}; a constitutional template needs "
                                 "{principle}, {prompt}, {a} and {b} (or leave judge.template out for the default)")
            return self
        if self.principles:
            raise ValueError(f"judge.principles is only for judge.kind 'constitutional' (judge.kind is '{self.kind}')")
        _judge_needs(self.kind, self.function, self.model, "judge.")
        return self
