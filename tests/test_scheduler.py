"""The serving scheduler's decisions, and one rank's executor of them.

Rank 0's `Scheduler` is plain Python around a queue: most tests submit, cancel and feed it
tokens by hand and check each step's `Decision` and the events a request gets. The last ones
run an `Executor` (what every rank runs) on a real tiny model in this process.
"""

from __future__ import annotations

import json
import threading
import time

import mlx.core as mx
import pytest

from mlxnode.config import Config
from mlxnode.generation import Token, encode_text
from mlxnode.loading import ShardedModel, load_sharded
from mlxnode.scheduler import (
    PROBE_PREFIX,
    Decision,
    Delta,
    Executor,
    Failed,
    Finished,
    Job,
    QueueFull,
    Readiness,
    Request,
    Scheduler,
)
from tests.support.tiny_model import make_tiny_model


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


def test_a_request_that_arrives_while_idle_joins_the_next_step_not_after_a_heartbeat():
    s = _scheduler(heartbeat=3600.0)
    s.submit(_request("a", []))
    assert _joined(s.decide(running=0)) == ["a"]  # queued already: no wait at all
    decided: list[Decision] = []
    waiting = threading.Thread(target=lambda: decided.append(s.decide(running=0)))
    waiting.start()  # idle: waits on the queue for up to the (hour-long) heartbeat
    s.submit(_request("b", []))
    waiting.join(timeout=60)
    assert not waiting.is_alive(), "an idle decision waited out its heartbeat"
    assert [_joined(d) for d in decided] == [["b"]]


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


# -- one rank's executor, on a real model


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> ShardedModel:
    model = make_tiny_model(tmp_path_factory.mktemp("executor") / "llama", arch="llama")
    config = Config()
    config.model.path = str(model)
    return load_sharded(config)


def _run(executor: Executor, *jobs: Job) -> dict[str, list[int]]:
    """Run `jobs` (joining together) to their end: each one's token ids."""
    tokens: dict[str, list[int]] = {job.id: [] for job in jobs}
    executor.apply(Decision(join=list(jobs)))
    while executor.running:
        for rid, token in executor.step():
            tokens[rid].append(token.id)
    return tokens


def test_a_prompt_that_shares_a_prefix_with_a_finished_one_prefills_only_the_rest(sharded):
    ids = lambda text: encode_text(sharded.tokenizer, text, chat_template=False)  # noqa: E731
    first = ids("The morning train left the station at dawn")
    second = ids("The morning train left the station in the rain")
    shared = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    assert shared >= 4
    fresh = Executor(sharded, max_tokens=8, max_batch=4, prompt_cache=0)
    expected = _run(fresh, Job("a", first, 8), Job("b", second, 8))

    executor = Executor(sharded, max_tokens=8, max_batch=4)
    assert _run(executor, Job("a", first, 8)) == {"a": expected["a"]}
    assert executor.reused_tokens == 0  # nothing to start from yet
    # Only the tokens after the shared prefix are prefilled, and greedy ids do not change.
    assert _run(executor, Job("b", second, 8)) == {"b": expected["b"]}
    assert executor.reused_tokens == shared
    # The same prompt again: all of it but its last token, whose logits start generation.
    assert _run(executor, Job("c", second, 8)) == {"c": expected["b"]}
    assert executor.reused_tokens == shared + len(second) - 1
    # The probe always runs the model from scratch.
    _run(executor, Job(f"{PROBE_PREFIX}1", second, 1))
    assert executor.reused_tokens == shared + len(second) - 1
    executor.close()
    fresh.close()
