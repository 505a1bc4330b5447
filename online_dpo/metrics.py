"""What a run reports, and where: Ray metrics, the console, TensorBoard / W&B.

Every record the controller produces (kind `rollout`, `train` or `eval`) goes
through `Tracker.log`: to the run directory's metrics.jsonl, to Ray's metrics
(ray.util.metrics, so Prometheus and the dashboard's Metrics view see them,
tagged with the run name), and to TensorBoard / Weights & Biases when the
config switches them on. The console gets one concise line per step.

Ray prefixes custom metric names with `ray_`; the Grafana dashboard in
cluster/monitoring/ uses the names below with that prefix.
"""

from __future__ import annotations

import sys
import threading
import time

# name -> (record kind, how to read it from the record, description); grouped as the dashboard shows them
METRICS: dict[str, tuple[str, object, str]] = {
    # training (per optimizer step)
    "online_dpo_train_loss": ("train", "loss", "DPO loss"),
    "online_dpo_train_reward_chosen": ("train", "rewards/chosen", "implicit reward of chosen responses"),
    "online_dpo_train_reward_rejected": ("train", "rewards/rejected", "implicit reward of rejected responses"),
    "online_dpo_train_reward_accuracy": ("train", "rewards/accuracy", "share of pairs with chosen > rejected"),
    "online_dpo_train_reward_margin": ("train", "rewards/margin", "mean implicit reward margin"),
    "online_dpo_train_grad_norm": ("train", "grad_norm", "gradient norm before clipping"),
    "online_dpo_train_lr": ("train", "lr", "learning rate"),
    "online_dpo_train_kl": ("train", "kl", "KL(policy || reference) estimate, nats per sequence"),
    "online_dpo_train_step": ("train", "step", "optimizer steps taken"),
    "online_dpo_train_length_chosen": ("train", "length/chosen", "mean chosen response length in tokens"),
    "online_dpo_train_length_rejected": ("train", "length/rejected", "mean rejected response length in tokens"),
    "online_dpo_train_pairs_per_second": ("train", "pairs_per_second", "pairs trained per second over the "
                                          "last 10 steps (live throughput)"),
    # the pipeline (per optimizer step; cumulative fractions since training started)
    "online_dpo_pipeline_policy_lag_min": ("train", "lag_min", "youngest pair's lag behind the learner (versions)"),
    "online_dpo_pipeline_policy_lag_mean": ("train", "lag_mean", "mean lag of the step's pairs (versions)"),
    "online_dpo_pipeline_policy_lag_max": ("train", "lag_max", "oldest pair's lag behind the learner (versions)"),
    "online_dpo_pipeline_stale_dropped": ("train", "stale_dropped", "pairs dropped for lagging too far, in total"),
    "online_dpo_pipeline_efficiency": ("train", "pipeline_efficiency", "learner busy time / training wall time"),
    "online_dpo_pipeline_learner_idle": ("train", "learner_idle", "share of the learner's time spent waiting"),
    "online_dpo_pipeline_sampler_idle": ("train", "sampler_idle", "share of the samplers' time spent idle"),
    # failures (cumulative counts, per kind of actor)
    "online_dpo_restarts_sampler": ("restart", "sampler_restarts", "sampler crashes Ray restarted"),
    "online_dpo_restarts_judge": ("restart", "judge_restarts", "judge crashes Ray restarted"),
    "online_dpo_restarts_learner": ("restart", "learner_restarts", "Ray Train gang restarts from a checkpoint"),
    "online_dpo_checkpoint_seconds": ("train", "checkpoint_seconds", "seconds to write the latest checkpoint"),
    # sync (rank 0 -> policy store -> samplers)
    "online_dpo_sync_seconds": ("train", "sync_seconds", "seconds to export and publish one version"),
    "online_dpo_sync_bytes": ("train", "sync_bytes", "bytes of one published version"),
    "online_dpo_sync_load_seconds": ("rollout", "load_seconds", "seconds a sampler spent loading a new version"),
    "online_dpo_policy_version": ("train", "policy_version", "latest policy version published"),
    # sampling (per sampler batch)
    "online_dpo_sample_prompts_per_second": ("rollout", lambda r: r["prompts"] / r["sample_seconds"],
                                             "prompts sampled per second"),
    "online_dpo_sample_tokens_per_second": ("rollout", lambda r: r["completions"] * r["response_tokens"]
                                            / r["sample_seconds"], "response tokens generated per second"),
    "online_dpo_sample_response_tokens": ("rollout", "response_tokens", "mean response length in tokens"),
    "online_dpo_sample_eos_rate": ("rollout", "eos_rate", "share of responses that ended with EOS"),
    # judging (per sampler batch)
    "online_dpo_judge_seconds": ("rollout", "judge_seconds", "judge latency for one batch"),
    "online_dpo_judge_ties_dropped": ("rollout", "ties", "ties dropped in the latest batch"),
    "online_dpo_judge_identical_dropped": ("rollout", "identical", "identical pairs dropped in the latest batch"),
    "online_dpo_judge_score_mean": ("rollout", "reward_mean", "mean judge score of all samples"),
    "online_dpo_judge_score_chosen": ("rollout", "chosen_score", "mean judge score of chosen responses"),
    "online_dpo_judge_score_rejected": ("rollout", "rejected_score", "mean judge score of rejected responses"),
    # evaluation (held-out prompts)
    "online_dpo_eval_reward": ("eval", "reward", "held-out mean judge score"),
    "online_dpo_eval_win_rate": ("eval", "win_rate", "held-out win rate vs the initial policy"),
    "online_dpo_eval_judge_reward": ("eval", "eval_judge/reward", "held-out mean score by eval.judge"),
    "online_dpo_eval_judge_win_rate": ("eval", "eval_judge/win_rate", "held-out win rate by eval.judge"),
}
# Ensemble judges (judges/ensemble.py): one series per objective, tagged with its name; read from
# rollout records' "objective/<name>" and "objective_agree/<name>".
OBJECTIVE_METRICS: dict[str, tuple[str, str]] = {
    "online_dpo_judge_objective_score": ("objective/", "mean raw score of each objective (ensemble judge)"),
    "online_dpo_judge_objective_agree": ("objective_agree/", "share of groups where an objective agrees with "
                                                             "the ensemble's pair"),
}

