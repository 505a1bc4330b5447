"""The endpoint judge (judge.kind: openai) against a small stand-in HTTP server on loopback.

The stand-in answers like an OpenAI-compatible chat endpoint; it prefers the response that holds
"good", can refuse or fail on demand, and counts what it was asked. The end-to-end test against this
project's own `online-dpo serve` is tests/e2e/test_cli_judges.py.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from online_dpo.config import ConfigError, load_config
from online_dpo.errors import JudgeFailed
from online_dpo.judges import build_judge
from online_dpo.specs import Endpoint, JudgeSpec
from online_dpo.types import Completion, SampleGroup


class Stand:
    def __init__(self):
        self.bodies, self.fail = [], []   # fail: statuses to answer with first, one per request

    def answer(self, body: dict) -> tuple[int, dict]:
        if self.fail:
            status = self.fail.pop(0)
            return status, {"error": {"message": "structured_outputs is not supported" if status == 400 else "busy"}}
        text = body["messages"][0]["content"]
        if "Rating:" in text:
            good = "good" in text.split("<response>\n")[-1]
            top = [{"token": "9", "logprob": -0.1}, {"token": "8", "logprob": -2.4}] if good else \
                [{"token": "2", "logprob": -0.1}, {"token": "3", "logprob": -2.4}]
            content = top[0]["token"]
        else:
            a, b = re.findall(r"<response>\n(.*?)\n</response>", text, re.S)
            content, top = ("A" if "good" in a else "B" if "good" in b else "A"), []
        choice = {"message": {"role": "assistant", "content": content},
                  "logprobs": {"content": [{"token": content, "logprob": -0.1, "top_logprobs": top}]}}
        return 200, {"choices": [choice], "usage": {"prompt_tokens": 50, "completion_tokens": 1}}


@pytest.fixture
def stand():
    state = Stand()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state.bodies.append(body)
            status, out = state.answer(body)
            data = json.dumps(out).encode()
            self.send_response(status)
            if status == 429:
                self.send_header("Retry-After", "0")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield state
    server.shutdown()
    server.server_close()


def judge(url: str, mode: str = "pairwise", retries: int = 2, logprobs: bool = False, constrained: bool = True):
    return build_judge(JudgeSpec(kind="openai", model="judge-model", constrained=constrained,
                                 endpoint=Endpoint(url, mode=mode, retries=retries, timeout=5, logprobs=logprobs)))


def group(*texts: str) -> SampleGroup:
    return SampleGroup("Review a kettle.", (1,), tuple(Completion((i,), t, "stop", 3) for i, t in enumerate(texts)))


def test_pairwise_asks_both_orders_caches_and_counts(stand):
    j = judge(stand.url)
    labels = j.label([group("a good kettle", "a bad kettle"), group("meh", "meh!")], margin=0.0)
    assert len(labels.pairs) == 1 and labels.pairs[0].chosen.text == "a good kettle"
    assert labels.pairs[0].details == {"order_agreement": 1.0}
    assert [why for why, _ in labels.dropped] == ["tie"]   # "meh": both orders say A, so they disagree
    assert labels.dropped[0][1].details == {"order_agreement": 0.0}
    assert labels.usage["requests"] == 4 and labels.usage["prompt_tokens"] == 200
    body = stand.bodies[0]
    assert body["model"] == "judge-model" and body["structured_outputs"] == {"choice": ["A", "B"]}
    assert j.compare(["Review a kettle."], ["a good kettle"], ["a bad kettle"]) == [1.0]   # asked before
    assert j.usage()["requests"] == 4 and j.usage()["cache_hits"] == 2 and len(stand.bodies) == 4


def test_score_mode_rates_from_log_probs(stand):
    j = judge(stand.url, mode="score", logprobs=True, constrained=False)
    good, bad = j.score(["p", "p"], ["good", "poor"])
    assert 8.8 < good < 9.0 and 2.0 < bad < 2.2
    assert "structured_outputs" not in stand.bodies[0] and stand.bodies[0]["top_logprobs"] == 20
    assert j.compare(["p"], ["good"], ["poor"]) == [1.0] and j.usage()["cache_hits"] == 2


def test_it_retries_busy_and_failing_endpoints(stand):
    stand.fail = [429, 503]
    j = judge(stand.url, retries=2)
    assert j.compare(["p"], ["good"], ["bad"]) == [1.0]
    assert j.usage()["retries"] == 2 and j.usage()["requests"] == 2


def test_a_dead_endpoint_is_a_clear_error_not_a_hang():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]   # closed once the block ends: nothing listens there
    j = judge(f"http://127.0.0.1:{port}/v1", retries=1)
    with pytest.raises(JudgeFailed, match=r"did not answer after 2 tries .*judge.timeout / judge.retries"):
        j.compare(["p"], ["a"], ["b"])


def test_a_refused_request_names_the_fix(stand):
    stand.fail = [400]
    with pytest.raises(JudgeFailed, match="set judge.constrained: false"):
        judge(stand.url).compare(["p"], ["a"], ["b"])


def test_the_config_needs_an_endpoint_and_a_model():
    base = ["judge.kind=openai", "judge.function=null"]
    with pytest.raises(ConfigError, match="needs base_url"):
        load_config(None, base + ["judge.model=m"])
    with pytest.raises(ConfigError, match="needs judge.model"):
        load_config(None, base + ["judge.base_url=http://127.0.0.1:8000/v1"])
    with pytest.raises(ConfigError, match="base_url"):
        load_config(None, base + ["judge.model=m", "judge.base_url=127.0.0.1:8000"])
    cfg = load_config(None, base + ["judge.model=m", "judge.base_url=http://127.0.0.1:8000/v1", "judge.mode=score"])
    assert cfg.judge.mode == "score"
