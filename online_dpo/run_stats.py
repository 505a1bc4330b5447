"""The books of one run: timings, restarts, lags, KL, and the records and summary built from them.

The controller sequences the run; `RunStats` keeps count of what happened.
Its state rides along in every checkpoint (plain data), so a resumed run's
summary still counts the restarts and syncs of the process before it.
"""

from __future__ import annotations

import collections
import os
import statistics
import time

from .evaluation import summary

LAUNCHED_AT = "ONLINE_DPO_LAUNCHED_AT"   # set by `train --job` for its job: when the user's command started
KL_WINDOW = 5   # steps the KL guard averages over
RATE_WINDOW = 10   # steps the live throughput (pairs per second) is measured over
NONFINITE_STEPS = 3   # this many skipped (non-finite) steps in a row stop the run


def launched_at() -> float:
    """When the user's command started: this process's start (Linux: its age, from /proc), or the
    submitting command's for a job (LAUNCHED_AT)."""
    if os.environ.get(LAUNCHED_AT):
        return float(os.environ[LAUNCHED_AT])
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])   # start time, clock ticks after boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):   # not Linux: count from the controller's start
        return time.time()


class RunStats:
    def __init__(self):
        self.start_time = time.time()
        self.launched = min(launched_at(), self.start_time)
        self.marks = {"cluster": round(self.start_time - self.launched, 2)}   # start-up phase -> s since launch
        self.train_start: float | None = None
        self.train_end: float | None = None
        self.last_result = time.time()      # when the learner last answered
        self.totals = collections.Counter()  # learner seconds busy / waiting; sync bytes and count
        self.learner_restarts, self.steps_lost = 0, 0
        self.learner_restart_seconds: list[float] = []
        self.lags: dict[int, dict] = {}      # step -> its pairs' lag behind the learner
        self.finished: collections.deque = collections.deque(maxlen=RATE_WINDOW + 1)   # (time, pairs) per step
        self.recent_kl: list[float] = []
        self.skipped_in_a_row = 0            # steps skipped for a non-finite loss or gradient, in a row
        self.last_train: dict = {}
        self.baseline: dict = {}             # the held-out evaluation of the starting policy
        self.skipped: dict[str, int] = {}    # prompt rows left out when the data loaded, by reason

    # ------------------------------------------------------------ start-up

    def mark(self, phase: str) -> float:
        """Note that start-up `phase` is done (the first time only); seconds since launch."""
        self.marks.setdefault(phase, round(time.time() - self.launched, 2))
        return self.marks[phase]

    def startup(self) -> dict:
        """summary.json's start-up figures: the first step's time since launch, and each phase's end."""
        return {"first_step_seconds": self.marks.get("first_step"), "startup_seconds": dict(self.marks)}

    # ------------------------------------------------------------ while training

    def training(self) -> None:
        self.train_start = self.last_result = time.time()

    def trained(self) -> None:
        self.train_end = time.time()

    def lag(self, step: int, version: int, pairs) -> None:
        """How far behind `version` (the learner's) the pairs of `step` were sampled."""
        lags = [version - p.policy_version for p in pairs]
        self.lags[step] = {"lag_min": min(lags), "lag_mean": statistics.fmean(lags), "lag_max": max(lags)}

    def step_done(self, metrics: dict, rollouts, samplers: int) -> dict:
        """The train record of a finished step (its metrics, lags, rollout figures, pipeline shares)."""
        self.last_result = time.time()
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if metrics.get("skipped") else 0
        self.totals["skipped_steps"] += bool(metrics.get("skipped"))
        if metrics.get("kl") is not None:
            self.recent_kl.append(metrics["kl"])
        self.totals["busy"] += metrics["step_seconds"]
        self.totals["wait"] += metrics["wait_seconds"]
        if metrics.get("sync_bytes"):
            self.totals["sync_bytes"] += metrics["sync_bytes"]
            self.totals["syncs"] += 1
        self.finished.append((time.time(), metrics["pairs"]))
        self.mark("first_step")
        record = {"kind": "train", **metrics, **self.lags.pop(metrics["step"], {}), **self.rate(),
                  "reward_mean": rollouts.latest.get("reward_mean"),
                  **{k: v for k, v in rollouts.latest.items() if k.startswith("objective/")},
                  "wall_seconds": time.time() - self.train_start, **self.pipeline(rollouts, samplers)}
        self.last_train = record
        return record

    def rate(self) -> dict:
        """Live throughput: pairs trained per second over the last RATE_WINDOW steps (None at the first step
        this process takes)."""
        (t0, p0), (t1, p1) = self.finished[0], self.finished[-1]
        return {"pairs_per_second": round((p1 - p0) / (t1 - t0), 2) if t1 > t0 else None}

    def why_stop(self, signal: str | None, max_kl: float | None, stall_timeout: float = float("inf"),
                 waiting_on=lambda: "") -> tuple[str | None, str | None]:
        """Why to stop before the schedule ends (None: go on), and what kind of failure that is (None: not
        one; "stall": no step for `stall_timeout` seconds, `waiting_on()` says on what; "nonfinite")."""
        if signal:
            return signal, None
        idle = time.time() - self.last_result
        if idle > stall_timeout:
            return (f"no training step finished in {idle:.0f}s (run.stall_timeout: {stall_timeout:g}s); the run "
                    f"was waiting on {waiting_on() or 'pairs that did not come'}"), "stall"
        if self.skipped_in_a_row >= NONFINITE_STEPS:
            return (f"the learner's loss or gradient was NaN or infinite {self.skipped_in_a_row} steps in a row (the "
                    "steps were skipped): lower train.lr, set train.grad_clip, or check the judge's pairs"), "nonfinite"
        return self.kl_limit(max_kl), None

    def kl_limit(self, limit: float | None) -> str | None:
        """Why to stop, once the KL estimate passes `limit` (a policy drifting into a collapse the judge
        still rewards, such as repetition); None while it is below."""
        recent = self.recent_kl[-KL_WINDOW:]
        if limit is None or len(recent) < KL_WINDOW or statistics.fmean(recent) <= limit:
            return None
        return (f"KL limit: the KL estimate averaged {statistics.fmean(recent):.1f} nats per sequence over the "
                f"last {KL_WINDOW} steps, above train.max_kl ({limit:g})")

    def learner_restarted(self, lost: int) -> float:
        """Count a gang restart that lost `lost` steps; returns the seconds the learner was away."""
        seconds = time.time() - self.last_result
        self.last_result = time.time()   # the gang is back: the stall watchdog counts from here
        self.learner_restarts += 1
        self.steps_lost += lost
        self.learner_restart_seconds.append(round(seconds, 1))
        return seconds

    def restart_counts(self, topo) -> dict:
        return {"sampler_restarts": topo.samplers.restarts, "judge_restarts": topo.judges.restarts,
                "learner_restarts": self.learner_restarts}

    def pipeline(self, rollouts, samplers: int) -> dict:
        """Busy and idle shares of the learner and the samplers since training started."""
        wall = max(1e-9, time.time() - (self.train_start or time.time()))
        busy, wait = self.totals["busy"], self.totals["wait"]
        return {"pipeline_efficiency": round(busy / wall, 4),
                "learner_idle": round(wait / max(1e-9, busy + wait), 4),
                "sampler_idle": round(max(0.0, 1 - sum(rollouts.busy.values()) / (samplers * wall)), 4),
                "stale_dropped": rollouts.stale}

    # ------------------------------------------------------------ the end

    def summary(self, after: dict, rollouts, topo, pairs_before: int, extra: dict) -> dict:
        """summary.json: quality, speed, what was dropped, what restarted (`pairs_before`: trained
        before this process, on a resumed run)."""
        syncs = self.totals["syncs"]
        extra = {**extra, "learner_restarts": self.learner_restarts, "steps_lost": self.steps_lost,
                 "sync_bytes_per_version": round(self.totals["sync_bytes"] / syncs) if syncs else None,
                 "learner_peak_rss_mib": self.last_train.get("peak_rss_mib"), "prompts_skipped": self.skipped,
                 "steps_skipped_nonfinite": self.totals["skipped_steps"], **self.startup(),
                 **self.pipeline(rollouts, len(topo.samplers.handles))}
        restarts = {**topo.restarts(), "learner": {"restarts": self.learner_restarts,
                                                   "restart_seconds": self.learner_restart_seconds}}
        return summary(self.baseline, after, self.last_train, self.train_end - self.train_start, pairs_before,
                       time.time() - self.start_time, rollouts.stats(), restarts, extra)

    # ------------------------------------------------------------ checkpoints

    def state(self) -> dict:
        return {"totals": dict(self.totals), "learner_restarts": self.learner_restarts,
                "steps_lost": self.steps_lost, "baseline": self.baseline}

    def restore(self, state: dict) -> None:
        self.totals = collections.Counter(state["totals"])
        self.learner_restarts, self.steps_lost = state["learner_restarts"], state["steps_lost"]
        self.baseline = state["baseline"]
