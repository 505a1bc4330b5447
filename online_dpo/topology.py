"""Which actors a run has, where they go, how they start, restart and stop.

  sampler-i     vLLM engines that sample n completions per prompt
  judge-i       judges that turn completions into preference pairs
  broker        the mailbox between the controller and trainer rank 0
  policy-store  owns the published weights (samplers and serve replicas pull them)
  weight group  with sync.transport collective: trainer rank 0 and the sampler
                engines in one process group (collective.py); a new generation
                forms whenever its members change
  file-server   hands local model directories to nodes that cannot see them
  trainer       a Ray Train gang (learner.py), started beside these

Samplers and judges restart after a crash (Ray `max_restarts`); an
`ActorGroup` sends a dead actor's work to a live one and counts restarts,
so a crash costs a retry, not the run. Actor creation does not block:
engines build while the trainer gang starts.
"""

from __future__ import annotations

import threading
import time

from .config import Config
from .embedded import EMBEDDED, resolve_model
from .engine import EngineSpec, engine_env


class RunFailed(RuntimeError):
    pass


def engine_spec(cfg: Config, model_path: str, files=None) -> EngineSpec:
    s = cfg.sampler
    return EngineSpec(model=model_path, dtype=s.dtype, tensor_parallel_size=s.tensor_parallel_size,
                      max_model_len=s.max_model_len, gpu_memory_utilization=s.gpu_memory_utilization,
                      seed=cfg.run.seed, trust_remote_code=cfg.model.trust_remote_code, extra=dict(s.engine),
                      lora_rank=cfg.model.lora.rank if cfg.model.lora else None, file_server=files)


def judge_options(cfg: Config, files=None) -> dict:
    j = cfg.judge
    opts = dict(kind=j.kind, margin=j.margin, function=j.function, batch_size=j.batch_size,
                max_length=j.max_length, template=j.template, max_new_tokens=j.max_new_tokens,
                constrained=j.constrained, engine=dict(j.engine), file_server=files)
    if j.model:
        opts["model"] = resolve_model(j.model)
    if j.kind in ("llm", "constitutional") and j.model == EMBEDDED:
        opts["engine"].setdefault("dtype", "float32")
    if j.kind == "ensemble":
        opts["members"] = [member_options(m) for m in j.members]
    if j.kind == "constitutional":
        opts["principles"] = [p.model_dump() for p in j.principles]
    return opts


def member_options(m) -> dict:
    """An ensemble member's plain arguments (judges.build_judge)."""
    opts = m.model_dump()
    if m.model:
        opts["model"] = resolve_model(m.model)
    if m.kind == "llm" and m.model == EMBEDDED:
        opts["engine"].setdefault("dtype", "float32")
    return opts


def threads_for(num_cpus: float, explicit: int | None) -> int:
    return explicit or max(1, int(num_cpus))


