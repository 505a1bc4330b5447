"""Model directories reach nodes without a shared filesystem through the FileServer actor."""

from __future__ import annotations

from pathlib import Path

from online_dpo.artifacts import fetch_model, local_model, start_file_server


def test_fetched_copy_matches_and_loads(ray_local, embedded_model, tmp_path):
    server = start_file_server()
    copy = Path(fetch_model(embedded_model, server, root=tmp_path))
    src = Path(embedded_model)
    names = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*")
                           if p.is_file() and p.name != ".complete")
    for name in names:
        assert (src / name).read_bytes() == (copy / name).read_bytes()
    assert fetch_model(embedded_model, server, root=tmp_path) == str(copy)  # cached: fetched once
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(copy).config.model_type == "qwen2"
    # A path this node can see, and a hub id, are used as they are.
    assert local_model(embedded_model, server) == embedded_model
    assert local_model("Qwen/Qwen2.5-0.5B", server) == "Qwen/Qwen2.5-0.5B"
    ray_local.kill(server)
