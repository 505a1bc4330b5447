"""Ray Serve application that serves the current policy over OpenAI-compatible HTTP.

Each replica holds a vLLM AsyncLLM engine and vLLM's own OpenAI serving layer
around it (serve_api.py), so the API is the one `vllm serve` has. Routes:
POST /v1/completions and /v1/chat/completions (plain or streamed as
server-sent events), GET /v1/models, GET /health. Every response names the
policy version that produced it.

What this module adds to vLLM's layer: live weight following, the version
gate, the API key, and binding to loopback by default. Replicas poll the run's
`PolicyStore` actor and load any newer version in place. A version gate
drains in-flight requests first and holds new ones for the moment of the
load, so a response never mixes two versions and no request fails during a
sync. A load waits at most `serve.max_drain_seconds` for in-flight requests;
those still running then are aborted (a 503, or an error event in their
stream) rather than finished with other weights, so a stalled client cannot
hold up a weight update.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures at runtime.

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from . import serve_api as api
from .weight_sync import EngineWeights

STORE_NAME = "policy-store"
APP_NAME = "online-dpo"
log = logging.getLogger("online_dpo.serve")


@dataclass(frozen=True)
class ServerSpec:
    """Plain arguments for a replica (built from the `serve` config section)."""
    model: str
    served_name: str
    dtype: str = "auto"
    max_model_len: int | None = None
    default_max_tokens: int = 128
    api_key_env: str | None = None
    store_namespace: str | None = None   # where the PolicyStore lives; None = no live updates
    poll_seconds: float = 0.5
    max_drain_seconds: float = 30.0
    max_body_bytes: int = 2 << 20
    max_n: int = api.MAX_N
    gpu_memory_utilization: float = 0.85
    engine: dict[str, Any] = field(default_factory=dict)
    lora_rank: int | None = None      # model.lora runs: serve the base model with the policy's adapter
    adapter_dir: str | None = None    # a LoRA run's final adapter (PEFT format) to start from
    file_server: Any = None   # fetches `model` when this node cannot see it (artifacts.py)


class Ticket:
    """One request's pass through the gate: the policy version it runs on, and whether a load
    that could not wait for it revoked it."""
    __slots__ = ("version", "revoked")

    def __init__(self, version: int):
        self.version, self.revoked = version, False


class VersionGate:
    """Many requests, or one weight load: never both at once.

    A load waits for in-flight requests at most `drain_seconds`; then it revokes the ones still
    in (their owners must send nothing more) and goes ahead."""

    def __init__(self, drain_seconds: float = 30.0):
        self.active: set[Ticket] = set()
        self.loading, self.drain_seconds = False, drain_seconds
        self.cond = asyncio.Condition()

    async def enter(self, version) -> Ticket:
        """`version`: a callable giving the version held, read once the gate is open."""
        async with self.cond:
            await self.cond.wait_for(lambda: not self.loading)
            ticket = Ticket(version())
            self.active.add(ticket)
        return ticket

    async def exit(self, ticket: Ticket) -> None:
        async with self.cond:
            self.active.discard(ticket)
            self.cond.notify_all()

    @contextlib.asynccontextmanager
    async def request(self, version=lambda: 0):
        ticket = await self.enter(version)
        try:
            yield ticket
        finally:
            await self.exit(ticket)

    @contextlib.asynccontextmanager
    async def load(self):
        """Yields the number of requests revoked because they outlasted the drain."""
        async with self.cond:
            self.loading = True
            revoked = 0
            try:
                await asyncio.wait_for(self.cond.wait_for(lambda: not self.active), self.drain_seconds)
            except TimeoutError:
                for ticket in self.active:
                    ticket.revoked = True
                revoked = len(self.active)
                self.active.clear()
        try:
            yield revoked
        finally:
            async with self.cond:
                self.loading = False
                self.cond.notify_all()


def bind_internal_grpc_to_node_ip() -> None:
    """Ray Serve binds each replica's internal gRPC server (how the proxy reaches it) to every
    interface ('[::]:0'), while the proxy dials the node's own address; bind that one alone, so a
    local cluster stays on 127.0.0.1. Runs in the replica before Serve starts that server."""
    import ray
    from ray.serve._private import replica as ray_replica

    original = getattr(ray_replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "node_ip_only", False):
        return
    ip = ray.util.get_node_ip_address()
    host = f"[{ip}]" if ":" in ip else ip

    def bind(server, address: str):
        if address.startswith("[::]:"):
            address = f"{host}:{address[5:]}"
        return original(server, address)

    bind.node_ip_only = True
    ray_replica.add_port_to_grpc_server = bind


def build_engine(spec: ServerSpec, on_gpu: bool):
    from vllm import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from .engine import engine_kwargs, lora_kwargs

    return AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs(
        spec.model, spec.dtype, spec.max_model_len, spec.gpu_memory_utilization, spec.engine, on_gpu,
        spec.file_server, **lora_kwargs(spec.lora_rank))))


async def abort_all(engine) -> None:
    """Abort every request the engine holds (the gate holds new ones, so all of them are old)."""
    held = list(engine.output_processor.external_req_ids)
    if held:
        await engine.abort(held)


def preempted(seconds: float) -> api.APIError:
    return api.APIError(503, f"a new policy version was loaded while this request ran longer than "
                             f"serve.max_drain_seconds ({seconds:g} s); send it again",
                        type_="service_unavailable", code="policy_updated")


def make_app():
    """The FastAPI ingress and the deployment class (imports Ray Serve lazily)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from ray import serve

    app = FastAPI(title="online-dpo policy server")

    def error(e: api.APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @serve.deployment(name="PolicyServer")
    @serve.ingress(app)
    class PolicyServer:
        async def __init__(self, spec: ServerSpec):
            import torch

            bind_internal_grpc_to_node_ip()
            self.spec = spec
            self.engine = build_engine(spec, torch.cuda.is_available())
            self.openai = await api.openai_layer(self.engine, spec.model, spec.served_name)
            self.weights, self.gate = EngineWeights(), VersionGate(spec.max_drain_seconds)
            if spec.adapter_dir:   # a finished LoRA run: its final adapter on the base model
                from vllm.lora.request import LoRARequest

                from .weight_sync import ADAPTER

                request = LoRARequest(ADAPTER, 1, spec.adapter_dir)
                await self.engine.add_lora(request)
                self.weights.use_adapter(None, request)
                self.follow_adapter()
            self.api_key = os.environ.get(spec.api_key_env) if spec.api_key_env else None
            self.store = None
            if spec.store_namespace is not None:
                import ray

                self.store = ray.get_actor(STORE_NAME, namespace=spec.store_namespace)
                await self.sync_once()  # a new replica starts from the latest version
                self.poller = asyncio.create_task(self.poll())

        # ------------------------------------------------------------ weights

        def follow_adapter(self) -> None:
            """LoRA: requests for the served name generate with the adapter held (vLLM's layer picks
            a request's adapter by its model name)."""
            from vllm.lora.request import LoRARequest

            lora, name = self.weights.lora, self.spec.served_name
            if lora is None:
                self.openai.models.lora_requests.pop(name, None)
            else:
                self.openai.models.lora_requests[name] = LoRARequest(name, lora.lora_int_id, lora.lora_path)

        async def sync_once(self) -> None:
            handle = await self.store.latest.remote()
            if not self.weights.wants(handle):
                return
            async with self.gate.load() as revoked:
                if revoked:
                    await abort_all(self.engine)
                    log.warning("aborted %d request(s) still running after serve.max_drain_seconds=%g "
                                "to load version %d", revoked, self.spec.max_drain_seconds, handle.version)
                await self.weights.load_async(self.engine, handle)
                self.follow_adapter()

        async def poll(self) -> None:
            while True:
                await asyncio.sleep(self.spec.poll_seconds)
                try:
                    await self.sync_once()
                except Exception as e:  # keep serving the current version
                    print(f"[online-dpo serve] weight update failed, still on v{self.weights.version}: {e}")

        # ------------------------------------------------------------ requests

        def authorize(self, request: Request) -> None:
            if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
                raise api.APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                   type_="authentication_error", code="invalid_api_key")

        async def handle(self, request: Request, kind: str):
            try:
                self.authorize(request)
                req = api.parse(await api.read_body(request, self.spec.max_body_bytes),
                                self.openai.request_types[kind])
                api.check_limits(req, self.spec.max_n)
            except api.APIError as e:
                return error(e)
            if req.model is None:
                req.model = self.spec.served_name
            if kind == "chat" and req.max_tokens is None and req.max_completion_tokens is None:
                req.max_tokens = self.spec.default_max_tokens   # vLLM's default: the rest of the context
            serving = self.openai.chat if kind == "chat" else self.openai.completion
            run = serving.create_chat_completion if kind == "chat" else serving.create_completion
            ticket = await self.gate.enter(lambda: self.weights.version)
            streaming = False
            try:
                try:
                    out = await run(req, request)
                except Exception as e:   # vLLM raises its validation errors; map them as its server does
                    return error(api.from_vllm(serving.create_error_response(e)))
                if ticket.revoked:
                    return error(preempted(self.spec.max_drain_seconds))
                if self.openai.is_error(out):
                    return error(api.from_vllm(out))
                headers = {"x-policy-version": str(ticket.version)}
                if hasattr(out, "__aiter__"):
                    streaming = True
                    return StreamingResponse(self.relay(out, ticket), media_type="text/event-stream",
                                             headers=headers)
                return Response(api.with_version(out.model_dump_json(), ticket.version),
                                media_type="application/json", headers=headers)
            finally:
                if not streaming:
                    await self.gate.exit(ticket)

        async def relay(self, stream, ticket: Ticket):
            """vLLM's event stream with the policy version in every event; cut with an error event
            if a load revoked the request."""
            try:
                async for event in stream:
                    if ticket.revoked:
                        yield api.sse(preempted(self.spec.max_drain_seconds).body())
                        yield api.sse("[DONE]")
                        return
                    yield api.sse_with_version(event, ticket.version)
            finally:
                with contextlib.suppress(Exception):
                    await stream.aclose()
                await self.gate.exit(ticket)

        @app.post("/v1/completions")
        async def completions(self, request: Request):
            return await self.handle(request, "completion")

        @app.post("/v1/chat/completions")
        async def chat(self, request: Request):
            return await self.handle(request, "chat")

        @app.get("/v1/models")
        async def models(self, request: Request):
            try:
                self.authorize(request)
            except api.APIError as e:
                return error(e)
            listing = (await self.openai.models.show_available_models()).model_dump()
            seen, cards = set(), []
            for card in listing["data"]:   # a LoRA run lists its adapter under the served name too
                if card["id"] not in seen:
                    seen.add(card["id"])
                    cards.append({**card, "policy_version": self.weights.version})
            return {**listing, "data": cards}

        @app.get("/health")
        async def health(self):
            return {"status": "ok", "policy_version": self.weights.version, "model": self.spec.served_name}

        def check_health(self):
            if self.engine.errored:
                raise RuntimeError("the vLLM engine has errored")

    return PolicyServer


