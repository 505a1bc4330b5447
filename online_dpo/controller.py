"""The controller: owns the topology and runs the online DPO loop.

Topology (one place decides which actors exist, where, and how many):
  sampler-i  vLLM engines that sample n completions per prompt
  judge-i    judges that turn completions into preference pairs
  broker     the versioned pair buffer between rollouts and the learner
  trainer    a Ray Train TorchTrainer gang (DDP workers, see trainer.py)

Lock-step loop, one policy version v at a time:
  1. prompts from the prompt source;
  2. samplers (all holding v) return n completions per prompt;
  3. judges keep best vs worst of each prompt, dropping ties and identical pairs;
  4. pairs go to the broker until the next `sync.every_steps` steps are covered;
  5. the learner takes DPO steps and syncs v+1 to the samplers, which the
     broker announces; then the loop samples again.
Evaluation samples the held-out prompts at the start and the end (and every
`eval.every_steps`), scores them with the judge, and compares final vs initial.
"""

from __future__ import annotations

import math
import threading
import time

from .config import Config, dump
from .data import PromptSource, load_splits
from .embedded import EMBEDDED, resolve_model
from .metrics import ConsoleLog, ExternalLoggers, RayMetrics, Tracker
from .report import plot
from .run_dir import RunDir
from .sampler import EngineSpec, engine_env
from .trainer import LearnerSpec, train_loop


class RunFailed(RuntimeError):
    pass


STARVED = 20  # give up on a version after sampling this many times the prompts it needs


# ---------------------------------------------------------------- plain arguments from the config

def engine_spec(cfg: Config, model_path: str, files=None) -> EngineSpec:
    s = cfg.sampler
    return EngineSpec(model=model_path, dtype=s.dtype, tensor_parallel_size=s.tensor_parallel_size,
                      max_model_len=s.max_model_len, gpu_memory_utilization=s.gpu_memory_utilization,
                      seed=cfg.run.seed, trust_remote_code=cfg.model.trust_remote_code, extra=dict(s.engine),
                      file_server=files)


def judge_options(cfg: Config, files=None) -> dict:
    j = cfg.judge
    opts = dict(kind=j.kind, margin=j.margin, function=j.function, batch_size=j.batch_size,
                max_length=j.max_length, template=j.template, max_new_tokens=j.max_new_tokens,
                constrained=j.constrained, engine=dict(j.engine), file_server=files)
    if j.model:
        opts["model"] = resolve_model(j.model)
    if j.kind == "llm" and j.model == EMBEDDED:
        opts["engine"].setdefault("dtype", "float32")
    return opts


def learner_spec(cfg: Config, policy: str, reference: str, files=None) -> LearnerSpec:
    t = cfg.train
    return LearnerSpec(policy=policy, reference=reference, dtype=cfg.model.dtype, loss=t.loss, beta=t.beta,
                       label_smoothing=t.label_smoothing, lr=t.lr, lr_schedule=t.lr_schedule,
                       warmup_steps=t.warmup_steps, weight_decay=t.weight_decay, grad_clip=t.grad_clip,
                       batch_size=t.batch_size, micro_batch_size=t.micro_batch_size, max_steps=t.max_steps,
                       seed=cfg.run.seed if t.seed is None else t.seed, sync_every=cfg.sync.every_steps,
                       checkpoint_every=cfg.checkpoint.every_steps,
                       num_threads=threads_for(t.num_cpus_per_worker, t.num_threads),
                       trust_remote_code=cfg.model.trust_remote_code, file_server=files)


def threads_for(num_cpus: float, explicit: int | None) -> int:
    return explicit or max(1, int(num_cpus))


