"""The controller: sequences one online DPO run from its plan.

  1. start the actors (topology.py) and the Ray Train gang (gang.py) at once;
  2. score the starting policy on held-out prompts while the gang starts;
  3. for each step of the schedule (schedule.py): take a batch of fresh pairs
     from the rollouts (rollout.py: lock-step or pipelined), send the gang a
     step order saying whether to sync and checkpoint after it, and record its
     result; a synced version goes to the samplers with their next request;
  4. score the final policy against the starting one; write policy/ and summary.json.

The controller is the only place that decides what happens at which step;
the gang executes orders, the rollouts fill a buffer, `RunStats` keeps the
books. A checkpoint order carries the controller's own state as JSON (data
cursor, round counter, buffered pairs, baseline, counters), so a checkpoint
restores the whole run: after a gang restart the controller plans again from
the restored step, and `online-dpo train --resume RUN_DIR` continues a killed
run from it.
"""

from __future__ import annotations

import collections
import json
import time

from .data import DataError, load_prompts, read_prompts
from .errors import RunFailed
from .evaluation import HeldOut
from .gang import Gang
from .metrics import ConsoleLog, ExternalLoggers, RayMetrics, Reporter, Tracker
from .pairs_log import PairLog
from .plan import RunPlan
from .report import plot
from .rollout import JudgeFailed, Starved, make_rollouts
from .run_dir import RunDir
from .run_stats import RunStats
from .signals import Interrupted, Stop
from .topology import Topology
from .types import Closed, Restarted, StepOrder

FIT_START_SECONDS = 60   # the driver waits this long at most for the gang's thread to start fit()
RENDER_SECONDS = 900     # a sampler renders and tokenizes the run's prompts within this


