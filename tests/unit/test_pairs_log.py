"""The preference log (pairs_log.py): rows per outcome, restarts, resume, the summary and the export."""

from __future__ import annotations

from online_dpo.buffer import PairBuffer
from online_dpo.judges.base import label_groups
from online_dpo.judges.rule import RuleJudge
from online_dpo.pairs_log import PairLog, export, read, summarise
from online_dpo.types import Completion, PreferencePair, SampleGroup


def pair(k: int, version: int = 0) -> PreferencePair:
    c = Completion((k, 1), f"good {k}", "stop", version)
    r = Completion((k, 2), f"bad {k}", "length", version)
    return PreferencePair(f"prompt {k}", (k,), c, r, 0.9, 0.1, details={"order_agreement": 1.0})


def test_rows_carry_the_pair_its_versions_and_what_became_of_it(tmp_path):
    log = PairLog(tmp_path)
    log.ordered(1, [pair(1), pair(2)])
    log.done(1, [("tie", pair(3)), ("stale", pair(4))])
    log.end(1, [("identical", pair(5))], [pair(6, version=1)])
    rows = read(tmp_path).to_pylist()
    assert [(r["outcome"], r["step"]) for r in rows] == [("trained", 1), ("trained", 1), ("tie", None),
                                                         ("stale", None), ("identical", None), ("unused", None)]
    first = rows[0]
    assert (first["prompt"], first["chosen"], first["rejected"]) == ("prompt 1", "good 1", "bad 1")
    assert (first["chosen_score"], first["rejected_score"], first["chosen_version"]) == (0.9, 0.1, 0)
    assert first["order_agreement"] == 1.0 and rows[-1]["chosen_version"] == 1
    assert log.counts() == {"trained": 2, "tie": 1, "stale": 1, "identical": 1, "unused": 1}


def test_a_gang_restart_relabels_lost_steps_and_resume_cuts_after_the_checkpoint(tmp_path):
    log = PairLog(tmp_path)
    for step in (1, 2, 3):
        log.ordered(step, [pair(step)])
        log.done(step, [])
    log.ordered(4, [pair(4)])          # ordered, never run: the gang restarted from step 1
    pending, relabelled = log.restarted(1)
    assert [p.prompt for p in pending] == ["prompt 4"] and relabelled == 2
    assert log.counts() == {"trained": 1, "restart": 2}
    log.ordered(2, [pair(20)])
    log.done(2, [])                     # the redone step 2
    assert log.counts() == {"trained": 2, "restart": 2}
    log.end(2, [], [pair(30)])
    again = PairLog(tmp_path)           # --resume from the checkpoint at step 1
    assert again.truncate(1) == 4       # steps 2 (twice), 3 and unused.parquet
    assert again.counts() == {"trained": 1}
    again.ordered(2, [pair(21)])
    again.done(2, [])
    assert [r["prompt"] for r in read(tmp_path).to_pylist()] == ["prompt 1", "prompt 21"]


def test_off_writes_nothing(tmp_path):
    log = PairLog(tmp_path, enabled=False)
    log.ordered(1, [pair(1)])
    log.done(1, [("tie", pair(2))])
    log.end(1, [], [pair(3)])
    assert not (tmp_path / "pairs").exists() and log.counts() == {}


def test_a_judge_labels_dropped_groups_and_the_buffer_keeps_its_drops_for_the_log():
    judge = RuleJudge(lambda prompts, responses: [len(r) for r in responses])

    def group(*texts):
        return SampleGroup("p", (1,), tuple(Completion((i, len(t)), t, "stop", 0) for i, t in enumerate(texts)))

    labels = label_groups(judge, [group("a", "abc"), group("ab", "cd"), group("x", "x")])
    assert len(labels.pairs) == 1 and [why for why, _ in labels.dropped] == ["tie", "tie"]
    buf = PairBuffer(10)
    buf.put([pair(1, version=0), pair(2, version=2)])
    buf.prune(1)
    buf.discard_newer(1)
    buf.drop(list(labels.dropped))
    assert [why for why, _ in buf.drain()] == ["stale", "restart", "tie", "tie"]
    assert (buf.stale, buf.discarded, buf.drain()) == (1, 1, [])


def test_summary_and_export_for_offline_dpo(tmp_path):
    import datasets

    log = PairLog(tmp_path)
    log.ordered(1, [pair(1), pair(2)])
    log.done(1, [("tie", pair(3)), ("stale", pair(4))])
    text = summarise(tmp_path)
    assert "4 judged pairs" in text and "trained 2" in text and "tie 1" in text and "v0" in text
    assert "agreement between the two orders: 1.000" in text and "good 1" in text
    assert export(tmp_path, str(tmp_path / "out")) == 3    # trained and stale: the judge separated them
    ds = datasets.load_from_disk(str(tmp_path / "out"))
    assert {"prompt", "chosen", "rejected"} <= set(ds.column_names) and ds[0]["chosen"] == "good 1"
    assert "no preference log" in summarise(tmp_path / "nowhere")
