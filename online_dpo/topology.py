"""Which actors a run has, where they go, how they start, restart and stop.

  sampler-i     vLLM engines that sample n completions per prompt
  judge-i       judges that turn completions into preference pairs (none with
                judge.in_sampler: each sampler runs the rule judge itself)
  broker        the mailbox between the controller and trainer rank 0
  policy-store  owns the published weights (samplers and serve replicas pull them)
  weight group  with sync.transport collective: trainer rank 0 pushes each
                version to the live samplers through vLLM's weight-transfer
                engines (syncer.py); a new generation forms whenever they change
  file-server   hands local model directories to nodes that cannot see them
  trainer       a Ray Train gang (gang.py), started beside these

Samplers and judges restart after a crash (Ray `max_restarts`); an
`ActorGroup` sends a dead actor's work to a live one and counts restarts,
so a crash costs a retry, not the run. Actor creation does not block:
engines build while the trainer gang starts.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from dataclasses import dataclass, field, replace

from .errors import RunFailed, death_cause, last_line
from .specs import OWN_PLACEMENT, GroupSpec, Names, ServePlan

READY_SECONDS = 900.0   # an actor that has not built its engine (or judge) by then has hung


@dataclass
class Call:
    """One method call sent to one actor of a group, kept so it can be sent again elsewhere."""
    method: str
    args: tuple
    kwargs: dict = field(default_factory=dict)
    actor: int = 0
    sent: float = 0.0
    ref: object = None


def split(items: list, k: int) -> list[list]:
    """`items` in k contiguous chunks of near-equal size (one per actor; trailing ones may be empty)."""
    size = math.ceil(len(items) / k) if items else 0
    return [items[i * size:(i + 1) * size] for i in range(k)]


class ActorGroup:
    """Interchangeable actors (samplers, or judges) with failover.

    A call that fails because its actor died is sent to another live actor;
    the dead one is probed until Ray has restarted it. A call that runs past
    `timeout` (run.call_timeout) is treated the same way: its actor is hung, so
    it is killed for Ray to restart, and the call goes to a live one. When an
    actor has used up its restarts the run fails with a message naming it and
    the cause.
    """

    def __init__(self, kind: str, handles: list, max_restarts: int, field: str, timeout: float = 600.0):
        self.kind, self.handles, self.max_restarts, self.field = kind, handles, max_restarts, field
        self.timeout = timeout
        self.hung: dict[int, str] = {}       # index -> what it did not answer in time
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
        cause = f"it {self.hung[i]}" if i in self.hung else death_cause(err)
        return (f"{self.name(i)} died and Ray will not restart it: its kind has used {self.restarts - 1} of "
                f"{self.field}={self.max_restarts} restarts. Cause: {cause}.")

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
                self.hung.pop(i, None)
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

    def send(self, method: str, args: tuple = (), kwargs: dict | None = None, actor: int | None = None) -> Call:
        """Call `method` on actor `actor` (default: the first live one) without waiting."""
        i = self.wait_live()[0] if actor is None else actor
        call = Call(method, tuple(args), dict(kwargs or {}), i, time.time())
        call.ref = getattr(self.handles[i], method).remote(*call.args, **call.kwargs)
        return call

    def receive(self, call: Call) -> tuple[bool, object]:
        """(True, the call's result); or, when its actor died, (False, the same call sent to a live one)."""
        import ray

        try:
            return True, ray.get(call.ref, timeout=max(0.0, call.sent + self.timeout - time.time()))
        except ray.exceptions.GetTimeoutError:
            return False, self.abandon(call)
        except ray.exceptions.RayActorError as e:
            self.failed(call.actor, e, call.sent)
            return False, self.send(call.method, call.args, call.kwargs)

    def overdue(self, call: Call) -> bool:
        return time.time() - call.sent > self.timeout

    def abandon(self, call: Call) -> Call:
        """`call` ran past the deadline: its actor is hung. Kill it (Ray restarts it while it has restarts
        left) and send the call to a live one."""
        import ray

        i = call.actor
        self.hung[i] = f"did not answer {call.method} within {self.timeout:g}s (run.call_timeout)"
        with contextlib.suppress(Exception):
            ray.kill(self.handles[i], no_restart=False)
        self.failed(i, TimeoutError(self.hung[i]), call.sent)
        return self.send(call.method, call.args, call.kwargs)

    def run(self, method: str, calls: list[tuple[tuple, dict]]) -> list:
        """Run call k on actor k (mod live actors) and return the results in order;
        a call whose actor dies is sent again to a live one."""
        live = self.wait_live()
        sent = [self.send(method, args, kwargs, live[k % len(live)]) for k, (args, kwargs) in enumerate(calls)]
        results = []
        for call in sent:
            done, out = self.receive(call)
            while not done:
                done, out = self.receive(out)
            results.append(out)
        return results

    def stats(self) -> dict:
        return {"restarts": self.restarts, "restart_seconds": [round(s, 1) for s in self.restart_seconds]}


class Topology:
    """The actors of one run; `start` creates them, `wait_ready` waits for them, `shutdown` ends them."""

    def __init__(self, samplers: ActorGroup, judges: ActorGroup, broker, store, files=None,
                 pushed: bool = False, workers_per_sampler: int = 1, evaluators: ActorGroup | None = None):
        self.samplers, self.judges, self.broker, self.store, self.files = samplers, judges, broker, store, files
        self.evaluators = evaluators   # eval.judge's actors (None: the training judge evaluates alone)
        self.pushed, self.workers_per_sampler, self.gen = pushed, workers_per_sampler, 0
        self.unchecked = None   # sync.verify: (serial, the trainer's checksums) until a sampler holds it
        self.serve_url = self.serve_where = self.serve_app = None

    @classmethod
    def start(cls, samplers: GroupSpec, judges: GroupSpec | None, transport: str, run_name: str, names: Names,
              evaluators: GroupSpec | None = None, run_id: str = "") -> "Topology":
        """Create every actor without waiting for any to be ready (named by `names`, unique per run). With no
        judges (judge.in_sampler) the samplers are the judge group too."""
        import ray

        from .artifacts import start_file_server
        from .broker import Broker
        from .cluster import one_machine
        from .judges.actor import JudgeActor
        from .sampler import MAX_CONCURRENCY, Sampler
        from .weight_sync import PolicyStore

        files = None if one_machine() else start_file_server(names.files)   # every node sees the model paths
        # The environments go in as arguments, not runtime_envs: so the actors can take the workers Ray
        # started with the cluster (engine.use_env).
        sampler_actors = [ray.remote(Sampler).options(
            name=names.actor(f"sampler-{i}"), max_restarts=samplers.max_restarts, max_concurrency=MAX_CONCURRENCY,
            **samplers.ask.actor_options()).remote(samplers.spec, f"sampler-{i}", samplers.on_gpu, run_name, run_id,
                                                   env=samplers.env, judge=samplers.judge)
            for i in range(samplers.ask.count)]
        sampler_group = ActorGroup("sampler", sampler_actors, samplers.max_restarts, samplers.restarts_field,
                                   samplers.call_timeout)
        groups = {g.kind: ActorGroup(g.kind, [ray.remote(JudgeActor).options(
            name=names.actor(f"{g.kind}-{i}"), max_restarts=g.max_restarts, **g.ask.actor_options()).remote(
                g.spec, name=f"{g.kind}-{i}", env=g.env) for i in range(g.ask.count)],
            g.max_restarts, g.restarts_field, g.call_timeout) for g in (judges, evaluators) if g is not None}
        broker = ray.remote(Broker).options(name=names.actor("broker"), num_cpus=0, **OWN_PLACEMENT).remote()
        store = ray.remote(PolicyStore).options(name=names.store, num_cpus=0, **OWN_PLACEMENT).remote()
        return cls(sampler_group, groups.get("judge", sampler_group), broker, store, files, transport == "collective",
                   samplers.spec.tensor_parallel_size, groups.get("eval-judge"))

    def on_actor_event(self, callback) -> None:
        """`callback(event)` hears of every sampler or judge that dies or comes back. A sampler's
        event also forms a new generation of the weight group, without it or with it back."""
        def sampler_event(event: dict) -> None:
            self.form_weight_group()
            callback(event)

        for group in self.groups():
            group.notify = sampler_event if group is self.samplers else callback

    def form_weight_group(self) -> None:
        """A new generation of the weight group: the live samplers, which trainer rank 0 pushes
        versions to (no-op with the object-store transport)."""
        if not self.pushed:
            return
        from .types import WeightGroup

        self.gen += 1
        live = tuple(self.samplers.handles[i] for i in range(len(self.samplers.handles)) if i not in self.samplers.down)
        self.broker.set_weight_group.remote(WeightGroup(self.gen, live, self.workers_per_sampler))

    def check_sync(self, weights, digests: dict | None) -> str:
        """sync.verify: check a version once a sampler holds it (pulled versions load at the next
        request); a line saying what was compared, or "" while it waits."""
        if digests is not None and weights is not None:
            self.unchecked = (weights.serial, digests)
        if self.unchecked is None:
            return ""
        line = self.verify(*self.unchecked)
        if line:
            self.unchecked = None
        return line

    def verify(self, serial: int, digests: dict) -> str:
        """A checked sync: every live sampler's checksums (vLLM's) against the trainer's for the version
        published as `serial`; a line saying what was compared. A mismatch fails the run."""
        import ray

        from .checksums import check

        if self.workers_per_sampler > 1:
            return "not compared: tensor-parallel engines hold shards, not the trainer's tensors"
        counts = []
        for i in self.samplers.live():
            held, reported = ray.get(self.samplers.handles[i].checksums.remote(), timeout=self.samplers.timeout)
            if held != serial:   # it moved on (or has not arrived): the next checked sync covers it
                continue
            compared, wrong = check(digests, reported)
            if wrong:
                raise RunFailed(f"{self.samplers.name(i)} does not hold the weights the trainer sent (version "
                                f"serial {serial}): {len(wrong)} of {compared} tensors differ, first {wrong[0]}. "
                                "The weight transfer lost or corrupted them (sync.verify)")
            counts.append(f"{self.samplers.name(i)} {compared}/{len(reported)}")
        return ", ".join(counts)

    def wait_ready(self, timeout: float = READY_SECONDS) -> None:
        """Wait for every sampler and judge to build; a failure or a hang names the actor and its cause."""
        import ray

        deadline = time.time() + timeout
        for group in self.groups():
            for i, actor in enumerate(group.handles):
                try:
                    ray.get(actor.ready.remote(), timeout=max(1.0, deadline - time.time()))
                except ray.exceptions.GetTimeoutError:
                    raise RunFailed(f"{group.name(i)} did not start within {timeout:.0f}s (is the cluster short "
                                    "of resources, or its engine stuck loading?)") from None
                except ray.exceptions.RayError as e:
                    raise RunFailed(f"{group.name(i)} failed to start: {last_line(e)}") from None

    def start_serving(self, serve: ServePlan) -> None:
        """The policy server, fed live by the PolicyStore the learner publishes to."""
        import ray

        from .serve import app

        namespace = ray.get_runtime_context().namespace
        spec = replace(serve.spec, store_namespace=namespace)
        self.serve_app = serve.app_name
        self.serve_url = app.deploy(spec, serve.options, serve.host, serve.port, serve.route_prefix, serve.app_name)
        self.serve_where = app.describe(self.serve_url, app.replica_urls(serve.route_prefix, serve.app_name))

    def groups(self) -> list[ActorGroup]:
        """Each actor group once (the samplers are the judges too with judge.in_sampler)."""
        return [self.samplers] + [g for g in (self.judges, self.evaluators) if g is not None and g is not self.samplers]

    def restarts(self) -> dict:
        return {g.kind: g.stats() for g in self.groups()}

    def shutdown(self, keep_store: bool = False) -> None:
        import ray

        if self.serve_app:
            from .serve.app import undeploy
            undeploy(self.serve_app)
        others = [self.broker, self.files] + ([] if keep_store else [self.store])
        for actor in [a for g in self.groups() for a in g.handles] + others:
            if actor is None:
                continue
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass
