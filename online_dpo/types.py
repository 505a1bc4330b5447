"""Messages between actors: small frozen dataclasses, no torch, no Ray.

Every completion records the policy version that made it, so a pair can be
checked for staleness wherever it travels (samplers -> judge -> learner).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Completion:
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str          # "stop" (EOS or stop string) or "length"
    policy_version: int
    logprobs: tuple[float, ...] = ()   # sampler's log-prob of each sampled token


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

    @property
    def policy_version(self) -> int:
        return min(self.chosen.policy_version, self.rejected.policy_version)


@dataclass(frozen=True)
class LabelStats:
    """What the judge did with one batch of groups."""
    groups: int = 0
    pairs: int = 0
    ties: int = 0               # best and worst within the margin
    identical: int = 0          # best and worst had the same tokens
    scores: tuple[float, ...] = field(default=(), repr=False)
    chosen_mean: float = 0.0
    rejected_mean: float = 0.0
    seconds: float = 0.0
    objectives: dict = field(default_factory=dict)   # ensemble judges: per-objective figures (ensemble.py)


@dataclass(frozen=True)
class SampleBatch:
    """What one sampler call returns: its groups and what the call cost."""
    groups: tuple[SampleGroup, ...]
    version: int                # the policy version every completion came from
    seconds: float              # generating
    load_seconds: float = 0.0   # loading new weights first


@dataclass(frozen=True)
class StepOrder:
    """What the controller tells the learner to do for one optimizer step."""
    step: int
    pairs: tuple[PreferencePair, ...]
    sync: bool                  # publish the weights after the step as `version`
    version: int                # the policy version once this step is done
    checkpoint: bytes | None = None   # controller state to save with a checkpoint after the step
    final: bool = False         # the last step: save the final policy
    incarnation: int = 1        # the gang it was planned for (1: the first; +1 per restart)


@dataclass(frozen=True)
class LearnerStart:
    """Rank 0's hello when the gang (re)starts: where it restored to."""
    step: int                   # steps already taken (0 on a fresh start)
    version: int
    weights: object = None      # a WeightsHandle of the restored weights (None on a fresh start)
    controller: bytes | None = None   # the controller state saved with that checkpoint
    checkpoint: str | None = None     # where it restored from
    seconds: float = 0.0        # from the start of the train function to this hello
