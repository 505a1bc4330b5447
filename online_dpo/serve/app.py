"""Ray Serve application that serves the current policy over OpenAI-compatible HTTP: routes and the gate.

Routes: POST /v1/completions and /v1/chat/completions (plain or streamed as
server-sent events), GET /v1/models, GET /health. Every response names the
policy version that produced it. Requests are handled by vLLM's own OpenAI
layer around the replica's engine (api.py, replica.py), so the API is the one
`vllm serve` has.

What this module adds: the API key, and the version gate. The gate drains
in-flight requests before a weight load and holds new ones for the moment of
the load, so a response never mixes two versions and no request fails during
a sync. A load waits at most `serve.max_drain_seconds` for in-flight requests;
those still running then are aborted (a 503, or an error event in their
stream) rather than finished with other weights, so a stalled client cannot
hold up a weight update. `deploy` binds Serve's proxy to `serve.host`
(loopback by default).
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures at runtime.

import asyncio
import contextlib
import hashlib
import hmac

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..cluster import loopback
from ..errors import RunFailed
from ..specs import ServerSpec
from . import api

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


def preempted(seconds: float) -> api.APIError:
    return api.APIError(503, f"a new policy version was loaded while this request ran longer than "
                             f"serve.max_drain_seconds ({seconds:g} s); send it again",
                        type_="service_unavailable", code="policy_updated")


class PolicyServer:
    """The deployment: one replica (engine and weight following) behind the gate and the API key.
    `make_app` registers its routes and wraps it for Ray Serve."""

    async def __init__(self, spec: ServerSpec):
        from .replica import Replica, bind_internal_grpc_to_node_ip

        bind_internal_grpc_to_node_ip()
        self.spec, self.gate = spec, VersionGate(spec.max_drain_seconds)
        self.replica = await Replica.start(spec, self.gate)
        self.limits = api.Limits(spec.max_n, spec.max_request_tokens, spec.default_max_tokens)

    def authorize(self, request: Request) -> None:
        """The key's hash, compared in constant time (the replica never holds the key itself)."""
        if self.spec.api_key_sha256 is None:
            return
        sent = request.headers.get("authorization", "").removeprefix("Bearer ")
        if not hmac.compare_digest(hashlib.sha256(sent.encode()).hexdigest(), self.spec.api_key_sha256):
            raise api.APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                               type_="authentication_error", code="invalid_api_key")

    async def parsed(self, request: Request, kind: str):
        """The request, authorized, size-capped, parsed strictly and within limits (APIError if not)."""
        self.authorize(request)
        req = api.parse(await api.read_body(request, self.spec.max_body_bytes), self.replica.openai.request_types[kind])
        if req.model is None:
            req.model = self.spec.served_name
        if kind == "chat" and req.max_tokens is None and req.max_completion_tokens is None:
            req.max_tokens = self.spec.default_max_tokens   # vLLM's default: the rest of the context
        api.check_limits(req, self.limits)
        return req

    async def handle(self, request: Request, kind: str):
        try:
            req = await self.parsed(request, kind)
        except api.APIError as e:
            return error(e)
        openai = self.replica.openai
        serving = openai.chat if kind == "chat" else openai.completion
        run = serving.create_chat_completion if kind == "chat" else serving.create_completion
        ticket = await self.gate.enter(lambda: self.replica.version)
        streaming = False
        try:
            try:
                out = await run(req, request)
            except Exception as e:   # vLLM raises its validation errors; map them as its server does
                return error(api.from_vllm(serving.create_error_response(e)))
            if ticket.revoked:
                return error(preempted(self.spec.max_drain_seconds))
            if openai.is_error(out):
                return error(api.from_vllm(out))
            headers = {"x-policy-version": str(ticket.version)}
            if hasattr(out, "__aiter__"):
                streaming = True
                return StreamingResponse(self.relay(out, ticket), media_type="text/event-stream", headers=headers)
            return Response(api.with_version(out.model_dump_json(), ticket.version), media_type="application/json",
                            headers=headers)
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

    async def completions(self, request: Request):
        return await self.handle(request, "completion")

    async def chat(self, request: Request):
        return await self.handle(request, "chat")

    async def models(self, request: Request):
        try:
            self.authorize(request)
        except api.APIError as e:
            return error(e)
        listing = (await self.replica.openai.models.show_available_models()).model_dump()
        seen, cards = set(), []
        for card in listing["data"]:   # a LoRA run lists its adapter under the served name too
            if card["id"] not in seen:
                seen.add(card["id"])
                cards.append({**card, "policy_version": self.replica.version})
        return {**listing, "data": cards}

    async def schema(self, request: Request):
        """The OpenAPI schema, for clients that hold the key (FastAPI's open /docs are off)."""
        try:
            self.authorize(request)
        except api.APIError as e:
            return error(e)
        return request.app.openapi()

    async def health(self):
        return {"status": "ok", "policy_version": self.replica.version, "model": self.spec.served_name}

    def check_health(self):
        if self.replica.engine.errored:
            raise RuntimeError("the vLLM engine has errored")


