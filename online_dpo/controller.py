"""The controller: sequences one online DPO run and owns its schedule.

  1. start the actors (topology.py) and the Ray Train gang (learner.py) at once;
  2. score the starting policy on held-out prompts while the gang starts;
  3. for each step of the schedule (schedule.py): take a batch of fresh pairs
     from the rollouts (rollout.py: lock-step or pipelined), send the learner
     a step order saying whether to sync and checkpoint after it, and record
     its result; a synced version goes to the samplers with their next request;
  4. score the final policy against the starting one; write policy/ and summary.json.

The controller is the only place that decides what happens at which step;
the learner executes orders, the rollouts fill a buffer. A checkpoint order
carries the controller's own state (data cursor, round counter, buffered
pairs, baseline), so a checkpoint restores the whole run: after a trainer
restart the controller plans again from the restored step, and
`online-dpo train --resume RUN_DIR` continues a killed run from it.
"""

from __future__ import annotations

import collections
import pickle
import statistics
import time

from .artifacts import NAME as FILES
from .config import Config, dump
from .data import PromptSource, load_splits
from .embedded import resolve_model
from .evaluation import evaluate, summary
from .learner import Learner, learner_spec
from .metrics import ConsoleLog, ExternalLoggers, RayMetrics, Tracker
from .report import plot
from .rollout import LockStep, Pipelined
from .run_dir import RunDir
from .schedule import Schedule
from .rollout import Starved
from .signals import Interrupted, Stop
from .topology import RunFailed, Topology
from .types import StepOrder


class Controller:
    def __init__(self, cfg: Config, run_dir: RunDir, console: ConsoleLog, tracker: Tracker, resume: bool = False,
                 stop: Stop | None = None):
        self.cfg, self.run_dir, self.log, self.tracker, self.resume = cfg, run_dir, console, tracker, resume
        self.stop = stop or Stop()
        t = cfg.train
        self.schedule = Schedule(t.max_steps, cfg.sync.every_steps, cfg.checkpoint.every_steps,
                                 cfg.eval.every_steps)
        self.lag = 0 if cfg.sync.mode == "sync" else cfg.sync.max_policy_lag
        self.step, self.version = 0, 0
        self.baseline: dict = {}
        self.last_train: dict = {}
        self.totals = collections.Counter()      # learner seconds: busy, waiting
        self.learner_restarts, self.steps_lost = 0, 0
        self.checkpointed = 0       # the step of the latest checkpoint
        self.start_step = 0         # where this process started (a resumed run starts past 0)
        self.last_result = time.time()
        self.learner_restart_seconds: list[float] = []
        self.lags: dict[int, dict] = {}
        self.recent_kl: list[float] = []
        self.start_time = time.time()
        self.train_start: float | None = None
        self.train_end: float | None = None

    # ------------------------------------------------------------ set-up

    def prepare_data(self, policy_path: str):
        from transformers import AutoTokenizer

        d = self.cfg.data
        tok = AutoTokenizer.from_pretrained(policy_path, trust_remote_code=self.cfg.model.trust_remote_code)
        train, heldout = load_splits(d.source, d.split, d.eval_source, d.eval_split, d.prompt_field, tok,
                                     d.format, d.system_prompt, d.max_prompt_tokens, self.cfg.eval.prompts)
        return PromptSource(train, seed=self.cfg.run.seed, shuffle=d.shuffle), heldout

    def check_placement(self) -> None:
        """Refuse a plan the cluster cannot hold, instead of leaving actors pending."""
        from .placement import check, cluster_nodes

        if not self.cfg.run.check_resources:
            return
        text, problems = check(self.cfg, cluster_nodes())
        if problems:
            raise RunFailed("the cluster cannot hold this run (set run.check_resources: false on an "
                            "autoscaling cluster):\n" + text)

    def make_rollouts(self, topo: Topology, source: PromptSource):
        cfg, s = self.cfg, self.cfg.sampler
        sampling = dict(n=s.n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens,
                        logprobs=s.logprobs)
        capacity = cfg.sync.buffer_pairs or 2 * cfg.train.batch_size
        args = (topo.samplers, topo.judges, source, sampling, cfg.run.seed, self.tracker.log, capacity)
        if cfg.sync.mode == "sync":
            return LockStep(*args)
        per_call = s.prompts_per_call or max(4, cfg.train.batch_size // max(1, s.num_actors))
        return Pipelined(*args, prompts_per_call=per_call)

    def run(self) -> dict:
        cfg = self.cfg
        policy_path = resolve_model(cfg.model.policy)
        reference_path = resolve_model(cfg.model.reference) if cfg.model.reference else policy_path
        if not self.resume:
            self.run_dir.write_config(dump(cfg))
        self.check_placement()
        topo = self.topo = Topology.start(cfg, policy_path)
        topo.samplers.notify = topo.judges.notify = lambda event: self.actor_event(event, topo)
        storage = cfg.checkpoint.storage or str(self.run_dir.path / "ray")
        learner = Learner(cfg, learner_spec(cfg, policy_path, reference_path, FILES), topo.broker,
                          topo.store, storage, self.run_dir.path.name)
        learner.start()   # the gang starts while the engines build
        try:
            source, heldout = self.prepare_data(policy_path)
            self.log.info(f"prompts: {len(source.prompts)} train, {len(heldout)} held-out")
            topo.wait_ready()
            self.log.info(f"actors up: {len(topo.samplers.handles)} sampler(s), {len(topo.judges.handles)} "
                          f"judge(s) ({time.time() - self.start_time:.0f}s)")
            topo.form_weight_group()
            if cfg.serve.enabled:
                topo.start_serving(cfg, policy_path)
                self.log.info(f"serving the live policy at {topo.serve_where} "
                              f"(model '{cfg.serve.model_name or cfg.run.name}')")
            result = self.run_loop(topo, learner, source, heldout)
            if topo.serve_url and cfg.serve.keep_alive:
                self.log.info(f"training done; serving the final policy at {topo.serve_where} until Ctrl-C")
                _wait_forever()
            return result
        finally:
            # fit() must return before Ray shuts down (a Ray call after that ends the process); the
            # broker closed before the final evaluation, so after a finished run it mostly has.
            learner.stop("the run ended", timeout=60)
            topo.shutdown()

    # ------------------------------------------------------------ the run

    def run_loop(self, topo: Topology, learner: Learner, source: PromptSource, heldout: list) -> dict:
        rollouts = self.make_rollouts(topo, source)
        sampling = rollouts.sampling
        if not self.resume:
            self.baseline = self.evaluated(evaluate(topo.samplers, topo.judges, heldout, sampling, None, 0))
            rollouts.start()   # sample from the starting weights while the gang starts
        start = learner.wait_start()
        self.log.info(f"learner up ({time.time() - self.start_time:.0f}s)")
        if self.resume:
            if start.controller is None:
                raise RunFailed(f"{self.run_dir.path} has no checkpoint to resume from")
            self.restore(pickle.loads(start.controller), rollouts)
            self.run_dir.truncate_metrics(lambda r: _before(r, start.step, rollouts.round, start.version))
            self.log.info(f"resumed at step {start.step} (policy version {start.version}) from {start.checkpoint}")
        self.step, self.version, self.checkpointed = start.step, start.version, start.step
        self.start_step = start.step
        if start.weights is not None:
            rollouts.set_weights(start.weights)
        rollouts.start()
        self.tracker.log({"kind": "restart", "event": "counts", "step": self.step, **self.restart_counts(topo)})
        self.train_start = self.last_result = time.time()
        self.stop.graceful = True
        try:
            reason = self.learn(rollouts, learner, topo, heldout)
        finally:
            self.stop.graceful = False
            rollouts.stop()
        self.train_end = time.time()
        result = self.finish(topo, learner, rollouts, heldout, reason)
        if self.stop.requested:
            raise Interrupted(self.stop.code, self.stop.reason)
        return result

    def finish(self, topo: Topology, learner: Learner, rollouts, heldout: list, reason: str | None) -> dict:
        """Final evaluation (not after a signal: stop fast), policy/, summary.json, curves.png."""
        learner.close("training is done")   # rank 0 leaves its loop; Ray Train winds down meanwhile
        after = {} if self.stop.requested else self.evaluated(evaluate(
            topo.samplers, topo.judges, heldout, rollouts.sampling, rollouts.weights, self.version, self.baseline))
        policy_dir = str(self.run_dir.copy_policy(learner.checkpoint(self.step))) if self.step else None
        extra = {"mode": self.cfg.sync.mode, "partial": reason is not None, "stop_reason": reason,
                 "resumed_from_step": self.start_step if self.resume else None,
                 "policy_dir": policy_dir, "run_dir": str(self.run_dir.path),
                 "learner_restarts": self.learner_restarts, "steps_lost": self.steps_lost,
                 "sync_bytes_per_version": round(self.totals["sync_bytes"] / self.totals["syncs"])
                 if self.totals["syncs"] else None,
                 "learner_peak_rss_mib": self.last_train.get("peak_rss_mib"),
                 **self.pipeline_stats(rollouts, len(topo.samplers.handles))}
        result = summary(self.baseline, after, self.last_train, self.train_end - self.train_start,
                         self.start_step * self.cfg.train.batch_size, time.time() - self.start_time, rollouts.stats(),
                         {**topo.restarts(), "learner": {"restarts": self.learner_restarts,
                                                           "restart_seconds": self.learner_restart_seconds}}, extra)
        self.run_dir.write_json("summary.json", result)
        plot(self.run_dir.path)
        if reason is not None:
            more = (f"continue with: online-dpo train --resume {self.run_dir.path}" if self.stop.requested else
                    f"to go further: online-dpo train --resume {self.run_dir.path} --set train.max_kl=..."
                    if reason.startswith("KL limit") else "")
            self.log.info(f"stopped early at step {self.step} ({reason}); saved summary.json, curves.png and "
                          f"policy/{'; ' + more if more else ''}")
        return result

    def learn(self, rollouts, learner: Learner, topo: Topology, heldout: list) -> str | None:
        """Feed the learner step orders until the schedule is done; keep `prefetch` orders queued.
        Returns why it stopped early (a signal, or a judge that cannot separate samples any more),
        after a checkpoint of where it stopped; None when the schedule is done."""
        import ray

        prefetch = 0 if self.cfg.sync.mode == "sync" else 1
        pending: collections.deque = collections.deque()   # (plan, ref) in step order
        reason = None
        while self.step < self.schedule.max_steps:
            if self.stop.requested and reason is None:
                reason = self.stop.reason
            reason = reason or self.kl_guard()
            next_step = self.step + len(pending) + 1
            can_submit = len(pending) <= prefetch and next_step <= self.schedule.max_steps and reason is None
            if pending and (not can_submit or ray.wait([pending[0][1]], timeout=0)[0]):
                plan, ref = pending.popleft()
                if not self.collect(plan, ray.get(ref), rollouts, learner, topo, heldout):
                    pending.clear()   # the gang restarted: plan again from its step
                continue
            if reason is not None:   # stopping early, and every submitted step is back
                break
            plan = self.schedule.plan(next_step)
            want = self.schedule.steps_left_in_version(next_step) * self.cfg.train.batch_size
            try:
                batch = rollouts.take(self.cfg.train.batch_size, plan.version_before - self.lag, want=want,
                                      timeout=None if prefetch == 0 else 0.05)
            except Starved as e:
                if self.step == 0 and not pending:
                    raise
                reason = f"converged: {e}"
                continue
            if batch is None:
                continue
            lags = [plan.version_before - p.policy_version for p in batch]
            self.lags[plan.step] = {"lag_min": min(lags), "lag_mean": statistics.fmean(lags), "lag_max": max(lags)}
            state = pickle.dumps(self.state(rollouts)) if plan.checkpoint else None
            order = StepOrder(step=plan.step, pairs=tuple(batch), sync=plan.sync, version=plan.version_after,
                              checkpoint=state, final=plan.final, incarnation=learner.hellos)
            pending.append((plan, learner.submit(order)))
        if reason is not None and self.step > 0:
            self.save_now(rollouts, learner)
        return reason

    def kl_guard(self) -> str | None:
        """Stop before the policy drifts into a collapse the judge still rewards (repetition)."""
        limit, recent = self.cfg.train.max_kl, self.recent_kl[-5:]
        if limit is None or len(recent) < 5 or statistics.fmean(recent) <= limit:
            return None
        return (f"KL limit: the KL estimate averaged {statistics.fmean(recent):.1f} nats per sequence over the "
                f"last 5 steps, above train.max_kl ({limit:g})")

    def save_now(self, rollouts, learner: Learner) -> None:
        """A checkpoint of the step the learner is at, outside the schedule (before stopping early)."""
        import ray

        if self.checkpointed == self.step:
            return
        order = StepOrder(step=self.step, pairs=(), sync=False, version=self.version,
                          checkpoint=pickle.dumps(self.state(rollouts)), incarnation=learner.hellos)
        result = ray.get(learner.submit(order))
        if "metrics" not in result:
            raise RunFailed(f"the learner could not save step {self.step}: {result}")
        self.checkpointed = self.step
        self.log.info(f"saved a checkpoint at step {self.step}")

    def collect(self, plan, result: dict, rollouts, learner: Learner, topo: Topology, heldout: list) -> bool:
        """Record one finished step; False if the gang restarted instead (the controller rewinds)."""
        if "closed" in result:
            learner.join(timeout=60)
            raise learner.failure()
        if "restarted" in result:
            self.restarted(result["restarted"], rollouts, learner)
            return False
        m = result["metrics"]
        self.last_result = time.time()
        self.step, self.version = plan.step, plan.version_after
        if plan.checkpoint:
            self.checkpointed = plan.step
        if result["weights"] is not None:
            rollouts.set_weights(result["weights"])
        self.recent_kl.append(m["kl"])
        self.totals["busy"] += m["step_seconds"]
        self.totals["wait"] += m["wait_seconds"]
        if m.get("sync_bytes"):
            self.totals["sync_bytes"] += m["sync_bytes"]
            self.totals["syncs"] += 1
        record = {"kind": "train", **m, **self.lags.pop(plan.step, {}),
                  "reward_mean": rollouts.latest.get("reward_mean"),
                  **{k: v for k, v in rollouts.latest.items() if k.startswith("objective/")},
                  "wall_seconds": time.time() - self.train_start,
                  **self.pipeline_stats(rollouts, len(topo.samplers.handles))}
        self.tracker.log(record)
        self.last_train = record
        if plan.step % self.cfg.metrics.log_every_steps == 0 or plan.final:
            self.log.step(record, self.schedule.max_steps)
        if plan.evaluate:
            self.evaluated(evaluate(topo.samplers, topo.judges, heldout, rollouts.sampling, rollouts.weights,
                                    self.version, self.baseline))
        return True

    def restarted(self, start, rollouts, learner: Learner) -> None:
        """Ray Train restored the gang from its latest checkpoint: replan from there."""
        learner.hellos += 1
        lost, seconds = self.step - start.step, time.time() - self.last_result
        self.learner_restarts += 1
        self.steps_lost += lost
        self.learner_restart_seconds.append(round(seconds, 1))
        dropped = rollouts.reset(start.weights, start.version)
        self.step, self.version = start.step, start.version
        self.topo.form_weight_group()   # the old generation's rank 0 is gone
        self.log.info(f"the learner restarted from its checkpoint at step {start.step} after {seconds:.1f}s; "
                      f"{lost} step(s) to redo, {dropped} pair(s) from newer versions dropped")
        self.tracker.log({"kind": "restart", "actor": "learner", "event": "back", "step": start.step,
                          "steps_lost": lost, "pairs_dropped": dropped, "seconds": round(seconds, 1),
                          **self.restart_counts(self.topo)})

    def actor_event(self, event: dict, topo: Topology) -> None:
        """A sampler or judge died (Ray restarts it; its work went to a live one) or came back."""
        if event["event"] == "died" and event["restarts"] > event["max_restarts"]:
            self.log.info(f"{event['actor']} died")
        elif event["event"] == "died":
            self.log.info(f"{event['actor']} died; Ray is restarting it (restart {event['restarts']} of "
                          f"{event['max_restarts']} for its kind) and its work goes to a live one")
        else:
            self.log.info(f"{event['actor']} is back after {event['seconds']:.1f}s")
        if event["actor"].startswith("sampler"):
            topo.form_weight_group()   # without the dead one, or with the one that came back
        self.tracker.log({"kind": "restart", "step": self.step, **event, **self.restart_counts(topo)})

    def restart_counts(self, topo: Topology) -> dict:
        return {"sampler_restarts": topo.samplers.restarts, "judge_restarts": topo.judges.restarts,
                "learner_restarts": self.learner_restarts}

    def pipeline_stats(self, rollouts, samplers: int) -> dict:
        wall = max(1e-9, time.time() - (self.train_start or time.time()))
        busy, wait = self.totals["busy"], self.totals["wait"]
        return {"pipeline_efficiency": round(busy / wall, 4),
                "learner_idle": round(wait / max(1e-9, busy + wait), 4),
                "sampler_idle": round(max(0.0, 1 - sum(rollouts.busy.values()) / (samplers * wall)), 4),
                "stale_dropped": rollouts.buffer.stale}

    def evaluated(self, result: dict) -> dict:
        if result:
            self.tracker.log({**{k: v for k, v in result.items() if k not in ("prompts", "responses")},
                              "step": self.step})
            self.log.eval(result)
        return result

    # ------------------------------------------------------------ state for checkpoints

    def state(self, rollouts) -> dict:
        return {"rollouts": rollouts.state(), "baseline": self.baseline, "totals": dict(self.totals),
                "learner_restarts": self.learner_restarts, "steps_lost": self.steps_lost}

    def restore(self, state: dict, rollouts) -> None:
        rollouts.restore(state["rollouts"])
        self.baseline = state["baseline"]
        self.totals = collections.Counter(state["totals"])
        self.learner_restarts, self.steps_lost = state["learner_restarts"], state["steps_lost"]


def _before(record: dict, step: int, round_: int, version: int) -> bool:
    """Whether a metrics record comes from before a checkpoint (records after it are redone)."""
    kind = record.get("kind")
    if kind == "rollout":
        return record["round"] <= round_
    if kind == "eval":
        return record["policy_version"] <= version
    return record.get("step", 0) <= step


def _wait_forever() -> None:
    while True:   # until a signal (Interrupted)
        time.sleep(3600)


def train(cfg: Config, console: ConsoleLog | None = None, resume_dir: str | None = None,
          stop: Stop | None = None, listener=None) -> dict:
    """Run one online DPO job on the connected Ray cluster (or continue one); returns the summary.
    RunFailed and Interrupted carry `run_dir`, so the caller can say how to resume.
    `listener(record)` sees every record the run logs (tune.py reports evaluations through it)."""
    console = console or ConsoleLog()
    run_dir = RunDir.open(resume_dir) if resume_dir else RunDir.create(cfg.run.output_dir, cfg.run.name)
    console.info(f"run dir: {run_dir.path}")
    m = cfg.metrics
    external = ExternalLoggers(run_dir.path, cfg.run.name, m.tensorboard, m.wandb, cfg.model_dump(mode="json")) \
        if (m.tensorboard or m.wandb) else None
    tracker = Tracker(run_dir, RayMetrics(cfg.run.name), external, listener)
    controller = Controller(cfg, run_dir, console, tracker, resume=resume_dir is not None, stop=stop)
    try:
        return controller.run()
    except (RunFailed, Interrupted) as e:
        e.run_dir, e.checkpoint_step = run_dir.path, controller.checkpointed
        raise
    finally:
        tracker.close()
        run_dir.close()


__all__ = ["Controller", "train", "RunFailed"]
