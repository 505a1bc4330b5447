"""The run's schedule: which step syncs, checkpoints and evaluates. Pure; owned by the controller.

The learner keeps no schedule: each step order carries what to do after it.
Versions count syncs: version v is the policy after v weight syncs, and the
last step always syncs, so the final policy is a published version.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    step: int
    version_before: int     # the published version while this step trains
    sync: bool
    version_after: int
    checkpoint: bool
    evaluate: bool
    final: bool


@dataclass(frozen=True)
class Schedule:
    max_steps: int
    sync_every: int = 1
    checkpoint_every: int = 0
    eval_every: int = 0

    def plan(self, step: int) -> Plan:
        final = step == self.max_steps
        sync = step % self.sync_every == 0 or final
        before = (step - 1) // self.sync_every
        return Plan(step=step, version_before=before, sync=sync, version_after=before + sync,
                    checkpoint=final or bool(self.checkpoint_every and step % self.checkpoint_every == 0),
                    evaluate=bool(self.eval_every and step % self.eval_every == 0 and not final), final=final)

    def steps_left_in_version(self, step: int) -> int:
        """Steps from `step` to the end of its version, `step` included."""
        end = min(self.max_steps, ((step - 1) // self.sync_every + 1) * self.sync_every)
        return end - step + 1