class Controller:
    def __init__(self, plan: RunPlan, run_dir: RunDir, console: ConsoleLog, tracker: Tracker, resume: bool = False,
                 stop: Stop | None = None):
        self.plan, self.run_dir, self.resume = plan, run_dir, resume
        self.report = Reporter(console, tracker)
        self.stop, self.stats = stop or Stop(), RunStats()
        self.step = self.version = 0
        self.checkpointed = self.start_step = 0   # the latest checkpoint's step; where this process started
        self.topo = self.gang = self.rollouts = None
        self.fatal: str | None = None   # why the run failed after stopping cleanly (a broken judge, ...)
        self.held_out = None   # the held-out evaluation (evaluation.HeldOut)
        self.pairs = PairLog(run_dir.path, plan.pairs_log)   # the preference log, RUN_DIR/pairs/

    def run(self) -> dict:
        plan = self.plan
        if not self.resume:
            self.run_dir.write_config(plan.config_yaml)
        self.topo, self.gang = start_actors(plan, self.run_dir, lambda event: self.report.actor_event(
            event, self.step, self.stats.restart_counts(self.topo)))   # a sampler or judge died, or is back
        topo = self.topo
        self.stats.mark("actors_started")
        try:
            rows = read(plan.data, self.report)   # while the actors start
            topo.wait_ready()
            judges = "the judge in each sampler" if topo.judges is topo.samplers else f"{len(topo.judges.handles)} judge(s)"
            self.report.info(f"actors up: {len(topo.samplers.handles)} sampler(s), {judges} "
                             f"({self.stats.mark('actors_up'):.0f}s after launch)")
            source, heldout = prompts(plan.data, rows, self.stats, self.report, topo.samplers)
            self.held_out = HeldOut(topo.samplers, topo.judges, topo.evaluators, heldout, plan.eval.sampling,
                                    self.report.evaluation, self.report.info)
            topo.form_weight_group()
            start_serving(topo, plan.serve, self.report)
            result = self.run_loop(make_rollouts(plan.rollouts, topo.samplers, topo.judges, source, self.report.record))
            keep_serving(topo, plan.serve, self.report)
            return result
        finally:
            # fit() must return before Ray shuts down (a Ray call after that ends the process); the
            # broker closed before the final evaluation, so after a finished run it mostly has.
            self.gang.stop("the run ended", timeout=60)
            topo.shutdown()

    def run_loop(self, rollouts) -> dict:
        self.rollouts = rollouts
        if not self.resume:
            self.stats.baseline = self.held_out(None, 0, None, 0)
            self.stats.mark("baseline_eval")
            rollouts.start()   # sample from the starting weights while the gang starts
        start = self.gang.wait_start()
        self.report.info(f"learner up ({self.stats.mark('learner_up'):.0f}s after launch)")
        if self.resume:
            resume_from(start, self.run_dir, self.rollouts, self.stats, self.plan, self.pairs)
            self.report.info(f"resumed at step {start.step} (policy version {start.version}) from {start.checkpoint}"
                             + (f"; changed {', '.join(self.plan.resume_changes)}" if self.plan.resume_changes else ""))
        self.step, self.version, self.checkpointed, self.start_step = start.step, start.version, start.step, start.step
        rollouts.set_weights(start.weights)
        rollouts.start()
        self.report.record({"kind": "restart", "event": "counts", "step": self.step,
                            **self.stats.restart_counts(self.topo)})
        self.stats.training()
        self.stop.graceful = True   # a first signal stops between steps, and lets the final copy finish
        try:
            try:
                reason = self.learn()
            finally:
                rollouts.stop()
            self.stats.trained()
            result = self.finish(reason)
        finally:
            self.stop.graceful = False
        if self.stop.requested:
            raise Interrupted(self.stop.code, self.stop.reason)
        if self.fatal:
            raise RunFailed(self.fatal)
        return result

    def finish(self, reason: str | None) -> dict:
        """Final evaluation (not after a signal: stop fast), policy/, summary.json, curves.png."""
        self.gang.close("training is done")   # rank 0 leaves its loop; Ray Train winds down meanwhile
        skip = self.stop.requested or self.fatal   # stop fast; a broken judge or stuck actor would not score
        after = {} if skip else self.held_out(self.rollouts.weights, self.version, self.stats.baseline, self.step)
        policy_dir = str(self.run_dir.copy_policy(self.gang.checkpoint(self.step))) if self.step else None
        self.pairs.end(self.step, self.rollouts.dropped(), self.rollouts.waiting())
        stopped_by = stop_kind(reason, self.stop.requested, bool(self.fatal))
        extra = {"mode": self.plan.rollouts.mode, "partial": stopped_by in ("signal", "failure"),
                 "stopped_by": stopped_by, "stop_reason": reason or f"max_steps: all {self.step} steps are done",
                 "pairs_log": self.pairs.counts(), "judge_usage": judge_usage(self.topo.judges, skip),
                 "resumed_from_step": self.start_step if self.resume else None,
                 "policy_dir": policy_dir, "run_dir": str(self.run_dir.path)}
        result = self.stats.summary(after, self.rollouts, self.topo,
                                    self.start_step * self.plan.learner.batch_size, extra)
        self.run_dir.write_json("summary.json", result)
        plot(self.run_dir.path)
        if reason is not None:
            self.report.stopped_early(self.step, reason, self.run_dir.path, self.stop.requested)
        return result

    def learn(self) -> str | None:
        """Feed the gang step orders until the schedule is done; keep `prefetch` orders queued.
        Returns why it stopped early (a signal, or a judge that cannot separate samples any more),
        after a checkpoint of where it stopped; None when the schedule is done."""
        import ray

        prefetch = 0 if self.plan.rollouts.mode == "sync" else 1
        pending: collections.deque = collections.deque()   # (step plan, ref) in step order
        reason, last, stalled = None, self.plan.schedule.max_steps, False
        while self.step < last:
            if reason is None:
                reason, kind = self.stats.why_stop(self.stop.reason if self.stop.requested else None, self.plan.max_kl,
                                                   self.plan.stall_timeout, lambda: waiting_on(pending, self.rollouts))
                self.fatal, stalled = reason if kind else self.fatal, kind == "stall"
            if stalled and pending:   # a stalled learner may never answer: stop without it
                break
            next_step = self.step + len(pending) + 1
            can_submit = len(pending) <= prefetch and next_step <= last and reason is None
            if pending and (not can_submit or ray.wait([pending[0][1]], timeout=0)[0]):
                if not ray.wait([pending[0][1]], timeout=1.0)[0]:
                    continue   # the gang is busy: look at the watchdog again
                step_plan, ref = pending.popleft()
                if not self.collect(step_plan, ray.get(ref, timeout=60)):   # ready: ray.wait said so
                    pending.clear()   # the gang restarted: plan again from its step
                continue
            if reason is not None:   # stopping early, and every submitted step is back
                break
            submitted, reason = self.submit(next_step, None if prefetch == 0 else 0.05, first=not pending)
            if submitted is not None:
                pending.append(submitted)
        if reason is not None and self.step > 0 and not (stalled and pending):
            self.save_now()
        return reason

    def submit(self, step: int, timeout: float | None, first: bool):
        """Order `step` once its pairs are there: ((its plan, the order's ref), None); (None, None) while
        they are not; (None, why to stop) when they will not come (`first`: nothing is in flight)."""
        step_plan = self.plan.schedule.plan(step)
        batch_size = self.plan.learner.batch_size
        want = self.plan.schedule.steps_left_in_version(step) * batch_size
        try:
            batch = self.rollouts.take(batch_size, step_plan.version_before - self.plan.rollouts.max_lag,
                                       want=want, timeout=timeout)
        except Starved as e:
            if self.step == 0 and first:
                raise
            return None, f"converged: {e}"
        except JudgeFailed as e:   # stop as for any early end (everything saved), then fail
            self.fatal = str(e)
            return None, self.fatal
        if batch is None:
            return None, None
        self.stats.lag(step, step_plan.version_before, batch)
        self.pairs.ordered(step, batch)
        state = json.dumps(self.state()) if step_plan.checkpoint else None
        order = StepOrder(step=step, pairs=tuple(batch), sync=step_plan.sync, version=step_plan.version_after,
                          checkpoint=state, final=step_plan.final, incarnation=self.gang.hellos)
        return (step_plan, self.gang.submit(order)), None

    def save_now(self) -> None:
        """A checkpoint of the step the gang is at, outside the schedule (before stopping early)."""
        if self.checkpointed != self.step:
            self.pairs.write(self.step, (), self.rollouts.dropped())
            self.gang.save_now(self.step, self.version, json.dumps(self.state()))
            self.checkpointed = self.step
            self.report.info(f"saved a checkpoint at step {self.step}")

    def collect(self, step_plan, result) -> bool:
        """Record one finished step; False if the gang restarted instead (the controller rewinds)."""
        if isinstance(result, Closed):
            self.gang.join(timeout=60)
            raise self.gang.failure()
        if isinstance(result, Restarted):
            self.restarted(result.start)
            return False
        self.step, self.version = step_plan.step, step_plan.version_after
        self.checkpointed = step_plan.step if step_plan.checkpoint else self.checkpointed
        self.pairs.done(step_plan.step, self.rollouts.dropped())
        self.rollouts.set_weights(result.weights)
        if line := self.topo.check_sync(result.weights, result.digests):   # sync.verify
            self.report.info(f"sync checked: {line}")
        record = self.stats.step_done(result.metrics, self.rollouts, len(self.topo.samplers.handles))
        self.report.step(record, self.plan.schedule.max_steps,
                         show=step_plan.step % self.plan.log_every_steps == 0 or step_plan.final)
        if step_plan.evaluate:
            self.held_out(self.rollouts.weights, self.version, self.stats.baseline, self.step)
        return True

    def restarted(self, start) -> None:
        """Ray Train restored the gang from its latest checkpoint: replan from there."""
        self.gang.restarted()
        lost = self.step - start.step
        seconds = self.stats.learner_restarted(lost)
        pending, _ = self.pairs.restarted(start.step)   # orders never run; the lost steps' rows relabelled
        self.rollouts.lost(pending, trained=lost * self.plan.learner.batch_size)
        dropped = self.rollouts.reset(start.weights, start.version)
        self.step, self.version = start.step, start.version
        self.topo.form_weight_group()   # the old generation's rank 0 is gone
        self.report.learner_back(start.step, lost, dropped, seconds, self.stats.restart_counts(self.topo))

    def state(self) -> dict:
        """What a checkpoint keeps of the controller (JSON): the rollouts' cursor and buffer, and the books."""
        return {"rollouts": self.rollouts.state(), "stats": self.stats.state()}