def deployment_options(num_replicas: int, min_replicas: int | None, max_replicas: int | None,
                       num_cpus: float, num_gpus: float, max_ongoing_requests: int,
                       env: dict[str, str], resources: dict | None = None, labels: dict | None = None) -> dict:
    actor: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus, "runtime_env": {"env_vars": env}}
    if resources:
        actor["resources"] = dict(resources)
    if labels:
        actor["label_selector"] = dict(labels)
    opts: dict[str, Any] = dict(max_ongoing_requests=max_ongoing_requests, ray_actor_options=actor)
    if max_replicas and max_replicas > (min_replicas or num_replicas):
        opts["autoscaling_config"] = {"min_replicas": min_replicas if min_replicas is not None else num_replicas,
                                      "max_replicas": max_replicas,
                                      "target_ongoing_requests": max(1, max_ongoing_requests // 2)}
    else:
        opts["num_replicas"] = num_replicas
    return opts


def deploy(spec: ServerSpec, options: dict, host: str, port: int, route_prefix: str):
    """Start Serve's proxy on host:port and run the app; returns its URL. Where Serve already runs on
    this cluster its proxy keeps its own host and port (Ray ignores new ones), so the URL names those."""
    from ray import serve
    from ray.serve.context import _get_global_client

    serve.start(http_options={"host": host, "port": port})
    app = make_app().options(**options).bind(spec)
    serve.run(app, name=APP_NAME, route_prefix=route_prefix, blocking=False)
    http = _get_global_client().http_config
    return f"http://{http.host}:{http.port}{route_prefix.rstrip('/')}"


def replica_urls(route_prefix: str, wait_s: float = 3.0) -> list[str]:
    """Each replica's own HTTP address under Ray Serve's direct ingress (cluster.SERVE_ENV): a
    request there skips the proxy. Empty where the cluster runs Serve without direct ingress
    (Ray then lists only its proxies, which this leaves out). With serve.host on loopback, only
    the replicas on this node are listed: the others listen on their own node's loopback."""
    import time

    import ray
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    proxy_port, host = client.http_config.port, client.http_config.host

    def reachable(t) -> bool:   # a replica bound to loopback (serve.host) on another node is not
        return t.port != proxy_port and (not loopback(host) or t.ip == host)

    deadline = time.monotonic() + wait_s
    while True:   # a replica's port reaches the controller a control-loop tick after it starts
        groups = ray.get(client._controller.get_target_groups.remote(APP_NAME))
        urls = sorted(f"http://{t.ip}:{t.port}{route_prefix.rstrip('/')}" for g in groups
                      if g.protocol == "HTTP" for t in g.targets if reachable(t))
        if urls or time.monotonic() > deadline:
            return urls
        time.sleep(0.2)


def loopback(host: str) -> bool:
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def describe(url: str, replicas: list[str]) -> str:
    """Where to send requests, for the console."""
    if not replicas:
        return f"{url}/v1"
    return (f"{url}/v1 (Serve's proxy, spreads over replicas), or straight to a replica: "
            + ", ".join(f"{r}/v1" for r in replicas))


def undeploy() -> None:
    from ray import serve

    with contextlib.suppress(Exception):
        serve.delete(APP_NAME)


def from_config(serve_cfg, model_path: str, served_name: str, store_namespace: str | None,
                log_level: str = "quiet", file_server=None, lora_rank: int | None = None,
                adapter_dir: str | None = None) -> tuple[ServerSpec, dict]:
    """ServerSpec and deployment options from a validated `serve` config section."""
    from .engine import engine_env

    s = serve_cfg
    # One core fewer than the replica has: its Python (HTTP, vLLM's front end) needs one, and the
    # engine's OpenMP threads spin (2 cores: 69 -> 95 req/s with 1 engine thread instead of 2).
    env = engine_env(s.num_threads or max(1, int(s.num_cpus) - 1), s.kv_cache_gib, s.num_gpus > 0, log_level,
                     in_process=True)
    if s.api_key_env:
        if not os.environ.get(s.api_key_env):
            raise ValueError(f"serve.api_key_env names {s.api_key_env}, but that environment variable is not "
                             "set; export it or remove serve.api_key_env")
        env[s.api_key_env] = os.environ[s.api_key_env]
    spec = ServerSpec(model=model_path, served_name=served_name, dtype=s.dtype, max_model_len=s.max_model_len,
                      default_max_tokens=s.default_max_tokens, api_key_env=s.api_key_env,
                      store_namespace=store_namespace, poll_seconds=s.poll_seconds,
                      max_drain_seconds=s.max_drain_seconds, max_body_bytes=s.max_body_bytes, max_n=s.max_n,
                      engine=dict(s.engine),
                      lora_rank=lora_rank, adapter_dir=adapter_dir, file_server=file_server)
    options = deployment_options(s.num_replicas, s.min_replicas, s.max_replicas, s.num_cpus, s.num_gpus,
                                 s.max_ongoing_requests, env, s.resources, s.node_labels)
    return spec, options
