"""The sampler's engine lock is taken in turn: a thread stepping the engine in a loop lets a waiting
generate or weight update in between two steps (no Ray, no vLLM)."""

import threading
import time

from online_dpo.sampler import TurnLock


def test_a_waiting_thread_gets_the_lock_at_the_next_turn_of_a_looping_one():
    lock, turns, stop = TurnLock(), [], threading.Event()

    def loop():
        while not stop.is_set():
            with lock:
                turns.append("loop")
                time.sleep(0.002)

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        for _ in range(5):
            time.sleep(0.01)
            asked = len(turns)
            with lock:
                assert len(turns) - asked <= 1   # at most the turn that was running when it asked
                turns.append("other")
    finally:
        stop.set()
        thread.join(timeout=5)
    assert turns.count("other") == 5 and not thread.is_alive()
