"""Start-up pieces: the paused garbage collector, Ray's settings, actor environments, the learner's loop."""

import gc
import os
import subprocess
import sys
import threading

import pytest

from online_dpo.gc_pause import paused_gc


@pytest.fixture
def collector_on():
    was = gc.isenabled()
    gc.enable()
    yield
    (gc.enable if was else gc.disable)()


def test_the_collector_is_off_in_the_block_and_back_on_with_everything_frozen(collector_on):
    frozen = gc.get_freeze_count()
    with paused_gc():
        assert not gc.isenabled()
        made = [[i] for i in range(1000)]
    assert gc.isenabled() and gc.get_freeze_count() > frozen + 1000
    assert gc.is_tracked(made[0]) and made[0][0] == 0


def test_nested_and_overlapping_blocks_turn_it_back_on_only_after_the_last(collector_on):
    inside, leave = threading.Event(), threading.Event()

    def other():
        with paused_gc():
            inside.set()
            leave.wait(10)

    thread = threading.Thread(target=other)
    with paused_gc():
        with paused_gc():
            thread.start()
            assert inside.wait(10)
            made = [[i] for i in range(1000)]
            frozen = gc.get_freeze_count()
        assert not gc.isenabled()
        assert gc.get_freeze_count() >= frozen + 1000 and made   # an inner block's end freezes too
    assert not gc.isenabled()   # the other thread's block is still open
    leave.set()
    thread.join(10)
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off():
    was = gc.isenabled()
    gc.disable()
    try:
        with paused_gc():
            pass
        assert not gc.isenabled()
    finally:
        (gc.enable if was else gc.disable)()


def test_an_error_in_the_block_still_turns_the_collector_back_on(collector_on):
    with pytest.raises(ValueError):
        with paused_gc():
            raise ValueError("import failed")
    assert gc.isenabled()


def test_a_local_cluster_retries_its_object_store_socket_every_50_ms_for_the_same_10_s():
    from online_dpo.cluster import system_config

    config = system_config()
    assert config["raylet_client_connect_timeout_milliseconds"] * config["raylet_client_num_connect_attempts"] == 10_000
    assert "metrics_report_interval_ms" not in config
    assert system_config(2000)["metrics_report_interval_ms"] == 2000


def test_an_actor_applies_its_engine_environment_itself(monkeypatch):
    """Samplers and judges get engine_env as an argument (no runtime_env: they can take the workers Ray
    prestarts); with torch already imported, its thread count is set too."""
    import torch

    from online_dpo.engine import engine_env, use_env

    env = engine_env(1, False, "quiet")
    for key in env:
        monkeypatch.delenv(key, raising=False)
    threads = torch.get_num_threads()
    try:
        use_env(env)
        assert all(os.environ[k] == v for k, v in env.items())
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    use_env(None)   # nothing to apply


def test_the_driver_pickles_a_learner_loop_that_imports_no_torch_until_it_runs():
    """gang.learner_loop is what Ray Train ships to the workers: importing its module needs no torch (the
    worker imports torch and worker.py inside it, with the collector paused)."""
    code = ("import sys\nfrom online_dpo.gang import learner_loop\n"
            "from ray import cloudpickle\nblob = cloudpickle.dumps(learner_loop)\n"
            "assert b'online_dpo.gang' in blob and 'torch' not in sys.modules, sorted(sys.modules)[:5]\n"
            "print('LOOP-OK')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "LOOP-OK" in proc.stdout, proc.stderr[-2000:]