def resume_from(start, run_dir: RunDir, rollouts, stats: RunStats, plan: RunPlan, pairs: PairLog) -> None:
    """Restore the controller's state saved with the checkpoint the gang restored; cut the metrics and the
    preference log after it; record in config.yaml what this resume changed, and at which step."""
    if start.controller is None:
        raise RunFailed(f"{run_dir.path} has no checkpoint to resume from")
    state = json.loads(start.controller)
    rollouts.restore(state["rollouts"])
    stats.restore(state["stats"])
    run_dir.truncate_metrics(lambda r: _before(r, start.step, rollouts.round, start.version))
    pairs.truncate(start.step)
    if plan.resume_changes:
        run_dir.record_resume(start.step, plan.resume_changes, plan.config_yaml)


def stop_kind(reason: str | None, signalled: bool, failed: bool) -> str:
    """Why a run ended, as a word: its own stop rules (max_steps, converged, max_kl) leave a whole run;
    a signal or a failure leaves a partial one."""
    if signalled or failed:
        return "signal" if signalled else "failure"
    return "max_steps" if reason is None else "converged" if reason.startswith("converged") else "max_kl"


def judge_usage(judges, skip: bool) -> dict:
    """An endpoint judge's request, cache-hit, retry and token counts, summed over its live actors; {} when
    the run is stopping fast (a hung or broken judge would not answer) or none answers within 10 s."""
    import ray

    total = collections.Counter()
    if skip:
        return {}
    try:
        for usage in ray.get([judges.handles[i].usage.remote() for i in judges.live()], timeout=10):
            total.update(usage)
    except Exception:
        return {}
    return dict(total)


def waiting_on(pending, rollouts) -> str:
    """What a stalled run waits on: the gang's step in flight, and the sampler and judge calls."""
    held = [f"step {pending[0][0].step} on the learner"] if pending else []
    return ", ".join(held + rollouts.outstanding())


