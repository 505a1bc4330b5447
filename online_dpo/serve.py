"""Ray Serve application that serves the current policy over OpenAI-compatible HTTP.

Each replica holds a vLLM AsyncLLM engine. On CPU its engine core runs inside
the replica process (measured faster on 2 cores than a separate engine-core
process: no IPC per step); on GPU vLLM's usual engine-core process is used. Routes: POST /v1/completions and
/v1/chat/completions (plain or streamed as server-sent events), GET /v1/models,
GET /health. Every response names the policy version that produced it.

Live updates: replicas poll the run's `PolicyStore` actor and load any newer
version in place. A version gate drains in-flight requests first and holds new
ones for the moment of the load, so a response never mixes two versions and no
request fails during a sync; they wait instead.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures at runtime.

import asyncio
import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

from . import serve_api as api
from .weight_sync import EngineWeights

STORE_NAME = "policy-store"
APP_NAME = "online-dpo"


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
    gpu_memory_utilization: float = 0.85
    engine: dict[str, Any] = field(default_factory=dict)
    lora_rank: int | None = None      # model.lora runs: serve the base model with the policy's adapter
    adapter_dir: str | None = None    # a LoRA run's final adapter (PEFT format) to start from
    file_server: Any = None   # fetches `model` when this node cannot see it (artifacts.py)


class VersionGate:
    """Many requests, or one weight load: never both at once."""

    def __init__(self):
        self.active, self.loading = 0, False
        self.cond = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def request(self):
        async with self.cond:
            await self.cond.wait_for(lambda: not self.loading)
            self.active += 1
        try:
            yield
        finally:
            async with self.cond:
                self.active -= 1
                self.cond.notify_all()

    @contextlib.asynccontextmanager
    async def load(self):
        async with self.cond:
            self.loading = True
            await self.cond.wait_for(lambda: self.active == 0)
        try:
            yield
        finally:
            async with self.cond:
                self.loading = False
                self.cond.notify_all()


def build_engine(spec: ServerSpec, on_gpu: bool):
    from vllm import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from .engine import engine_kwargs, lora_kwargs

    return AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs(
        spec.model, spec.dtype, spec.max_model_len, spec.gpu_memory_utilization, spec.engine, on_gpu,
        spec.file_server, **lora_kwargs(spec.lora_rank))))


def make_app():
    """The FastAPI ingress and the deployment class (imports Ray Serve lazily)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from ray import serve

    app = FastAPI(title="online-dpo policy server")

    def error(e: api.APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @serve.deployment(name="PolicyServer")
    @serve.ingress(app)
    class PolicyServer:
        async def __init__(self, spec: ServerSpec):
            import torch

            self.spec = spec
            self.engine = build_engine(spec, torch.cuda.is_available())
            self.tokenizer = self.engine.get_tokenizer()
            self.max_model_len = self.engine.model_config.max_model_len
            self.weights, self.gate = EngineWeights(), VersionGate()
            if spec.adapter_dir:   # a finished LoRA run: its final adapter on the base model
                from vllm.lora.request import LoRARequest

                from .weight_sync import ADAPTER

                request = LoRARequest(ADAPTER, 1, spec.adapter_dir)
                await self.engine.add_lora(request)
                self.weights.use_adapter(None, request)
            self.api_key = os.environ.get(spec.api_key_env) if spec.api_key_env else None
            self.store = None
            if spec.store_namespace is not None:
                import ray

                self.store = ray.get_actor(STORE_NAME, namespace=spec.store_namespace)
                await self.sync_once()  # a new replica starts from the latest version
                self.poller = asyncio.create_task(self.poll())

        # ------------------------------------------------------------ weights

        async def sync_once(self) -> None:
            handle = await self.store.latest.remote()
            if not self.weights.wants(handle):
                return
            async with self.gate.load():
                await self.weights.load_async(self.engine, handle)

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

        def sampling(self, req, prompt_tokens: int, default_max: int):
            from vllm import SamplingParams
            from vllm.sampling_params import RequestOutputKind

            max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens or default_max
            if req.max_tokens is None and getattr(req, "max_completion_tokens", None) is None:
                max_tokens = max(1, min(max_tokens, self.max_model_len - prompt_tokens))
            api.check_context(prompt_tokens, max_tokens, self.max_model_len)
            return SamplingParams(n=req.n, temperature=req.temperature, top_p=req.top_p, max_tokens=max_tokens,
                                  seed=req.seed, stop=req.stop,
                                  output_kind=RequestOutputKind.DELTA if req.stream else RequestOutputKind.FINAL_ONLY)

        def chat_ids(self, req) -> list[int]:
            ids = self.tokenizer.apply_chat_template([m.model_dump() for m in req.messages], tokenize=True,
                                                     add_generation_prompt=True)
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

        async def handle(self, request: Request, kind: str):
            try:
                self.authorize(request)
                req = api.parse(await request.body(), api.ChatRequest if kind == "chat" else api.CompletionRequest)
                api.check_model(req.model, self.spec.served_name)
                if kind == "chat":
                    ids = self.chat_ids(req)
                else:
                    if isinstance(req.prompt, list) and len(req.prompt) != 1:
                        raise api.APIError(400, "prompt: send one prompt per request", param="prompt")
                    text = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
                    ids = self.tokenizer(text)["input_ids"]
                params = self.sampling(req, len(ids), 16 if kind == "completion" else self.spec.default_max_tokens)
            except api.APIError as e:
                return error(e)
            rid = api.new_id("chatcmpl" if kind == "chat" else "cmpl")
            if req.stream:
                return StreamingResponse(self.stream(rid, kind, ids, params), media_type="text/event-stream")
            return await self.complete(rid, kind, ids, params)

        async def complete(self, rid: str, kind: str, ids: list[int], params):
            from vllm import TokensPrompt

            final = None
            async with self.gate.request():
                version, lora = self.weights.version, self.weights.lora
                async for out in self.engine.generate(TokensPrompt(prompt_token_ids=ids), params, rid,
                                                      lora_request=lora):
                    final = out
            n_out = sum(len(c.token_ids) for c in final.outputs)
            if kind == "chat":
                choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                            "logprobs": None, "finish_reason": c.finish_reason} for c in final.outputs]
                body = api.chat_body(rid, self.spec.served_name, version, choices, api.usage(len(ids), n_out))
            else:
                choices = [{"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                           for c in final.outputs]
                body = api.completion_body(rid, self.spec.served_name, version, choices,
                                           api.usage(len(ids), n_out))
            return JSONResponse(body, headers={"x-policy-version": str(version)})

        async def stream(self, rid: str, kind: str, ids: list[int], params):
            from vllm import TokensPrompt

            name = self.spec.served_name
            async with self.gate.request():
                version, lora = self.weights.version, self.weights.lora
                if kind == "chat":
                    for i in range(params.n):
                        yield api.sse(api.chat_chunk(rid, name, version, i, {"role": "assistant", "content": ""},
                                                     None))
                async for out in self.engine.generate(TokensPrompt(prompt_token_ids=ids), params, rid,
                                                      lora_request=lora):
                    for c in out.outputs:
                        if kind == "chat":
                            chunk = api.chat_chunk(rid, name, version, c.index,
                                                   {"content": c.text} if c.text else {}, c.finish_reason)
                        else:
                            chunk = api.completion_chunk(rid, name, version, c.index, c.text, c.finish_reason)
                        yield api.sse(chunk)
            yield api.sse("[DONE]")

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
            return api.models_body(self.spec.served_name, self.weights.version)

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
    env = engine_env(s.num_threads or max(1, int(s.num_cpus)), s.kv_cache_gib, s.num_gpus > 0, log_level,
                     in_process=True)
    if s.api_key_env:
        if not os.environ.get(s.api_key_env):
            raise ValueError(f"serve.api_key_env names {s.api_key_env}, but that environment variable is not "
                             "set; export it or remove serve.api_key_env")
        env[s.api_key_env] = os.environ[s.api_key_env]
    spec = ServerSpec(model=model_path, served_name=served_name, dtype=s.dtype, max_model_len=s.max_model_len,
                      default_max_tokens=s.default_max_tokens, api_key_env=s.api_key_env,
                      store_namespace=store_namespace, poll_seconds=s.poll_seconds, engine=dict(s.engine),
                      lora_rank=lora_rank, adapter_dir=adapter_dir, file_server=file_server)
    options = deployment_options(s.num_replicas, s.min_replicas, s.max_replicas, s.num_cpus, s.num_gpus,
                                 s.max_ongoing_requests, env, s.resources, s.node_labels)
    return spec, options
