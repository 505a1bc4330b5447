"""Messages between actors: small frozen dataclasses, no torch, no Ray.

Every completion records the policy version that made it, so a pair can be
checked for staleness wherever it travels (samplers -> judge -> learner).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Completion:
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str          # "stop" (EOS or stop string) or "length"
    policy_version: int         # vLLM's weight version when its request started (the lag bound counts it)
    logprobs: tuple[float, ...] = ()   # sampler's log-prob of each sampled token
    end_version: int | None = None     # ... and when it finished (an update landed in flight if they differ)


@dataclass(frozen=True)
class SampleGroup:
    """n completions of one prompt."""
    prompt: str                 # the text the policy saw (chat template applied)
    prompt_ids: tuple[int, ...]
    completions: tuple[Completion, ...]


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    prompt_ids: tuple[int, ...]
    chosen: Completion
    rejected: Completion
    chosen_score: float
    rejected_score: float
    details: dict = field(default_factory=dict)   # what else the judge said (preference log): per objective, ...

    @property
    def policy_version(self) -> int:
        return min(self.chosen.policy_version, self.rejected.policy_version)

    def data(self) -> dict:
        """Plain data (JSON): what a checkpoint keeps of a buffered pair."""
        return asdict(self)

    @classmethod
    def from_data(cls, d: dict) -> PreferencePair:
        def completion(c: dict) -> Completion:
            return Completion(token_ids=tuple(c["token_ids"]), text=c["text"], finish_reason=c["finish_reason"],
                              policy_version=int(c["policy_version"]), logprobs=tuple(c.get("logprobs", ())),
                              end_version=None if c.get("end_version") is None else int(c["end_version"]))

        return cls(prompt=d["prompt"], prompt_ids=tuple(d["prompt_ids"]), chosen=completion(d["chosen"]),
                   rejected=completion(d["rejected"]), chosen_score=float(d["chosen_score"]),
                   rejected_score=float(d["rejected_score"]), details=dict(d.get("details") or {}))


@dataclass(frozen=True)
class Labels:
    """What a judge made of one batch of groups: the pairs it kept, and why it dropped the others."""
    pairs: tuple[PreferencePair, ...] = ()
    groups: int = 0
    ties: int = 0               # best and worst within the margin
    identical: int = 0          # best and worst had the same tokens
    nonfinite: int = 0          # groups where the judge gave a NaN or infinite score (left out of pairing)
    malformed: int = 0          # verdicts the judge gave that did not parse (LLM judges)
    asked: int = 0              # verdicts asked for (LLM judges)
    scores: tuple[float, ...] = field(default=(), repr=False)
    seconds: float = 0.0
    objectives: dict = field(default_factory=dict)   # ensemble judges: per-objective figures (ensemble.py)
    dropped: tuple[tuple[str, PreferencePair], ...] = field(default=(), repr=False)   # (why, best vs worst)
    usage: dict = field(default_factory=dict)   # endpoint judges: requests, cache_hits, retries, tokens

    @property
    def chosen_mean(self) -> float:
        return sum(p.chosen_score for p in self.pairs) / len(self.pairs) if self.pairs else 0.0

    @property
    def rejected_mean(self) -> float:
        return sum(p.rejected_score for p in self.pairs) / len(self.pairs) if self.pairs else 0.0


@dataclass(frozen=True)
class SampleBatch:
    """What one sampler call returns: its groups and what the call cost."""
    groups: tuple[SampleGroup, ...]
    version: int                # the policy version every completion came from
    seconds: float              # generating
    load_seconds: float = 0.0   # loading new weights first
    ended: float = 0.0          # wall clock when the call ended (overlapping calls' busy time is their union)
    labels: Labels | None = None     # the sampler's own judge's labels (judge.in_sampler), else None
    judge_seconds: float = 0.0       # ... and what labelling took


@dataclass(frozen=True)
class StepOrder:
    """What the controller tells the learner to do for one optimizer step."""
    step: int
    pairs: tuple[PreferencePair, ...]
    sync: bool                  # publish the weights after the step as `version`
    version: int                # the policy version once this step is done
    checkpoint: str | None = None     # controller state (JSON) to save with a checkpoint after the step
    final: bool = False         # the last step: save the final policy
    incarnation: int = 1        # the gang it was planned for (1: the first; +1 per restart)


@dataclass(frozen=True)
class LearnerStart:
    """Rank 0's hello when the gang (re)starts: where it restored to."""
    step: int                   # steps already taken (0 on a fresh start)
    version: int
    weights: object = None      # a WeightsHandle of the restored weights (None on a fresh start)
    controller: str | None = None     # the controller state (JSON) saved with that checkpoint
    checkpoint: str | None = None     # where it restored from
    seconds: float = 0.0        # from the start of the train function to this hello


# What the broker answers a step order with: one of these three.

@dataclass(frozen=True)
class StepDone:
    """Rank 0 took the step: its metrics, and the published weights when it synced."""
    metrics: dict
    weights: object = None      # a WeightsHandle, or None
    digests: dict | None = None   # sync.verify: the trainer's checksums of the version it published


@dataclass(frozen=True)
class Restarted:
    """The gang restarted from a checkpoint before the order ran; plan again from `start`."""
    start: LearnerStart


@dataclass(frozen=True)
class Closed:
    """The broker closed (the learner stopped, or the run is ending)."""
    reason: str


@dataclass(frozen=True)
class WeightGroup:
    """One generation of the weight group, as the controller posts it for trainer rank 0 (syncer.py)."""
    gen: int
    members: tuple          # the live samplers' actor handles
    workers: int = 1        # engine workers per sampler (tensor parallel size)
