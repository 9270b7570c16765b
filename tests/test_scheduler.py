"""The serving scheduler's decisions, without a process group or a model.

Rank 0's `Scheduler` is plain Python around a queue: these tests submit, cancel and feed it
tokens by hand and check each step's `Decision` and the events a request gets.
"""

from __future__ import annotations

import json
import threading
import time

import mlx.core as mx
import pytest

from mlxnode.generation import Token
from mlxnode.scheduler import (
    PROBE_PREFIX,
    Decision,
    Delta,
    Failed,
    Finished,
    Job,
    QueueFull,
    Readiness,
    Request,
    Scheduler,
)


class CharDetokenizer:
    """mlx-lm's streaming detokenizer interface, for token id i as the character chr(i)."""

    def __init__(self) -> None:
        self._segment = ""

    def add_token(self, token: int) -> None:
        self._segment += chr(token)

    def finalize(self) -> None:
        pass

    @property
    def last_segment(self) -> str:
        segment, self._segment = self._segment, ""
        return segment


class CharTokenizer:
    """Token id i is the character chr(i): decoding is exact and easy to reason about."""

    @property
    def detokenizer(self) -> CharDetokenizer:
        return CharDetokenizer()


def _scheduler(**kwargs) -> Scheduler:
    settings = dict(
        queue_size=2,
        max_batch=2,
        ready_window=10.0,
        ready_deadline=2.0,
        probe_ids=[1],
        tokenizer=CharTokenizer(),
        heartbeat=0.01,
    )
    return Scheduler(**{**settings, **kwargs})


def _request(rid: str, events: list, stop: tuple[str, ...] = ()) -> Request:
    return Request(job=Job(id=rid, ids=[1, 2, 3], max_tokens=8), emit=events.append, stop=stop)


def _token(uid: int, text: str, finish_reason: str | None = None) -> Token:
    return Token(uid, ord(text), mx.array(0.0), finish_reason, time.perf_counter())


def _joined(decision: Decision) -> list[str]:
    return [j.id for j in decision.join if not j.id.startswith(PROBE_PREFIX)]


def test_requests_join_up_to_the_batch_and_the_queue_is_bounded():
    s = _scheduler()
    events: list = []
    for rid in ("a", "b"):
        s.submit(_request(rid, events))
    with pytest.raises(QueueFull):
        s.submit(_request("c", events))
    first = s.decide(running=0)
    assert _joined(first) == ["a", "b"]
    assert first.gather and first.join[-1].id.startswith(PROBE_PREFIX)  # the first probe
    s.submit(_request("c", events))
    # The batch is full: c waits in the queue until a place frees.
    assert _joined(s.decide(running=3)) == []
    assert s.queue_depth == 1
    s.after_step([("a", _token(0, "x", "length"))], running=1, memory=None)
    assert _joined(s.decide(running=1)) == ["c"]


def test_a_cancelled_request_leaves_at_the_next_step_or_never_joins():
    s = _scheduler(queue_size=4)
    events: list = []
    s.submit(_request("a", events))
    s.submit(_request("b", events))
    s.decide(running=0)
    s.submit(_request("c", events))
    s.cancel("a")
    s.cancel("c")  # still queued
    s.cancel("zzz")  # unknown: ignored
    decision = s.decide(running=2)
    assert decision.leave == ["a"] and _joined(decision) == []
    # A cancelled request's late tokens are dropped, not sent.
    s.after_step([("a", _token(0, "x"))], running=1, memory=None)
    assert events == []
    assert s.decide(running=1).leave == []


def test_stop_strings_cut_the_text_and_the_request_leaves_every_rank_next_step():
    s = _scheduler()
    events: list = []
    s.submit(_request("a", events, stop=("lo w",)))
    s.decide(running=0)
    for ch in "hello world":
        s.after_step([("a", _token(0, ch))], running=1, memory=None)
        if any(isinstance(e, Finished) for e in events):
            break
    text = "".join(e.text for e in events if isinstance(e, Delta))
    assert text == "hel"  # held back while "lo w" could still be forming, then cut
    assert events[-1] == Finished("stop", 3, len("hello w"))
    assert s.decide(running=1).leave == ["a"]


def test_end_of_sequence_is_not_text_and_the_model_ends_the_request_itself():
    s = _scheduler()
    events: list = []
    s.submit(_request("a", events))
    s.decide(running=0)
    s.after_step([("a", _token(0, "h"))], running=1, memory=None)
    s.after_step([("a", _token(0, "\x00", "stop"))], running=0, memory=None)
    assert [e.text for e in events if isinstance(e, Delta)] == ["h"]
    assert events[-1] == Finished("stop", 3, 2)
    # The generators dropped it already, on every rank: nothing to tell them.
    assert s.decide(running=0).leave == []


def test_readiness_needs_a_recent_probe_that_made_its_deadline():
    r = Readiness()
    assert r.check(window=10, deadline=2, now=100.0) == (False, "the model is loading")
    r.loaded = True
    assert not r.check(window=10, deadline=2, now=100.0)[0]
    r.done, r.seconds = 100.0, 0.1
    assert r.check(window=10, deadline=2, now=105.0) == (True, "ok")
    assert not r.check(window=10, deadline=2, now=111.0)[0]  # too old
    r.started = 106.0
    assert r.check(window=10, deadline=2, now=107.0)[0]
    ok, why = r.check(window=10, deadline=2, now=108.5)  # the probe hangs
    assert not ok and "more than 2s" in why
    r.started, r.stepping = None, 107.0
    assert r.check(window=10, deadline=2, now=108.0)[0]
    ok, why = r.check(window=10, deadline=2, now=109.5)  # a step hangs: a peer is gone
    assert not ok and "step across the ranks" in why


def test_probe_tokens_make_the_server_ready_and_gather_memory():
    s = _scheduler()
    s.loaded()
    probe = s.decide(running=0).join[-1]
    assert probe.id.startswith(PROBE_PREFIX) and probe.max_tokens == 1
    assert not s.ready()[0]
    seen = []
    s2 = _scheduler(on_memory=seen.append)
    s2.after_step([], running=0, memory=[{"rank": 0}])
    assert seen == [[{"rank": 0}]]
    s.after_step([(probe.id, _token(0, "x", "length"))], running=0, memory=None)
    assert s.ready() == (True, "ok")
    # No second probe until half a window has passed.
    assert not s.decide(running=0).gather


def test_idle_decisions_come_about_once_a_heartbeat_and_a_submit_wakes_them():
    s = _scheduler(heartbeat=1.0)
    s.decide(running=0)  # the probe
    started = time.monotonic()
    threading.Timer(0.2, lambda: s.submit(_request("a", []))).start()
    assert _joined(s.decide(running=0)) == ["a"]
    assert time.monotonic() - started < 0.9


def test_stop_and_failure_reach_every_request():
    s = _scheduler()
    events: list = []
    s.submit(_request("a", events))
    s.decide(running=0)
    s.submit(_request("b", events))
    s.fail("boom")
    assert [type(e) for e in events] == [Failed, Failed]
    assert s.decide(running=0).stop
    assert not s.ready()[0]


def test_a_decision_survives_json_as_it_crosses_the_ranks():
    d = Decision(join=[Job("a", [1, 2], 4, 0.5, 0.9, 7)], leave=["b"], gather=True)
    assert Decision.from_json(json.loads(json.dumps(d.to_json()))) == d