# Emitted by each sampler actor itself, tagged with its name.
SAMPLER_VERSION = "online_dpo_sampler_policy_version"
GROUPS = {"train": "Training", "pipeline": "Pipeline", "restarts": "Failures", "checkpoint": "Failures", "sync": "Weight sync", "policy": "Weight sync",
          "sample": "Sampling", "judge": "Judging", "eval": "Evaluation", "sampler": "Weight sync"}


def group(name: str) -> str:
    return GROUPS[name.removeprefix("online_dpo_").split("_")[0]]


def _read(record: dict, how) -> float | None:
    value = how(record) if callable(how) else record.get(how)
    return None if value is None else float(value)


class RayMetrics:
    """Gauges in Ray's metrics system, tagged with the run name (`run`, from the config) and the run
    directory's name (`run_id`, unique: two runs of one config are two series).

    Every value is set again at least every `refresh` seconds: a gauge that
    was set once (the baseline evaluation) otherwise drops out of Ray's
    export, and Prometheus loses it mid-run."""

    def __init__(self, run: str, run_id: str = "", refresh: float = 5.0):
        from ray.util.metrics import Gauge

        self.tags, self.refresh, self.refreshed = {"run": run, "run_id": run_id or run}, refresh, time.time()
        self.gauges = {name: Gauge(name, description=desc, tag_keys=("run", "run_id"))
                       for name, (_, _, desc) in METRICS.items()}
        self.objective_gauges = {name: Gauge(name, description=desc, tag_keys=("run", "run_id", "objective"))
                                 for name, (_, desc) in OBJECTIVE_METRICS.items()}
        self.last: dict[str, float] = {}
        self.last_objectives: dict[tuple[str, str], float] = {}

    def record(self, record: dict) -> None:
        for name, (kind, how, _) in METRICS.items():
            if record.get("kind") == kind:
                try:
                    value = _read(record, how)
                except (KeyError, ZeroDivisionError, TypeError):
                    value = None
                if value is not None:
                    self.gauges[name].set(value, tags=self.tags)
                    self.last[name] = value
        if record.get("kind") == "rollout":
            for name, (prefix, _) in OBJECTIVE_METRICS.items():
                for key, value in record.items():
                    if key.startswith(prefix):
                        self.last_objectives[(name, key.removeprefix(prefix))] = float(value)
                        self.objective_gauges[name].set(float(value), tags={**self.tags,
                                                                            "objective": key.removeprefix(prefix)})
        if time.time() - self.refreshed > self.refresh:
            self.refreshed = time.time()
            for name, value in self.last.items():
                self.gauges[name].set(value, tags=self.tags)
            for (name, objective), value in self.last_objectives.items():
                self.objective_gauges[name].set(value, tags={**self.tags, "objective": objective})


