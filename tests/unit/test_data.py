"""Prompt sources: local files, chat or plain, held-out prompts that never overlap, a resumable cursor."""

import json

import pytest

from online_dpo.data import DataError, Prompt, PromptSource, prepare, prepare_rows, read_rows, renderer


class ByteTokenizer:
    """Stands in for an HF tokenizer: one id per byte, and a tiny chat template."""
    chat_template = "yes"

    def __call__(self, text):
        return {"input_ids": list(text.encode())}

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"
        return list(text.encode())


BYTES = renderer(ByteTokenizer())   # render_rows with it, as a sampler renders with its engine's tokenizer


def load_splits(source, split, eval_source, eval_split, field, render_rows, fmt, system_prompt, max_tokens,
                eval_prompts):
    """Train and held-out prompts as a run makes them: rows read, then rendered and filtered."""
    return prepare_rows(read_rows(source, split, eval_source, eval_split, field), render_rows, fmt, system_prompt,
                        max_tokens, eval_prompts)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_local_file_holds_out_its_first_prompts(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"prompt {i}"} for i in range(10)])
    train, heldout = load_splits(src, "train", None, "test", "prompt", BYTES, "plain", None, 64, 3)
    assert [p.text for p in heldout] == ["prompt 0", "prompt 1", "prompt 2"]
    assert len(train) == 7 and not {p.text for p in train} & {p.text for p in heldout}
    assert train[0].ids == tuple(b"prompt 3")


def test_chat_format_and_messages(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 4)
    train, _ = load_splits(src, "train", None, "test", "messages", BYTES, "chat", "be kind", 64, 1)
    assert train[0].text == "hi" and bytes(train[0].ids) == b"<system>be kind<user>hi<assistant>"
    with pytest.raises(DataError, match="data.format is 'plain'"):
        load_splits(src, "train", None, "test", "messages", BYTES, "plain", None, 64, 1)


def test_errors_name_the_field(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{"text": "x"}] * 3)
    with pytest.raises(DataError, match="data.prompt_field 'prompt' is not a column.*text"):
        load_splits(src, "train", None, "test", "prompt", BYTES, "plain", None, 64, 1)
    with pytest.raises(DataError, match="eval.prompts"):
        load_splits(write_jsonl(tmp_path / "q.jsonl", [{"prompt": "x"}] * 3), "train", None, "test",
                    "prompt", BYTES, "plain", None, 64, 3)
    with pytest.raises(DataError, match="data.max_prompt_tokens"):
        prepare(["a long prompt"], BYTES, "plain", None, 4)
    bad = tmp_path / "p.txt"
    bad.write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        load_splits(str(bad), "train", None, "test", "prompt", BYTES, "plain", None, 64, 1)


def test_cursor_is_seeded_reshuffles_each_epoch_and_resumes():
    prompts = [Prompt(str(i), (i,)) for i in range(5)]
    a = PromptSource(prompts, seed=3)
    first = [p.text for p in a.next_batch(5)]
    second = [p.text for p in a.next_batch(5)]
    assert sorted(first) == sorted(second) == ["0", "1", "2", "3", "4"] and first != second
    b = PromptSource(prompts, seed=3)
    b.next_batch(3)
    state = b.state()
    rest = [p.text for p in b.next_batch(4)]
    c = PromptSource(prompts, seed=3)
    c.restore(state)
    assert [p.text for p in c.next_batch(4)] == rest


def test_bad_rows_are_skipped_and_counted_at_load(tmp_path):
    """Rows that are null, a dict, a number, empty, blank or too long never reach a sampler."""
    rows = ["a good prompt", None, {"x": 1}, 5, "", "   ", "x" * 100, "another good one",
            [{"role": "user", "content": "chat"}]]
    skipped = {}
    kept = prepare(rows, BYTES, "plain", None, 64, skipped)
    assert [p.text for p in kept] == ["a good prompt", "another good one"]
    assert skipped == {"neither text nor a list of chat messages": [2, 3, 4], "empty": [5, 6],
                       "longer than 64 tokens (data.max_prompt_tokens)": [7],
                       "chat messages, but data.format is 'plain' (set data.format: chat)": [9]}


def test_a_dataset_without_a_usable_row_is_refused_saying_why(tmp_path):
    with pytest.raises(DataError, match="no usable prompt among 3 rows \\(2 empty; 1 neither text"):
        prepare(["", " ", 7], BYTES, "plain", None, 64)
    with pytest.raises(DataError, match="there are no rows"):
        prepare([], BYTES, "plain", None, 64)


def test_the_prompt_limit_leaves_room_for_the_answer():
    """The sampler's context (its engine's max_model_len) less max_new_tokens caps data.max_prompt_tokens,
    named by the field behind it."""
    from online_dpo.data import prompt_limit
    from online_dpo.specs import DataSpec

    spec = DataSpec(source="x", max_prompt_tokens=256, max_new_tokens=64, max_model_len=200)
    assert prompt_limit(spec, 200) == (136, "sampler.max_model_len less sampler.max_new_tokens")
    spec = DataSpec(source="x", max_prompt_tokens=100, max_new_tokens=64, max_model_len=200)
    assert prompt_limit(spec, 200) == (100, "data.max_prompt_tokens")
    spec = DataSpec(source="x", max_prompt_tokens=500, max_new_tokens=64)
    assert prompt_limit(spec, 512) == (448, "the model's context less sampler.max_new_tokens")
    assert prompt_limit(spec, None) == (500, "data.max_prompt_tokens")


def test_rows_are_rendered_in_one_call_and_only_the_usable_ones():
    """prepare() hands render_rows every usable row at once (one round trip to a sampler), none of the bad."""
    calls = []

    def render_rows(rows, fmt, system_prompt):
        calls.append(list(rows))
        return BYTES(rows, fmt, system_prompt)

    kept = prepare(["ab", "", 7, "cd"], render_rows, "plain", None, 64)
    assert calls == [["ab", "cd"]] and [p.ids for p in kept] == [tuple(b"ab"), tuple(b"cd")]


def test_rows_are_read_without_a_tokenizer_and_bad_sources_fail_there(tmp_path):
    """read_rows (the driver, while the engines start) needs no tokenizer: a missing column fails there; a
    local file holds out its first prompts once they are rendered (Rows.heldout None)."""
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"prompt {i}"} for i in range(6)])
    with pytest.raises(DataError, match="data.prompt_field 'text' is not a column"):
        read_rows(src, "train", None, "test", "text")
    rows = read_rows(src, "train", None, "test", "prompt")
    assert rows.heldout is None and len(rows.train) == 6
    train, heldout = prepare_rows(rows, BYTES, "plain", None, 64, 2)
    assert [p.text for p in heldout] == ["prompt 0", "prompt 1"] and len(train) == 4
    embedded = read_rows("embedded:reviews", "train", None, "test", "prompt")
    assert embedded.heldout and not set(embedded.heldout) & set(embedded.train)
