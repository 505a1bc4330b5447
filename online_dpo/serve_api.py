"""The OpenAI-compatible HTTP surface of the policy server: requests, responses, errors.

Pure pydantic and dicts (no Ray, no vLLM), so the rules are unit-testable.
Every bad request maps to a 4xx in OpenAI's error shape
(`{"error": {"message", "type", "param", "code"}}`), never a 500; every
response body and stream chunk carries `policy_version`.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    seed: int | None = None
    stop: str | list[str] | None = None


class CompletionRequest(_Request):
    prompt: str | list[str] = Field(..., min_length=1)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Request):
    messages: list[Message] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def parse(raw: bytes, model: type[_Request]) -> _Request:
    """Body bytes -> a validated request, or an APIError naming the field."""
    try:
        data = json.loads(raw or b"")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or None
        msg = "is required" if first["type"] == "missing" else first["msg"]
        raise APIError(400, f"{where}: {msg}", param=where) from None


def check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise APIError(404, f"The model '{requested}' does not exist; this server serves '{served}'",
                       param="model", code="model_not_found")


def check_context(prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
    if prompt_tokens + max_tokens > max_model_len:
        raise APIError(400, f"max_tokens ({max_tokens}) plus the prompt ({prompt_tokens} tokens) exceeds "
                            f"the model's context of {max_model_len} tokens; lower max_tokens",
                       param="max_tokens", code="context_length_exceeded")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, version: int, choices: list[dict], usage_: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage_, "policy_version": version}


def chat_body(rid: str, model: str, version: int, choices: list[dict], usage_: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage_, "policy_version": version}


def completion_chunk(rid: str, model: str, version: int, index: int, text: str, finish: str | None) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}],
            "policy_version": version}


def chat_chunk(rid: str, model: str, version: int, index: int, delta: dict, finish: str | None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}],
            "policy_version": version}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def models_body(model: str, version: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": 0,
                                        "owned_by": "online-dpo", "policy_version": version}]}