def last_line(err: BaseException) -> str:
    """The cause at the bottom of a Ray error's remote traceback."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[-1] if lines else repr(err)


def death_cause(err: BaseException) -> str:
    """One line on why an actor died: out of memory, how its process exited, or its last error line."""
    text = " ".join(str(err).split())
    if "OutOfMemoryError" in type(err).__name__ or "running low on memory" in text:
        return "Ray killed it because the node ran low on memory (out of memory)"
    if "Worker exit detail:" in text:
        detail = text.split("Worker exit detail:", 1)[1].strip()
        return detail.split(". ")[0].rstrip(".")
    return last_line(err)


# The run's actors are scheduled on their own, never inside a placement group the caller runs in
# (a Ray Tune trial's, for `online-dpo tune`): Ray would otherwise try to fit them into its bundle.
OWN_PLACEMENT = {"scheduling_strategy": "DEFAULT"}


def placed(resources: dict[str, float], labels: dict[str, str]) -> dict:
    """Ray actor options that place an actor by custom resources and node labels."""
    out: dict = dict(OWN_PLACEMENT)
    if resources:
        out["resources"] = dict(resources)
    if labels:
        out["label_selector"] = dict(labels)
    return out


class ActorGroup:
    """Interchangeable actors (samplers, or judges) with failover.

    A call that fails because its actor died is sent to another live actor;
    the dead one is probed until Ray has restarted it. When an actor has used
    up its restarts the run fails with a message naming it and the cause.
    """

    def __init__(self, kind: str, handles: list, max_restarts: int, field: str):
        self.kind, self.handles, self.max_restarts, self.field = kind, handles, max_restarts, field
        self.down: dict[int, float] = {}      # index -> when it was seen dead
        self.restarts = 0
        self.restart_seconds: list[float] = []
        self.notify = lambda event: None   # the controller logs restarts (one record, one console line)
        self.back_at: dict[int, float] = {}   # index -> when it last came back
        self.lock = threading.RLock()      # the rollout thread and the controller both call in

    def name(self, i: int) -> str:
        return f"{self.kind}-{i}"

    def live(self) -> list[int]:
        self.poll()
        return [i for i in range(len(self.handles)) if i not in self.down]

    def failed(self, i: int, err: BaseException, sent: float = 0.0) -> None:
        """Actor i failed a call sent at `sent`: Ray is restarting it, or it is dead for good
        (`poll` tells). A call sent before the actor last came back died with the old process."""
        with self.lock:
            if i in self.down or sent < self.back_at.get(i, 0.0):
                return
            self.down[i] = time.time()
            self.restarts += 1
        self.notify({"actor": self.name(i), "event": "died", "restarts": self.restarts,
                     "max_restarts": self.max_restarts})

    def obituary(self, i: int, err: BaseException) -> str:
        return (f"{self.name(i)} died and Ray will not restart it: its kind has used {self.restarts - 1} of "
                f"{self.field}={self.max_restarts} restarts. Cause: {death_cause(err)}.")

    def poll(self) -> None:
        """Bring restarted actors back into the group."""
        import ray

        for i in list(self.down):
            try:
                ray.get(self.handles[i].ready.remote(), timeout=0.5)
            except (ray.exceptions.GetTimeoutError, ray.exceptions.ActorUnavailableError):
                continue
            except ray.exceptions.ActorDiedError as e:
                raise RunFailed(self.obituary(i, e)) from None
            with self.lock:
                if i not in self.down:
                    continue
                seconds = time.time() - self.down.pop(i)
                self.restart_seconds.append(seconds)
                self.back_at[i] = time.time()
            self.notify({"actor": self.name(i), "event": "back", "seconds": round(seconds, 1),
                         "restarts": self.restarts})

    def wait_live(self, timeout: float = 600) -> list[int]:
        deadline = time.time() + timeout
        while True:
            live = self.live()
            if live:
                return live
            if time.time() > deadline:
                raise RunFailed(f"no {self.kind} came back within {timeout:.0f}s of a crash")
            time.sleep(0.2)

    def run(self, method: str, calls: list[tuple[tuple, dict]]) -> list:
        """Run call k on actor k (mod live actors) and return the results in order;
        a call whose actor dies is resent to a live one."""
        import ray

        results: list = [None] * len(calls)
        todo = list(range(len(calls)))
        while todo:
            live = self.wait_live()
            refs, sent = {}, time.time()
            for k in todo:
                i = live[k % len(live)]
                args, kwargs = calls[k]
                refs[getattr(self.handles[i], method).remote(*args, **kwargs)] = (k, i)
            todo = []
            for ref, (k, i) in refs.items():
                try:
                    results[k] = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    self.failed(i, e, sent)
                    todo.append(k)
        return results

    def stats(self) -> dict:
        return {"restarts": self.restarts, "restart_seconds": [round(s, 1) for s in self.restart_seconds]}


class Topology:
    """The actors of one run; `start` creates them, `wait_ready` waits for them, `shutdown` ends them."""

    def __init__(self, samplers: ActorGroup, judges: ActorGroup, broker, store, files=None,
                 rendezvous=None, workers_per_sampler: int = 1):
        self.samplers, self.judges, self.broker, self.store, self.files = samplers, judges, broker, store, files
        self.rendezvous, self.workers_per_sampler = rendezvous, workers_per_sampler
        self.serve_url = self.serve_where = None

    @classmethod
    def start(cls, cfg: Config, policy_path: str) -> "Topology":
        """Create every actor without waiting for any to be ready."""
        import ray

        from .artifacts import NAME as FILES, start_file_server
        from .broker import Broker
        from .judges.actor import JudgeActor
        from .sampler import Sampler
        from .weight_sync import PolicyStore

        s, j = cfg.sampler, cfg.judge
        files = start_file_server()
        on_gpu = s.num_gpus > 0
        env = engine_env(threads_for(s.num_cpus, s.num_threads), s.kv_cache_gib, on_gpu, cfg.run.log_level)
        spec = engine_spec(cfg, policy_path, FILES)
        samplers = [ray.remote(Sampler).options(
            name=f"sampler-{i}", num_cpus=s.num_cpus, num_gpus=s.num_gpus * s.tensor_parallel_size,
            max_restarts=s.max_restarts, **placed(s.resources, s.node_labels),
            runtime_env={"env_vars": env}).remote(spec, f"sampler-{i}", on_gpu, cfg.run.name)
            for i in range(s.num_actors)]
        judge_env = engine_env(threads_for(j.num_cpus, None), s.kv_cache_gib, j.num_gpus > 0,
                               cfg.run.log_level)
        judges = [ray.remote(JudgeActor).options(
            name=f"judge-{i}", num_cpus=j.num_cpus, num_gpus=j.num_gpus, max_restarts=j.max_restarts,
            **placed(j.resources, j.node_labels),
            runtime_env={"env_vars": judge_env}).remote(name=f"judge-{i}", **judge_options(cfg, FILES))
            for i in range(j.num_actors)]
        broker = ray.remote(Broker).options(name="broker", num_cpus=0, **OWN_PLACEMENT).remote()
        from . import serve as serving
        store = ray.remote(PolicyStore).options(name=serving.STORE_NAME, num_cpus=0, **OWN_PLACEMENT).remote()
        rendezvous = None
        if cfg.sync.transport == "collective" and cfg.model.lora is None:   # adapters go through the store
            from .collective import Rendezvous
            rendezvous = Rendezvous()
        return cls(ActorGroup("sampler", samplers, s.max_restarts, "sampler.max_restarts"),
                   ActorGroup("judge", judges, j.max_restarts, "judge.max_restarts"), broker, store, files,
                   rendezvous, s.tensor_parallel_size)

    def form_weight_group(self) -> None:
        """A new generation of the collective weight group: trainer rank 0 and the live samplers'
        engine workers (no-op with the object-store transport)."""
        if self.rendezvous is None:
            return
        live = [i for i in range(len(self.samplers.handles)) if i not in self.samplers.down]
        spec = self.rendezvous.next(len(live) * self.workers_per_sampler)
        for k, i in enumerate(live):
            self.samplers.handles[i].join_weight_group.remote(spec, 1 + k * self.workers_per_sampler)
        self.broker.set_weight_group.remote(spec)

    def wait_ready(self) -> None:
        """Wait for every sampler and judge to build; a failure names the actor and its cause."""
        import ray

        for group in (self.samplers, self.judges):
            for i, actor in enumerate(group.handles):
                try:
                    ray.get(actor.ready.remote())
                except ray.exceptions.RayError as e:
                    raise RunFailed(f"{group.name(i)} failed to start: {last_line(e)}") from None

    def start_serving(self, cfg: Config, policy_path: str) -> None:
        """The policy server, fed live by the PolicyStore the learner publishes to."""
        import ray

        from . import serve as serving

        namespace = ray.get_runtime_context().namespace
        spec, options = serving.from_config(cfg.serve, policy_path, cfg.serve.model_name or cfg.run.name,
                                            namespace, cfg.run.log_level, self.files,
                                            lora_rank=cfg.model.lora.rank if cfg.model.lora else None)
        self.serve_url = serving.deploy(spec, options, cfg.serve.host, cfg.serve.port, cfg.serve.route_prefix)
        self.serve_where = serving.describe(self.serve_url, serving.replica_urls(cfg.serve.route_prefix))

    def restarts(self) -> dict:
        return {"sampler": self.samplers.stats(), "judge": self.judges.stats()}

    def shutdown(self, keep_store: bool = False) -> None:
        import ray

        if self.serve_url:
            from .serve import undeploy
            undeploy()
        others = [self.broker, self.files] + ([] if keep_store else [self.store])
        for actor in self.samplers.handles + self.judges.handles + others:
            if actor is None:
                continue
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass
