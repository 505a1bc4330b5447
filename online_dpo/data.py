"""Prompt source: HF `datasets` (hub id or local json/jsonl/parquet) with a resumable cursor.

Prompts are read from one column, as plain text or chat messages, rendered
for the policy (its chat template when `format: chat`), tokenized once, and
filtered by length. The rows are read where the run starts (the driver sees
the data's paths); rendering and tokenizing is a `render_rows` function,
`renderer(tokenizer)`: in a run the sampler's (its engine has the policy's
tokenizer loaded, so the driver never imports transformers: ~2 CPU-seconds
of its start on 2 cores). `PromptSource` hands out batches in a seeded order
that reshuffles every epoch; its `state()` is the cursor to resume from.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from .embedded import EMBEDDED, embedded_prompts

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    pass


@dataclass(frozen=True)
class Prompt:
    text: str                 # what the judge sees: the user's prompt
    ids: tuple[int, ...]      # what the policy sees: rendered and tokenized


def load_rows(source: str, split: str, field: str) -> list:
    """The `field` column of a dataset split, as a list."""
    if source == EMBEDDED:
        return embedded_prompts(split)
    path = Path(source).expanduser()
    try:
        from datasets import load_dataset

        if path.exists():
            kind = LOCAL_FORMATS.get(path.suffix)
            if kind is None:
                raise DataError(f"data.source {source}: unsupported file type {path.suffix!r}; "
                                f"use one of {', '.join(LOCAL_FORMATS)}")
            ds = load_dataset(kind, data_files=str(path), split="train")
        else:
            ds = load_dataset(source, split=split)
    except DataError:
        raise
    except Exception as e:  # datasets raises many kinds; say which field to change
        raise DataError(f"data.source {source!r} (split {split!r}) cannot be loaded: {e}") from None
    if field not in ds.column_names:
        raise DataError(f"data.prompt_field {field!r} is not a column of {source}; "
                        f"columns are: {', '.join(ds.column_names)}")
    return list(ds[field])


def user_text(row) -> str:
    if isinstance(row, str):
        return row
    users = [m["content"] for m in row if m.get("role") == "user"]
    return users[-1] if users else row[-1]["content"]


def row_problem(row, fmt: str) -> str | None:
    """Why a row cannot be a prompt (None: it can): its shape, emptiness or encoding."""
    if isinstance(row, str):
        text = row
    elif isinstance(row, list) and row and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                               and isinstance(m.get("content"), str) for m in row):
        if fmt == "plain":
            return "chat messages, but data.format is 'plain' (set data.format: chat)"
        text = "".join(m["content"] for m in row)
    else:
        return "neither text nor a list of chat messages"
    if not text.strip():
        return "empty"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "not valid UTF-8"
    return None


def render(row, tokenizer, fmt: str, system_prompt: str | None) -> list[int]:
    if fmt == "plain":
        return tokenizer(row)["input_ids"]
    messages = [{"role": "user", "content": row}] if isinstance(row, str) else list(row)
    if system_prompt and messages[0].get("role") != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("data.format is 'chat' but the policy's tokenizer has no chat template; "
                        "set data.format: plain")
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def renderer(tokenizer):
    """`render_rows(rows, fmt, system_prompt)`: each row's token ids, rendered with `tokenizer`."""
    def render_rows(rows: list, fmt: str, system_prompt: str | None) -> list[list[int]]:
        return [render(row, tokenizer, fmt, system_prompt) for row in rows]

    return render_rows


def prepare(rows: list, render_rows, fmt: str, system_prompt: str | None, max_tokens: int,
            skipped: dict[str, list[int]] | None = None, limit: str = "data.max_prompt_tokens") -> list[Prompt]:
    """The usable rows as prompts (`render_rows`: see `renderer`, called once for all of them). A row that
    is empty, not text or chat messages, not valid UTF-8, or longer than `max_tokens` once rendered is
    skipped and noted in `skipped` (why -> row numbers); no usable row at all is a DataError saying why."""
    skipped = {} if skipped is None else skipped
    problems = [row_problem(row, fmt) for row in rows]
    good = [row for row, why in zip(rows, problems) if why is None]
    rendered = iter(render_rows(good, fmt, system_prompt) if good else [])
    kept = []
    for i, (row, why) in enumerate(zip(rows, problems)):
        ids = list(next(rendered)) if why is None else []
        if why is None and not ids:
            why = "empty"
        elif why is None and len(ids) > max_tokens:
            why = f"longer than {max_tokens} tokens ({limit})"
        if why is None:
            kept.append(Prompt(text=user_text(row), ids=tuple(ids)))
        else:
            skipped.setdefault(why, []).append(i + 1)
    if not kept:
        reasons = "; ".join(f"{len(r)} {why}" for why, r in skipped.items()) or "there are no rows"
        raise DataError(f"no usable prompt among {len(rows)} rows ({reasons}); fix the data or the field named")
    return kept


def describe_skipped(skipped: dict[str, list[int]]) -> str:
    """One line: how many rows were skipped and why, with the first few row numbers."""
    return "; ".join(f"{len(rows)} {why} (rows {', '.join(map(str, rows[:5]))}{', ...' if len(rows) > 5 else ''})"
                     for why, rows in skipped.items())


class PromptSource:
    """Batches of prompts in a seeded order, reshuffled each epoch; resumable."""

    def __init__(self, prompts: list[Prompt], seed: int = 0, shuffle: bool = True):
        if not prompts:
            raise DataError("the prompt source is empty")
        self.prompts, self.seed, self.shuffle = prompts, seed, shuffle
        self.skipped: dict[str, int] = {}   # rows left out when the data loaded: why -> how many
        self.skipped_text = ""
        self.epoch, self.pos = 0, 0
        self.order = self._order(0)

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self, k: int) -> list[Prompt]:
        batch = []
        while len(batch) < k:
            if self.pos == len(self.order):
                self.epoch, self.pos = self.epoch + 1, 0
                self.order = self._order(self.epoch)
            take = min(k - len(batch), len(self.order) - self.pos)
            batch += [self.prompts[i] for i in self.order[self.pos:self.pos + take]]
            self.pos += take
        return batch

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def restore(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self.order = self._order(self.epoch)


@dataclass(frozen=True)
class Rows:
    """A run's prompt rows as read, before rendering: the training split's, and the held-out ones
    (None: the first `eval_prompts` usable training prompts are held out instead)."""
    train: list
    heldout: list | None


def read_rows(source: str, split: str, eval_source: str | None, eval_split: str, field: str) -> Rows:
    """The rows of the training and held-out splits, never overlapping.

    Held-out rows come from `eval_source` when given, the embedded default's
    held-out split, or the source's `eval_split` on the hub; a local file (which
    has no splits) or a hub dataset without that split gives up its first
    prompts instead (`Rows.heldout` None).
    """
    train = load_rows(source, split, field)
    if eval_source:
        return Rows(train, load_rows(eval_source, eval_split, field))
    if source == EMBEDDED:
        return Rows(train, load_rows(source, "heldout", field))
    if not Path(source).expanduser().exists():
        try:
            return Rows(train, load_rows(source, eval_split, field))
        except DataError:
            pass  # no such split: hold out part of the training split
    return Rows(train, None)


def prepare_rows(rows: Rows, render_rows, fmt: str, system_prompt: str | None, max_tokens: int, eval_prompts: int,
                 skipped: dict | None = None, limit: str = "data.max_prompt_tokens"
                 ) -> tuple[list[Prompt], list[Prompt]]:
    """Train prompts and (at most `eval_prompts`) held-out prompts from read rows (see `prepare`)."""
    train = prepare(rows.train, render_rows, fmt, system_prompt, max_tokens, skipped, limit)
    if rows.heldout is not None:
        return train, prepare(rows.heldout, render_rows, fmt, system_prompt, max_tokens, skipped, limit)[:eval_prompts]
    if eval_prompts >= len(train):
        raise DataError(f"data.source has {len(train)} prompts, too few to hold out eval.prompts "
                        f"({eval_prompts}) and train on the rest; lower eval.prompts or set data.eval_source")
    return train[eval_prompts:], train[:eval_prompts]


def prompt_limit(spec, context: int | None) -> tuple[int, str]:
    """The longest prompt the sampler can take with room for its max_new_tokens, and the fields behind it:
    data.max_prompt_tokens, or the sampler's `context` (its engine's max_model_len: sampler.max_model_len,
    else the model's) less those."""
    where = "sampler.max_model_len" if spec.max_model_len else "the model's context"
    if context is not None and context - spec.max_new_tokens < spec.max_prompt_tokens:
        return context - spec.max_new_tokens, f"{where} less sampler.max_new_tokens"
    return spec.max_prompt_tokens, "data.max_prompt_tokens"


def read_prompts(spec) -> Rows:
    """The run's prompt rows (a DataSpec), read where the run starts: a source that cannot be read, or
    a missing column, is a DataError before any engine is up."""
    return read_rows(spec.source, spec.split, spec.eval_source, spec.eval_split, spec.prompt_field)


def load_prompts(spec, rows: Rows, render_rows, context: int | None) -> tuple[PromptSource, list[Prompt]]:
    """The run's prompt source and held-out prompts from its read rows, rendered by `render_rows` (the
    policy's tokenizer) and fitted to the sampler's `context`; unusable rows are skipped and counted
    (`PromptSource.skipped`)."""
    skipped: dict[str, list[int]] = {}
    limit, fields = prompt_limit(spec, context)
    train, heldout = prepare_rows(rows, render_rows, spec.format, spec.system_prompt, limit, spec.eval_prompts,
                                  skipped, fields)
    source = PromptSource(train, seed=spec.seed, shuffle=spec.shuffle)
    source.skipped = {why: len(nums) for why, nums in skipped.items()}
    source.skipped_text = describe_skipped(skipped)
    return source, heldout