ROUTES = (("/v1/completions", "completions", "POST"), ("/v1/chat/completions", "chat", "POST"),
          ("/v1/models", "models", "GET"), ("/openapi.json", "schema", "GET"), ("/health", "health", "GET"))


def error(e: api.APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def make_app():
    """The PolicyServer deployment on a FastAPI app of its own routes (imports Ray Serve here)."""
    from fastapi import FastAPI
    from ray import serve

    app = FastAPI(title="online-dpo policy server", docs_url=None, redoc_url=None, openapi_url=None)
    for path, method, verb in ROUTES:
        app.add_api_route(path, getattr(PolicyServer, method), methods=[verb])
    return serve.deployment(name="PolicyServer")(serve.ingress(app)(PolicyServer))


def deploy(spec: ServerSpec, options: dict, host: str, port: int, route_prefix: str, app_name: str):
    """Start Serve's proxy on host:port and run the app `app_name`; returns its URL. Where Serve already
    runs on this cluster its proxy keeps its own host and port (Ray ignores new ones), so the URL names
    those. Two apps cannot share a route prefix: a second run serving on one cluster needs its own
    serve.route_prefix."""
    from ray import serve
    from ray.serve.context import _get_global_client

    serve.start(http_options={"host": host, "port": port})
    app = make_app().options(**options).bind(spec)
    apps = _get_global_client().get_serve_details().get("applications", {})
    taken = {a.get("route_prefix"): name for name, a in apps.items() if name != app_name}
    if route_prefix in taken:
        raise RunFailed(f"serve.route_prefix {route_prefix} is already served by {taken[route_prefix]} on this "
                        "cluster; give this run another serve.route_prefix (e.g. /run2)")
    serve.run(app, name=app_name, route_prefix=route_prefix, blocking=False)
    http = _get_global_client().http_config
    return f"http://{http.host}:{http.port}{route_prefix.rstrip('/')}"


def replica_urls(route_prefix: str, app_name: str, wait_s: float = 3.0) -> list[str]:
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
        groups = ray.get(client._controller.get_target_groups.remote(app_name), timeout=30)
        urls = sorted(f"http://{t.ip}:{t.port}{route_prefix.rstrip('/')}" for g in groups
                      if g.protocol == "HTTP" for t in g.targets if reachable(t))
        if urls or time.monotonic() > deadline:
            return urls
        time.sleep(0.2)


def describe(url: str, replicas: list[str]) -> str:
    """Where to send requests, for the console."""
    if not replicas:
        return f"{url}/v1"
    return (f"{url}/v1 (Serve's proxy, spreads over replicas), or straight to a replica: "
            + ", ".join(f"{r}/v1" for r in replicas))


def undeploy(app_name: str) -> None:
    from ray import serve

    with contextlib.suppress(Exception):
        serve.delete(app_name)