def sampler_version_gauge():
    from ray.util.metrics import Gauge

    return Gauge(SAMPLER_VERSION, description="policy version this sampler holds",
                 tag_keys=("run", "run_id", "sampler"))


class ExternalLoggers:
    """Optional TensorBoard and W&B; neither is a hard dependency."""

    def __init__(self, run_dir, run_name: str, tensorboard: bool, wandb: bool, config: dict):
        self.tb = self.wb = None
        if tensorboard:
            self.tb = _tensorboard_writer(str(run_dir / "tensorboard"))
        if wandb:
            try:
                import wandb as wb
            except ImportError:
                raise RuntimeError("metrics.wandb is on but wandb is not installed: "
                                   "pip install wandb, or set metrics.wandb: false") from None
            self.wb = wb.init(project="online-dpo", name=run_name, dir=str(run_dir), config=config)

    def record(self, record: dict) -> None:
        kind = record.get("kind")
        step = record.get("step") or record.get("round") or record.get("policy_version") or 0
        scalars = {f"{kind}/{k}": v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("kind", "time")}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wb is not None:
            self.wb.log(scalars)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wb is not None:
            self.wb.finish()


def _tensorboard_writer(logdir: str):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise RuntimeError("metrics.tensorboard is on but neither tensorboardX nor tensorboard is "
                               "installed: pip install tensorboard, or set metrics.tensorboard: false") from None
    return SummaryWriter(logdir)


def _fmt(x, spec: str, missing: str = "-") -> str:
    return missing if x is None else format(x, spec)


class ConsoleLog:
    def __init__(self, stream=None):
        self.stream = stream or sys.stdout

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def info(self, text: str) -> None:
        self._print(f"[online-dpo] {text}")

    def step(self, r: dict, total: int) -> None:
        rate = r.get("pairs_per_second") or 0.0   # over the last few steps
        lag = f"  lag {r['lag_mean']:.1f}" if r.get("lag_max") else ""
        objectives = "".join(f" {k.removeprefix('objective/')} {v:+.3f}" for k, v in r.items()
                             if k.startswith("objective/"))
        objectives = f" ({objectives.strip()})" if objectives else ""
        self._print(
            f"step {r['step']:>4}/{total}  pairs {r['pairs']:>6}  reward {_fmt(r.get('reward_mean'), '+.3f')}"
            f"{objectives}  "
            f"loss {_fmt(r['loss'], '.4f')}  acc {_fmt(r['rewards/accuracy'], '.2f')}  kl {_fmt(r['kl'], '+.3f')}  "
            f"{'(skipped: not finite)  ' if r.get('skipped') else ''}"
            f"v{r['policy_version']}{lag}  {rate:.1f} pairs/s")

    def eval(self, result: dict) -> None:
        parts = [f"eval v{result['policy_version']}: held-out reward {_fmt(result.get('reward'), '+.3f')}"]
        parts += [f"{k.removeprefix('objective/')} {v:+.3f}" for k, v in result.items() if k.startswith("objective/")]
        if "win_rate" in result:
            parts.append(f"win rate vs initial {result['win_rate']:.3f}")
        if "eval_judge/reward" in result:   # eval.judge: the independent judge, side by side
            parts.append(f"eval.judge: reward {_fmt(result['eval_judge/reward'], '+.3f')}"
                         + (f", win rate {_fmt(result.get('eval_judge/win_rate'), '.3f')}"
                            if "eval_judge/win_rate" in result else "")
                         + "".join(f", {k.removeprefix('eval_judge/objective/')} {v:+.3f}" for k, v in result.items()
                                   if k.startswith("eval_judge/objective/")))
        self._print("[online-dpo] " + ", ".join(parts))


