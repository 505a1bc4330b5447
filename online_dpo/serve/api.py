"""The OpenAI-compatible surface of the policy server, on vLLM's own OpenAI layer.

vLLM's serving classes (`OpenAIServingCompletion`, `OpenAIServingChat`,
`OpenAIServingModels`, built by the same `init_app_state` that `vllm serve`
runs) handle the requests: every field the OpenAI API has (n, logprobs and
top_logprobs, stop, seed, echo, batched prompts, usage, streaming with usage),
the chat template, the checks against max_model_len and max_logprobs, and the
response bodies. So the surface tracks vLLM's server, not a hand-written
subset.

What is ours, and lives here: the edge in front of that layer. Bodies are
size-capped before they are read (413), parsed strictly with vLLM's own
request models (`stream: "yes"` or `max_tokens: "5"` is a 400, not coerced),
deeply nested JSON is a 400 (the parser's recursion limit), `n` is capped, and
every failure, vLLM's included, leaves in OpenAI's error shape
(`{"error": {"message", "type", "param", "code"}}`) with a 4xx status for
bad input. Every response body and stream chunk gets `policy_version`.

No module-level vLLM import: the edge rules are unit-testable without it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAX_N = 16   # choices per request; vLLM itself has no bound


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------- the edge

async def read_body(request, limit: int) -> bytes:
    """The request body, refused with a 413 once it passes `limit` bytes (checked on the declared
    length first, then while reading, so a huge body is never held whole)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than {limit} bytes (serve.max_body_bytes); "
                         "send a smaller request", code="request_too_large")


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "bytes"}


def field_path(loc: tuple) -> str | None:
    """The JSON path of a pydantic error location, without the union-member tags pydantic adds
    (`messages.0.ChatCompletionUserMessageParam.content.str` -> `messages.0.content`)."""
    parts = []
    for p in loc:
        if isinstance(p, int):
            parts.append(str(p))
        elif p and not (p[0].isupper() or "[" in p or "-" in p or p in _TYPE_TAGS):
            parts.append(p)
    return ".".join(parts) or None


def validation_error(e) -> APIError:
    """A pydantic ValidationError as a 400 naming the first field at fault."""
    first = e.errors()[0]
    if first["type"] in ("json_invalid", "json_type"):
        return APIError(400, f"the request body is not valid JSON: {first['msg']}")
    where = field_path(tuple(first["loc"]))
    msg = "is required" if first["type"] == "missing" else first["msg"]
    return APIError(400, f"{where}: {msg}" if where else msg, param=where)


def parse(raw: bytes, model: type) -> Any:
    """Body bytes -> a request of vLLM's `model` class, strictly typed; or a 400 naming the field."""
    from pydantic import ValidationError

    if not raw.strip():
        raise APIError(400, "the request body is empty; send a JSON object")
    if raw.lstrip()[:1] != b"{":
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate_json(raw, strict=True)
    except ValidationError as e:
        raise validation_error(e) from None
    except Exception as e:   # a model validator of vLLM's (VLLMValidationError names the field)
        param = getattr(e, "parameter", None)
        raise APIError(400, str(e) or type(e).__name__, param=param) from None


ROLES = ("system", "user", "assistant", "tool", "developer")   # OpenAI's chat roles
MAX_STOP = 16          # stop strings per request
MAX_LOGIT_BIAS = 300   # logit_bias entries per request (OpenAI's own bound)
MAX_MESSAGES = 1024    # chat messages per request


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, priced before it runs."""
    max_n: int = MAX_N
    max_request_tokens: int = 65536   # prompts x n x max_tokens
    default_max_tokens: int = 16      # what a request without max_tokens is priced at


def prompt_count(req) -> int:
    """How many prompts a request carries: a chat is one; a completion's prompt may be a batch."""
    prompt = getattr(req, "prompt", None)
    if prompt is None or isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                                    and isinstance(prompt[0], int)):
        return 1
    return len(prompt) if isinstance(prompt, list) else 1


def check_limits(req, limits: Limits = Limits()) -> None:
    """A 400 naming the cap a request passes: choices, its token budget, stop strings, logit_bias,
    messages, or a chat role outside OpenAI's."""
    n = getattr(req, "n", None) or 1
    if n > limits.max_n:
        raise APIError(400, f"n: at most {limits.max_n} choices per request (serve.max_n)", param="n")
    for i, message in enumerate(getattr(req, "messages", None) or ()):
        role = message.get("role") if isinstance(message, dict) else getattr(message, "role", None)
        if role not in ROLES:
            raise APIError(400, f"messages.{i}.role: {role!r} is not one of {', '.join(ROLES)}",
                           param=f"messages.{i}.role")
    sizes = {"messages": (len(getattr(req, "messages", None) or ()), MAX_MESSAGES),
             "stop": (len(req.stop) if isinstance(getattr(req, "stop", None), list) else 0, MAX_STOP),
             "logit_bias": (len(getattr(req, "logit_bias", None) or {}), MAX_LOGIT_BIAS)}
    for field, (size, cap) in sizes.items():
        if size > cap:
            raise APIError(400, f"{field}: at most {cap} per request (got {size})", param=field)
    tokens = getattr(req, "max_completion_tokens", None) or getattr(req, "max_tokens", None) \
        or limits.default_max_tokens
    asked = prompt_count(req) * n * tokens
    if asked > limits.max_request_tokens:
        raise APIError(400, f"this request asks for up to {asked} tokens (prompts x n x max_tokens), more than "
                            f"serve.max_request_tokens ({limits.max_request_tokens}); split it or ask for fewer",
                       param="max_tokens")


# ---------------------------------------------------------------- responses

def from_vllm(error) -> APIError:
    """vLLM's ErrorResponse as ours (same shape; the HTTP status is its `code`)."""
    info = error.error
    status = int(info.code) if isinstance(info.code, int) and 400 <= int(info.code) < 600 else 400
    return APIError(status, info.message, param=info.param, type_=info.type, code=status)


def with_version(json_text: str, version: int) -> str:
    """A JSON object's text with `policy_version` added (no re-parse)."""
    return f'{{"policy_version":{int(version)},{json_text.lstrip()[1:]}' if json_text.strip() != "{}" \
        else f'{{"policy_version":{int(version)}}}'


def sse_with_version(event: str, version: int) -> str:
    """A server-sent event from vLLM (`data: {...}\\n\\n`) with `policy_version` in its JSON."""
    if event.startswith("data: {"):
        return "data: " + with_version(event[6:], version)
    return event


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


# ---------------------------------------------------------------- vLLM's layer

@dataclass
class OpenAILayer:
    """vLLM's serving objects around one engine."""
    completion: Any
    chat: Any
    models: Any
    request_types: dict   # "completion" | "chat" -> vLLM's request model
    error_type: type      # vLLM's ErrorResponse

    def is_error(self, out) -> bool:
        return isinstance(out, self.error_type)


async def openai_layer(engine, model_path: str, served_name: str, extra_args: list[str] | None = None) -> OpenAILayer:
    """Build vLLM's OpenAI serving objects for a running AsyncLLM, as `vllm serve` does (its own
    argument parser gives every front-end default)."""
    from starlette.datastructures import State
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(
        ["--model", model_path, "--served-model-name", served_name, *(extra_args or [])])
    state = State()
    await init_app_state(engine, state, args, supported_tasks=await engine.get_supported_tasks())
    return OpenAILayer(completion=state.openai_serving_completion, chat=state.openai_serving_chat,
                       models=state.openai_serving_models,
                       request_types={"completion": CompletionRequest, "chat": ChatCompletionRequest},
                       error_type=ErrorResponse)