def last_line(err: BaseException) -> str:
    """The cause at the bottom of a Ray error's remote traceback."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[-1] if lines else repr(err)


def placed(resources: dict[str, float], labels: dict[str, str]) -> dict:
    """Ray actor options that place an actor by custom resources and node labels."""
    out: dict = {}
    if resources:
        out["resources"] = dict(resources)
    if labels:
        out["label_selector"] = dict(labels)
    return out


# ---------------------------------------------------------------- topology

class Topology:
    """The actors of one run; `start` places them, `shutdown` ends them."""

    def __init__(self, samplers: list, judges: list, broker, files=None):
        self.samplers, self.judges, self.broker, self.files = samplers, judges, broker, files
        self.store, self.serve_url = None, None

    @classmethod
    def start(cls, cfg: Config, policy_path: str) -> "Topology":
        import ray

        from .artifacts import start_file_server
        from .broker import Broker
        from .judges.actor import JudgeActor
        from .sampler import Sampler

        s, j = cfg.sampler, cfg.judge
        files = start_file_server()
        on_gpu = s.num_gpus > 0
        env = engine_env(threads_for(s.num_cpus, s.num_threads), s.kv_cache_gib, on_gpu, cfg.run.log_level)
        spec = engine_spec(cfg, policy_path, files)
        samplers = [ray.remote(Sampler).options(
            name=f"sampler-{i}", num_cpus=s.num_cpus, num_gpus=s.num_gpus, **placed(s.resources, s.node_labels),
            runtime_env={"env_vars": env}).remote(spec, f"sampler-{i}", on_gpu, cfg.run.name)
            for i in range(s.num_actors)]
        judge_env = engine_env(threads_for(j.num_cpus, None), s.kv_cache_gib, j.num_gpus > 0,
                               cfg.run.log_level)
        judges = [ray.remote(JudgeActor).options(
            name=f"judge-{i}", num_cpus=j.num_cpus, num_gpus=j.num_gpus, **placed(j.resources, j.node_labels),
            runtime_env={"env_vars": judge_env}).remote(name=f"judge-{i}", **judge_options(cfg, files))
            for i in range(j.num_actors)]
        broker = ray.remote(Broker).options(name="broker", num_cpus=0).remote(cfg.sync.max_policy_lag)
        topo = cls(samplers, judges, broker, files)
        if cfg.serve.enabled:
            topo.start_serving(cfg, policy_path)
        topo.wait_ready()
        return topo

    def wait_ready(self) -> None:
        """Wait for every sampler and judge to build; a failure names the actor and its cause."""
        import ray

        for name, actor in [(f"sampler-{i}", a) for i, a in enumerate(self.samplers)] + \
                           [(f"judge-{i}", a) for i, a in enumerate(self.judges)]:
            try:
                ray.get(actor.ready.remote())
            except ray.exceptions.RayError as e:
                self.shutdown()
                raise RunFailed(f"{name} failed to start: {last_line(e)}") from None

    def start_serving(self, cfg: Config, policy_path: str) -> None:
        """The policy server, fed live by the PolicyStore the learner publishes to."""
        import ray

        from . import serve as serving
        from .weight_sync import PolicyStore

        namespace = ray.get_runtime_context().namespace
        self.store = ray.remote(PolicyStore).options(name=serving.STORE_NAME, num_cpus=0).remote()
        spec, options = serving.from_config(cfg.serve, policy_path, cfg.serve.model_name or cfg.run.name,
                                            namespace, cfg.run.log_level, self.files)
        self.serve_url = serving.deploy(spec, options, cfg.serve.host, cfg.serve.port, cfg.serve.route_prefix)

    def shutdown(self) -> None:
        import ray

        if self.serve_url:
            from .serve import undeploy
            undeploy()
        for actor in self.samplers + self.judges + [self.broker, self.files, self.store]:
            if actor is None:
                continue
            try:
                ray.kill(actor)
            except Exception:
                pass


# ---------------------------------------------------------------- fan-out to samplers and judges

def split(items: list, k: int) -> list[list]:
    size = math.ceil(len(items) / k) if items else 0
    return [items[i * size:(i + 1) * size] for i in range(k)]


class Rollouts:
    def __init__(self, topo: Topology, cfg: Config):
        self.topo, self.cfg = topo, cfg

    def sample(self, prompts, n: int, temperature: float, seed: int) -> list:
        import ray

        s = self.cfg.sampler
        chunks = split(prompts, len(self.topo.samplers))
        refs = [sm.generate.remote([list(p.ids) for p in c], [p.text for p in c], n=n,
                                   temperature=temperature, top_p=s.top_p, max_tokens=s.max_new_tokens,
                                   seed=seed + 10_000 * i)
                for i, (sm, c) in enumerate(zip(self.topo.samplers, chunks)) if c]
        return [g for groups in ray.get(refs) for g in groups]

    def label(self, groups: list):
        import ray

        chunks = split(groups, len(self.topo.judges))
        results = ray.get([j.label.remote(c) for j, c in zip(self.topo.judges, chunks) if c])
        pairs = [p for ps, _ in results for p in ps]
        stats = [st for _, st in results]
        return pairs, stats

    def score(self, prompts: list[str], responses: list[str]):
        import ray

        return ray.get(self.topo.judges[0].score.remote(prompts, responses))

    def compare(self, prompts: list[str], a: list[str], b: list[str]) -> list[float]:
        import ray

        return ray.get(self.topo.judges[0].compare.remote(prompts, a, b))


# ---------------------------------------------------------------- the learner, in a thread

class Learner(threading.Thread):
    """Runs TorchTrainer.fit() beside the rollout loop; keeps its result or error."""

    def __init__(self, cfg: Config, spec: LearnerSpec, topo: Topology, storage: str):
        super().__init__(name="learner", daemon=True)
        self.cfg, self.spec, self.topo, self.storage = cfg, spec, topo, storage
        self.result, self.error = None, None

    def run(self) -> None:
        import ray
        from ray.train import CheckpointConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        t = self.cfg.train
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"spec": self.spec, "broker": self.topo.broker, "receivers": self.topo.samplers,
                               "store": self.topo.store},
            scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                         resources_per_worker={"CPU": t.num_cpus_per_worker,
                                                               **({"GPU": 1} if t.use_gpu else {}),
                                                               **t.resources_per_worker},
                                         placement_strategy=t.placement_strategy,
                                         label_selector=dict(t.node_labels) or None),
            run_config=RunConfig(name="trainer", storage_path=self.storage,
                                 checkpoint_config=CheckpointConfig(num_to_keep=self.cfg.checkpoint.keep)))
        try:
            self.result = trainer.fit()
        except BaseException as e:  # surfaced by the controller
            self.error = e
        finally:
            ray.get(self.topo.broker.close.remote("learner stopped"))


# ---------------------------------------------------------------- the loop

class Controller:
    def __init__(self, cfg: Config, run_dir: RunDir, console: ConsoleLog, tracker: Tracker):
        self.cfg, self.run_dir, self.log, self.tracker = cfg, run_dir, console, tracker
        self.latest_rollout: dict = {}
        self.last_train: dict = {}   # the latest learner step record
        self.steps = 0
        self.round = 0
        self.start_time = time.time()

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

    def run(self) -> dict:
        cfg = self.cfg
        policy_path = resolve_model(cfg.model.policy)
        reference_path = resolve_model(cfg.model.reference) if cfg.model.reference else policy_path
        source, heldout = self.prepare_data(policy_path)
        self.log.info(f"prompts: {len(source.prompts)} train, {len(heldout)} held-out")
        self.run_dir.write_config(dump(cfg))
        self.check_placement()
        topo = Topology.start(cfg, policy_path)
        self.log.info(f"actors up: {len(topo.samplers)} sampler(s), {len(topo.judges)} judge(s) "
                      f"({time.time() - self.start_time:.0f}s)")
        if topo.serve_url:
            self.log.info(f"serving the live policy at {topo.serve_url}/v1 (model '{cfg.serve.model_name or cfg.run.name}')")
        try:
            summary = self._run(topo, source, heldout, policy_path, reference_path)
            if topo.serve_url and cfg.serve.keep_alive:
                self.log.info(f"training done; serving the final policy at {topo.serve_url}/v1 until Ctrl-C")
                _wait_forever()
            return summary
        finally:
            topo.shutdown()

    def _run(self, topo, source, heldout, policy_path, reference_path) -> dict:
        import ray

        cfg = self.cfg
        rollouts = Rollouts(topo, cfg)
        self.heldout = heldout
        before = self.baseline = self.evaluate(rollouts, heldout, version=0)
        learner = Learner(cfg, learner_spec(cfg, policy_path, reference_path, topo.files), topo,
                          str(self.run_dir.path / "ray"))
        learner.start()
        try:
            self.rollout_loop(rollouts, topo, source, learner)
        except BaseException:
            # Release the learner (its next take returns None) before the actors go away.
            ray.get(topo.broker.close.remote("the rollout loop failed"))
            learner.join(timeout=120)
            raise
        learner.join()
        self.drain(topo)
        if learner.error is not None:
            raise RunFailed(f"the learner failed: {learner.error}") from learner.error
        final_version = ray.get(topo.samplers[0].policy_version.remote())
        after = self.evaluate(rollouts, heldout, version=final_version, baseline=before)
        policy_dir = self.save_policy(learner)
        summary = self.summary(before, after, policy_dir)
        plot(self.run_dir.path)
        return summary

    def rollout_loop(self, rollouts: Rollouts, topo: Topology, source: PromptSource, learner: Learner) -> None:
        import ray

        cfg = self.cfg
        remaining = cfg.train.max_steps * cfg.train.batch_size
        version, keep_rate = 0, 1.0
        while remaining > 0:
            need = min(cfg.pairs_per_version, remaining)
            produced, asked = 0, 0
            while produced < need:
                self._check(learner, expect_more=True)
                if asked > STARVED * need:
                    raise RunFailed(
                        f"the judge separated only {produced} of {asked} prompts' samples for policy "
                        f"version {version} (ties {self.latest_rollout.get('ties')}, identical "
                        f"{self.latest_rollout.get('identical')} in the last round): lower judge.margin, "
                        f"or raise sampler.n or sampler.temperature")
                k = max(len(topo.samplers), math.ceil((need - produced) / max(keep_rate, 0.2)))
                got, rate = self.one_round(rollouts, topo, source.next_batch(k), version)
                produced, asked = produced + got, asked + k
                keep_rate = 0.5 * keep_rate + 0.5 * rate
            remaining -= need
            while True:  # lock step: wait for the learner to publish the next version
                self.drain(topo)
                self._check(learner, expect_more=remaining > 0)
                new = ray.get(topo.broker.wait_version.remote(version, 1.0))
                if new > version or not learner.is_alive():
                    break
            version = new
            self.maybe_eval(rollouts, version)
        ray.get(topo.broker.finish.remote())

    def one_round(self, rollouts: Rollouts, topo: Topology, prompts, version: int) -> tuple[int, float]:
        import ray

        cfg = self.cfg
        t0 = time.time()
        groups = rollouts.sample(prompts, cfg.sampler.n, cfg.sampler.temperature,
                                 seed=cfg.run.seed * 1_000_003 + self.round * 7919)
        t1 = time.time()
        pairs, stats = rollouts.label(groups)
        accepted = ray.get(topo.broker.put.remote(pairs))
        self.round += 1
        comps = [c for g in groups for c in g.completions]
        scores = [x for st in stats for x in st.scores]
        record = {
            "kind": "rollout", "round": self.round, "policy_version": version, "prompts": len(prompts),
            "completions": len(comps), "pairs": len(pairs), "accepted": accepted,
            "ties": sum(st.ties for st in stats), "identical": sum(st.identical for st in stats),
            "reward_mean": sum(scores) / max(1, len(scores)),
            "chosen_score": sum(p.chosen_score for p in pairs) / max(1, len(pairs)),
            "rejected_score": sum(p.rejected_score for p in pairs) / max(1, len(pairs)),
            "response_tokens": sum(len(c.token_ids) for c in comps) / max(1, len(comps)),
            "eos_rate": sum(c.finish_reason == "stop" for c in comps) / max(1, len(comps)),
            "sample_seconds": t1 - t0, "judge_seconds": time.time() - t1,
            "versions": sorted({c.policy_version for c in comps}),
        }
        self.latest_rollout = record
        self.tracker.log(record)
        return accepted, len(pairs) / max(1, len(groups))

    def drain(self, topo: Topology) -> None:
        import ray

        for m in ray.get(topo.broker.drain.remote()):
            record = {"kind": "train", **m, "reward_mean": self.latest_rollout.get("reward_mean")}
            self.tracker.log(record)
            self.last_train, self.steps = record, self.steps + 1
            if m["step"] % self.cfg.metrics.log_every_steps == 0 or m["step"] == self.cfg.train.max_steps:
                self.log.step(record, self.cfg.train.max_steps)

    def _check(self, learner: Learner, expect_more: bool) -> None:
        if learner.error is not None:
            raise RunFailed(f"the learner failed: {learner.error}") from learner.error
        if expect_more and not learner.is_alive():
            raise RunFailed("the learner stopped before the rollout loop finished")

    def maybe_eval(self, rollouts: Rollouts, version: int) -> None:
        every = self.cfg.eval.every_steps
        steps_done = version * self.cfg.sync.every_steps
        if every and steps_done % every == 0 and steps_done < self.cfg.train.max_steps:
            self.evaluate(rollouts, self.heldout, version, self.baseline)

    def evaluate(self, rollouts: Rollouts, heldout, version: int, baseline: dict | None = None) -> dict:
        if not heldout:
            return {}
        groups = rollouts.sample(heldout, 1, self.cfg.eval.temperature, seed=424242)
        prompts = [g.prompt for g in groups]
        responses = [g.completions[0].text for g in groups]
        scores = rollouts.score(prompts, responses)
        result = {"kind": "eval", "policy_version": version, "prompts": prompts, "responses": responses,
                  "reward": (sum(scores) / len(scores)) if scores else None}
        if baseline is not None:
            wins = rollouts.compare(prompts, responses, baseline["responses"])
            result["win_rate"] = sum(wins) / len(wins)
        self.tracker.log({k: v for k, v in result.items() if k not in ("prompts", "responses")})
        self.log.eval(result)
        return result

    def save_policy(self, learner: Learner) -> str | None:
        checkpoint = learner.result.checkpoint if learner.result is not None else None
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            return str(self.run_dir.copy_policy(d))

    def summary(self, before: dict, after: dict, policy_dir: str | None) -> dict:
        last = self.last_train
        pairs = last.get("pairs", 0)
        summary = {
            "reward_before": before.get("reward"), "reward_after": after.get("reward"),
            "win_rate": after.get("win_rate"), "steps": self.steps, "pairs": pairs,
            "wall_seconds": round(time.time() - self.start_time, 1),
            "train_seconds": round(last["wall_seconds"], 1) if last else None,
            "pairs_per_second": round(pairs / last["wall_seconds"], 2) if last else None,
            "final_policy_version": last.get("policy_version", 0),
            "policy_dir": policy_dir, "run_dir": str(self.run_dir.path),
            "samples_before": before.get("responses", [])[:5], "samples_after": after.get("responses", [])[:5],
        }
        self.run_dir.write_json("summary.json", summary)
        return summary


def _wait_forever() -> None:
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


def train(cfg: Config, console: ConsoleLog | None = None) -> dict:
    """Run one online DPO job on the connected Ray cluster; returns the summary."""
    console = console or ConsoleLog()
    run_dir = RunDir.create(cfg.run.output_dir, cfg.run.name)
    console.info(f"run dir: {run_dir.path}")
    m = cfg.metrics
    external = ExternalLoggers(run_dir.path, cfg.run.name, m.tensorboard, m.wandb, cfg.model_dump(mode="json")) \
        if (m.tensorboard or m.wandb) else None
    tracker = Tracker(run_dir, RayMetrics(cfg.run.name), external)
    try:
        return Controller(cfg, run_dir, console, tracker).run()
    finally:
        tracker.close()
        run_dir.close()


__all__ = ["Controller", "Topology", "Rollouts", "train", "RunFailed"]