class Tracker:
    """Fans each record out to the run directory, Ray metrics and optional loggers."""

    def __init__(self, run_dir, ray_metrics: RayMetrics | None = None, external: ExternalLoggers | None = None,
                 listener=None):
        self.run_dir, self.ray_metrics, self.external = run_dir, ray_metrics, external
        self.listener = listener   # listener(record): e.g. a Tune trial reporting its evaluations
        self.lock = threading.Lock()   # the rollout thread and the controller both log

    def log(self, record: dict) -> None:
        with self.lock:
            self.run_dir.log(record)
            if self.ray_metrics is not None:
                self.ray_metrics.record(record)
            if self.external is not None:
                self.external.record(record)
            if self.listener is not None:
                self.listener(record)

    def close(self) -> None:
        if self.external is not None:
            self.external.close()


class Reporter:
    """What the controller says about a run: each event's console line and its metrics record, in one place."""

    def __init__(self, console: ConsoleLog, tracker: Tracker):
        self.console, self.tracker = console, tracker

    def info(self, text: str) -> None:
        self.console.info(text)

    def record(self, record: dict) -> None:
        self.tracker.log(record)

    def step(self, record: dict, total: int, show: bool) -> None:
        self.tracker.log(record)
        if show:
            self.console.step(record, total)

    def evaluation(self, result: dict, step: int) -> None:
        self.tracker.log({**{k: v for k, v in result.items() if k not in ("prompts", "responses")}, "step": step})
        self.console.eval(result)

    def actor_event(self, event: dict, step: int, counts: dict) -> None:
        """A sampler or judge died (Ray restarts it; its work went to a live one) or came back."""
        if event["event"] == "died" and event["restarts"] > event["max_restarts"]:
            self.console.info(f"{event['actor']} died")
        elif event["event"] == "died":
            self.console.info(f"{event['actor']} died; Ray is restarting it (restart {event['restarts']} of "
                              f"{event['max_restarts']} for its kind) and its work goes to a live one")
        else:
            self.console.info(f"{event['actor']} is back after {event['seconds']:.1f}s")
        self.tracker.log({"kind": "restart", "step": step, **event, **counts})

    def learner_back(self, step: int, lost: int, dropped: int, seconds: float, counts: dict) -> None:
        self.console.info(f"the learner restarted from its checkpoint at step {step} after {seconds:.1f}s; "
                          f"{lost} step(s) to redo, {dropped} pair(s) from newer versions dropped")
        self.tracker.log({"kind": "restart", "actor": "learner", "event": "back", "step": step, "steps_lost": lost,
                          "pairs_dropped": dropped, "seconds": round(seconds, 1), **counts})

    def stopped_early(self, step: int, reason: str, run_dir, signalled: bool) -> None:
        more = (f"continue with: online-dpo train --resume {run_dir}" if signalled else
                f"to go further: online-dpo train --resume {run_dir} --set train.max_kl=..."
                if reason.startswith("KL limit") else "")
        self.console.info(f"stopped early at step {step} ({reason}); saved summary.json, curves.png and "
                          f"policy/{'; ' + more if more else ''}")