def read(data, report: Reporter):
    """The run's prompt rows, read here while the actors start (a source that cannot be read stops them:
    the reason is said at once, and again as the run's error once they are down)."""
    try:
        return read_prompts(data)
    except DataError as e:
        report.info(f"the prompts cannot be read: {e}; stopping the actors that were starting")
        raise


def prompts(data, rows, stats: RunStats, report: Reporter, samplers):
    """The run's prompts: its rows rendered and tokenized by a sampler (whose engine has the policy's
    tokenizer and knows its context), then filtered here. Bad data stops the actors, as in `read`."""
    import ray

    sampler = samplers.handles[samplers.wait_live()[0]]

    def on_sampler(method: str, *args):
        try:
            return ray.get(getattr(sampler, method).remote(*args), timeout=RENDER_SECONDS)
        except ray.exceptions.RayTaskError as e:   # a DataError raised there (no chat template) is the data's
            if isinstance(e.cause, DataError):
                raise e.cause from None
            raise

    try:
        source, heldout = load_prompts(data, rows, lambda *args: on_sampler("render_prompts", *args),
                                       on_sampler("context"))
    except DataError as e:
        report.info(f"the prompts cannot be used: {e}; stopping the actors")
        raise
    stats.mark("prompts")
    report.info(f"prompts: {len(source.prompts)} train, {len(heldout)} held-out"
                + (f"; skipped {source.skipped_text}" if source.skipped else ""))
    stats.skipped = source.skipped
    return source, heldout


def start_actors(plan: RunPlan, run_dir: RunDir, on_actor_event) -> tuple[Topology, Gang]:
    """Check the plan fits, then create every actor and start the gang, without waiting for any."""
    if plan.check_resources:
        from .placement import require_fit
        require_fit(plan.asks)
    topo = Topology.start(plan.samplers, plan.judges, plan.weights_transport, plan.name, plan.names, plan.evaluators,
                          run_id=run_dir.path.name)
    topo.on_actor_event(on_actor_event)
    storage = plan.gang.storage or str(run_dir.path / "ray")
    gang = Gang(plan.gang, plan.learner, topo.broker, topo.store, storage, run_dir.path.name)
    gang.start()   # the gang starts while the engines build
    # The learner's chain (Ray Train's controller, then the workers) is the longest to the first step:
    # the driver's other work waits until the gang's thread has fit() started, rather than share the
    # interpreter with it.
    gang.fitting.wait(timeout=FIT_START_SECONDS)
    return topo, gang


def _before(record: dict, step: int, round_: int, version: int) -> bool:
    """Whether a metrics record comes from before a checkpoint (records after it are redone)."""
    kind = record.get("kind")
    if kind == "rollout":
        return record["round"] <= round_
    if kind == "eval":
        return record["policy_version"] <= version
    return record.get("step", 0) <= step


def start_serving(topo: Topology, serve, report: Reporter) -> None:
    """Deploy the policy server (serve.enabled) before training starts."""
    if serve:
        topo.start_serving(serve)
        report.info(f"serving the live policy at {topo.serve_where} (model '{serve.spec.served_name}')")


def keep_serving(topo: Topology, serve, report: Reporter) -> None:
    """serve.keep_alive: after training, serve the final policy until a signal (Interrupted)."""
    if topo.serve_url and serve.keep_alive:
        report.info(f"training done; serving the final policy at {topo.serve_where} until Ctrl-C")
        while True:
            time.sleep(3600)


def train(plan: RunPlan, console: ConsoleLog | None = None, resume_dir: str | None = None,
          stop: Stop | None = None, listener=None) -> dict:
    """Run one online DPO job on the connected Ray cluster (or continue one); returns the summary.
    RunFailed and Interrupted carry `run_dir`, so the caller can say how to resume.
    `listener(record)` sees every record the run logs (tune.py reports evaluations through it)."""
    console = console or ConsoleLog()
    if plan.needs_embedded:
        from .embedded.build import ensure_default
        ensure_default()   # built once per machine; a no-op after that
    run_dir = RunDir.open(resume_dir) if resume_dir else RunDir.create(plan.output_dir, plan.name)
    console.info(f"run dir: {run_dir.path}")
    external = ExternalLoggers(run_dir.path, plan.name, plan.tensorboard, plan.wandb, plan.config) \
        if (plan.tensorboard or plan.wandb) else None
    tracker = Tracker(run_dir, RayMetrics(plan.name, run_dir.path.name), external, listener)
    controller = Controller(plan, run_dir, console, tracker, resume=resume_dir is not None, stop=stop)
    try:
        return controller.run()
    except (RunFailed, Interrupted) as e:
        e.run_dir, e.checkpoint_step = run_dir.path, controller.checkpointed
        raise
    finally:
        tracker.close()
        run_dir.close()


__all__ = ["Controller", "train", "RunFailed"]
