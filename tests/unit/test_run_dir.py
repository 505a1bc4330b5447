"""The run directory: one process at a time, and nothing in it tears (no Ray)."""

from __future__ import annotations

import json
import os

import pytest

from online_dpo.run_dir import RunDir, RunDirBusy, read_jsonl, write_atomic


def test_a_second_process_is_refused_with_who_holds_it(tmp_path):
    first = RunDir(tmp_path / "run")
    (first.path / "config.yaml").write_text("run: {}\n")
    with pytest.raises(RunDirBusy, match=f"in use by pid {os.getpid()}"):
        RunDir.open(first.path)
    first.close()
    RunDir.open(first.path).close()   # free again once the holder closes (or dies)


def test_a_torn_last_metrics_line_is_dropped_and_the_cut_is_whole(tmp_path):
    rd = RunDir(tmp_path / "run")
    for step in (1, 2, 3):
        rd.log({"kind": "train", "step": step})
    rd._metrics.write('{"kind": "train", "st')   # a kill mid-write
    rd._metrics.flush()
    assert [r["step"] for r in read_jsonl(rd.path / "metrics.jsonl")] == [1, 2, 3]
    assert rd.truncate_metrics(lambda r: r["step"] <= 2) == 1
    rd.log({"kind": "train", "step": 3})
    rd.close()
    lines = (rd.path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == [1, 2, 3]


def test_whole_files_are_swapped_in(tmp_path):
    path = tmp_path / "summary.json"
    write_atomic(path, "old")
    write_atomic(path, "new")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_policy_is_swapped_in_whole(tmp_path):
    class Checkpoint:
        def __init__(self, folder):
            self.folder = folder

        def as_directory(self):
            import contextlib
            return contextlib.nullcontext(str(self.folder))

    rd = RunDir(tmp_path / "run")
    for k, files in enumerate((["a", "stale"], ["a"])):
        src = tmp_path / f"ckpt{k}" / "policy"
        src.mkdir(parents=True)
        for name in files:
            (src / name).write_text(str(k))
        rd.copy_policy(Checkpoint(src.parent))
    assert sorted(p.name for p in (rd.path / "policy").iterdir()) == ["a"]   # no stale file from the first copy
    assert (rd.path / "policy" / "a").read_text() == "1"
    assert not [p for p in rd.path.iterdir() if p.name.startswith(".policy")]
    rd.close()
