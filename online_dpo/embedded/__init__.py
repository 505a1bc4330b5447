"""The embedded default (`embedded:reviews`): a local model, tokenizer and prompt set.

Light on purpose: resolving the name imports nothing heavy; building imports
torch and transformers (see build.py).
"""

from __future__ import annotations

import json

EMBEDDED = "embedded:reviews"


def model_path(name: str) -> str:
    """Where a model name points, without building anything (the embedded default's directory)."""
    if name != EMBEDDED:
        return name
    from .build import default_home, model_dir

    return str(model_dir(default_home()))


def resolve_model(name: str) -> str:
    """A model path for vLLM/transformers: the embedded default is built if missing."""
    if name != EMBEDDED:
        return name
    from .build import ensure_default, model_dir

    return str(model_dir(ensure_default()))


def embedded_prompts(split: str) -> list[str]:
    from .build import ensure_default, prompts_file

    home = ensure_default()
    name = "train" if split == "train" else "heldout"
    with open(prompts_file(name, home)) as f:
        return [json.loads(line)["prompt"] for line in f]
