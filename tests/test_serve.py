"""`mlxnode serve` as clients see it: real server processes, the official `openai` client.

Three servers per module, each started once: one process on a tiny model with a short context
(`server`), one process with a batch of one, a queue of one and an API key (`narrow`), and two
ranks through `mlxnode launch -- serve`, so under real `mlx.launch --backend ring` (`pair`).
Greedy answers are checked against `mlxnode run` on the same model, token for token. One slow
test serves the real SmolLM2 4-bit checkpoint.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from test_engine import _free_ports

from mlxnode.api import ApiSettings, create_app
from mlxnode.commands.launch import split_verb
from mlxnode.config import Config, ServeConfig
from mlxnode.errors import UsageError
from mlxnode.prompts import Prompt
from mlxnode.scheduler import Failed
from mlxnode.serve_metrics import ServeMetrics
from mlxnode.server import HttpThread, bind
from tests.support.tiny_model import make_tiny_model

PROMPT = "The morning train left the station"
MAX_TOKENS = 8
CONTEXT = 256  # the `server` model's context, for the 413 test
API_KEY = "sk-mlxnodeTestKey0123456789"
READY_TIMEOUT = 90.0


@dataclass(frozen=True)
class Reply:
    """An HTTP answer, read whole."""

    status_code: int
    headers: dict[str, str]
    text: str

    def json(self) -> dict:
        return json.loads(self.text)


@dataclass
class Server:
    """A running `mlxnode serve` job (one process, or mlx.launch and its ranks)."""

    proc: subprocess.Popen
    url: str
    log: Path
    model: Path

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def get(self, path: str) -> Reply:
        return self.request("GET", path)

    def post(self, path: str, body: object, headers: dict | None = None) -> Reply:
        data = body if isinstance(body, bytes) else json.dumps(body)
        return self.request("POST", path, data, headers)

    def request(
        self, method: str, path: str, body: bytes | str | None = None, headers: dict | None = None
    ) -> Reply:
        host, port = self.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            headers = {"content-type": "application/json", **(headers or {})}
            conn.request(method, path, body=body, headers=headers)
            r = conn.getresponse()
            return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode())
        finally:
            conn.close()

    def metric(self, name: str) -> float:
        for line in self.get("/metrics").text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{name} not in /metrics")


@contextlib.contextmanager
def serving(
    model: Path, *args: str, launch: list[str] | None = None, env: dict | None = None, cwd: Path
) -> Iterator[Server]:
    """`mlxnode serve` on `model` until the block ends; waits for /ready first.

    `launch`: the command that starts it on every rank, up to and including "--" (None: one
    process, no launcher).
    """
    port = _free_ports(1)
    serve = ["serve", "--no-config", "--model-path", str(model), "--port", str(port), *args]
    serve = [*launch, *serve] if launch else [sys.executable, "-m", "mlxnode", *serve]
    log = cwd / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            serve,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env if env is not None else os.environ,
            start_new_session=True,
        )
    server = Server(proc, f"http://127.0.0.1:{port}", log, model)
    try:
        _wait_ready(server)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_ready(server: Server) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            pytest.fail(f"serve exited {server.proc.returncode}:\n{server.log.read_text()}")
        with contextlib.suppress(OSError):
            if server.get("/ready").status_code == 200:
                return
        time.sleep(0.2)
    pytest.fail(f"serve not ready in {READY_TIMEOUT}s:\n{server.log.read_text()}")


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serve-model")
    return make_tiny_model(
        root / "model", arch="llama", num_layers=4, num_shards=2, max_position_embeddings=CONTEXT
    )


@pytest.fixture(scope="module")
def server(small_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    cwd = tmp_path_factory.mktemp("serve")
    args = ["--max-tokens", str(MAX_TOKENS), "--max-batch", "4", "--max-body-bytes", "65536"]
    with serving(small_model, *args, cwd=cwd) as s:
        yield s


@pytest.fixture(scope="module")
def narrow(local_cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    cwd = tmp_path_factory.mktemp("serve-narrow")
    args = ["--max-batch", "1", "--queue-size", "1", "--no-chat-template"]
    env = {**os.environ, "MLXNODE_SERVE_API_KEY": API_KEY}
    with serving(local_cluster.model, *args, env=env, cwd=cwd) as s:
        yield s


PAIR_RUN_ID = f"serve-pair-{os.getpid()}"
# Longer than a slow step on 2 busy cores, shorter than the tests' idle wait.
PAIR_STEP_TIMEOUT = 8
# Longer than a probe on 2 busy cores; a hung rank must show before the step timeout ends rank 0.
PAIR_READY_DEADLINE = 3


@pytest.fixture(scope="module")
def pair(local_cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Two ranks through `mlxnode launch -- serve` (its lock and pre-flight, then real
    `mlx.launch --backend ring`)."""
    cwd = tmp_path_factory.mktemp("serve-pair")
    args = ["--max-tokens", str(MAX_TOKENS), "--ready-window", "4"]
    args += ["--ready-deadline", str(PAIR_READY_DEADLINE), "--step-timeout", str(PAIR_STEP_TIMEOUT)]
    launch = [
        str(local_cluster.venv_bin / "mlxnode"), "launch",
        "--hostfile", str(local_cluster.hostfile), "--starting-port", str(_free_ports(2)),
        "--run-id", PAIR_RUN_ID, "--",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX")}
    env["HOME"] = str(cwd / "home")  # and so the cluster lock
    with serving(local_cluster.model, *args, launch=launch, env=env, cwd=cwd) as s:
        yield s


def _rank_pid(run_id: str, rank: int) -> int:
    """The pid of `rank` of the `mlxnode serve` ranks of `run_id` on this machine."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ours = b"serve" in cmdline and run_id.encode() in cmdline and b"mlxnode" in cmdline
        if ours and f"MLX_RANK={rank}".encode() in environ:
            return int(proc.name)
    raise AssertionError(f"no rank {rank} of {run_id}")


def _run_greedy(model: Path, prompt: str, monkeypatch, *, chat_template: bool = True) -> dict:
    """`mlxnode run`'s record of `prompt` (its `engine.run`, in this process, to save a
    process start): text, token ids and counts."""
    from mlxnode import engine, logs

    # run() tells logging its rank; undo that for the tests that follow.
    monkeypatch.setattr(logs, "_rank", None)
    monkeypatch.setattr(logs, "_world_size", None)
    config = Config()
    config.model.path = str(model)
    config.generation.max_tokens = MAX_TOKENS
    config.generation.use_chat_template = chat_template
    result = engine.run(config, [Prompt(1, prompt)])
    return result.completions[0].as_record()


def _chat(client: openai.OpenAI, text: str, **kwargs):
    return client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": text}], **kwargs
    )


# -- one process


def test_greedy_answers_equal_mlxnode_run_token_for_token(server, monkeypatch):
    client = server.client()
    ran = _run_greedy(server.model, PROMPT, monkeypatch)
    chat = _chat(client, PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    assert chat.choices[0].message.content == ran["completion"]
    assert chat.usage.completion_tokens == ran["generation_tokens"]
    assert chat.usage.prompt_tokens == ran["prompt_tokens"]
    assert chat.usage.total_tokens == ran["prompt_tokens"] + ran["generation_tokens"]

    plain = _run_greedy(server.model, PROMPT, monkeypatch, chat_template=False)
    done = client.completions.create(model="m", prompt=PROMPT, max_tokens=MAX_TOKENS)
    assert done.choices[0].text == plain["completion"]
    assert done.choices[0].finish_reason == plain["finish_reason"]
    assert done.usage.prompt_tokens == plain["prompt_tokens"]


def test_streaming_gives_the_same_text_and_ends_with_done(server):
    client = server.client()
    whole = _chat(client, PROMPT, max_tokens=MAX_TOKENS).choices[0].message.content
    chunks = list(
        _chat(
            client,
            PROMPT,
            max_tokens=MAX_TOKENS,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS
    r = server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 3, "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [line for line in r.text.splitlines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)


def test_seed_repeats_a_sampled_answer_and_stop_cuts_it(server):
    client = server.client()
    sampled = [
        client.completions.create(
            model="m", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=1.0, top_p=0.9, seed=s
        )
        .choices[0]
        .text
        for s in (5, 5, 6)
    ]
    assert sampled[0] == sampled[1] != sampled[2]

    greedy = client.completions.create(model="m", prompt=PROMPT, max_tokens=MAX_TOKENS)
    text = greedy.choices[0].text
    stop = text[3:5]
    cut = client.completions.create(model="m", prompt=PROMPT, max_tokens=MAX_TOKENS, stop=[stop])
    assert cut.choices[0].text == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_requests_that_arrive_during_a_generation_join_it(server):
    """A long answer streams; shorter requests that come meanwhile finish before it does."""
    client = server.client()
    solo = {
        p: client.completions.create(model="m", prompt=p, max_tokens=4).choices[0].text
        for p in ("Soup", "Why is the sea salty?")
    }
    stream = client.completions.create(
        model="m", prompt=PROMPT, max_tokens=CONTEXT - 20, stream=True
    )
    first = next(iter(stream))
    assert first.choices[0].text is not None
    answers: dict[str, str] = {}

    def ask(p: str) -> None:
        answers[p] = client.completions.create(model="m", prompt=p, max_tokens=4).choices[0].text

    threads = [threading.Thread(target=ask, args=(p,)) for p in solo]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    finished_first = [c.choices[0].finish_reason for c in stream]
    assert finished_first[-1] == "length"  # the long one ran to its end, after the others
    assert answers == solo


def test_bad_requests_name_the_field_in_openais_error_shape(server):
    client = server.client()
    cases = [
        ({"n": 2}, "n"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"seed": -1}, "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": 7}]}, "messages[0].content"),
    ]
    for extra, param in cases:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}
        r = server.post("/v1/chat/completions", body)
        assert r.status_code == 400, (extra, r.text)
        error = r.json()["error"]
        assert error["param"] == param and param in error["message"]
        assert error["type"] == "invalid_request_error"
        assert r.headers["x-request-id"]
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, "hi", n=3)
    assert e.value.param == "n"
    r = server.post("/v1/completions", b"{not json")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = server.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    assert r.headers["x-request-id"].startswith("req-")


def test_too_long_prompts_and_bodies_are_413(server):
    with pytest.raises(openai.APIStatusError) as e:
        server.client().completions.create(model="m", prompt="word " * CONTEXT, max_tokens=4)
    assert e.value.status_code == 413
    assert e.value.code == "context_length_exceeded"
    r = server.post("/v1/completions", {"prompt": "x" * 70000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_health_ready_models_and_metrics(server):
    assert server.get("/health").json() == {"status": "ok"}
    assert server.get("/ready").status_code == 200
    models = server.client().models.list()
    assert [m.id for m in models.data] == [str(server.model)]
    text = server.get("/metrics").text
    for name in (
        'mlxnode_requests_total{endpoint="/v1/chat/completions",status="200"}',
        'mlxnode_requests_total{endpoint="/v1/chat/completions",status="400"}',
        "mlxnode_prompt_tokens_total",
        "mlxnode_prompt_tokens_cached_total",
        "mlxnode_generated_tokens_total",
        "mlxnode_time_to_first_token_seconds_bucket",
        "mlxnode_inter_token_latency_seconds_bucket",
        "mlxnode_queue_depth",
        "mlxnode_running_requests",
        "mlxnode_peak_memory_bytes{host=",
        "mlxnode_ready 1.0",
    ):
        assert name in text, name
    assert server.metric("mlxnode_generated_tokens_total") > 0
    # The same prompt twice: the second starts from the first's KV cache.
    cached = server.metric("mlxnode_prompt_tokens_cached_total")
    for _ in range(2):
        server.client().completions.create(model="m", prompt=PROMPT, max_tokens=2)
    assert server.metric("mlxnode_prompt_tokens_cached_total") > cached


# -- a batch of one, a queue of one, an API key


def test_the_api_key_is_required_compared_and_never_logged(narrow):
    with pytest.raises(openai.AuthenticationError):
        narrow.client().models.list()
    with pytest.raises(openai.AuthenticationError):
        narrow.client(API_KEY + "x").models.list()
    assert narrow.client(API_KEY).models.list().data
    assert narrow.get("/health").status_code == 200  # probes need no key
    assert narrow.get("/ready").status_code == 200
    assert API_KEY not in narrow.log.read_text()
    shown = subprocess.run(
        [sys.executable, "-m", "mlxnode", "config", "show", "--no-config"],
        capture_output=True,
        text=True,
        env={**os.environ, "MLXNODE_SERVE_API_KEY": API_KEY},
        timeout=60,
    )
    assert API_KEY not in shown.stdout and '"***"' in shown.stdout


def test_a_full_queue_is_429_and_a_client_that_leaves_frees_its_place(narrow):
    client = narrow.client(API_KEY)
    # The only place in the batch: a long answer, streamed.
    stream = client.completions.create(model="m", prompt=PROMPT, max_tokens=20000, stream=True)
    next(iter(stream))
    answers: list = []
    waiting = threading.Thread(
        target=lambda: answers.append(
            client.completions.create(model="m", prompt="Soup", max_tokens=2)
        )
    )
    waiting.start()
    deadline = time.monotonic() + 20
    while narrow.metric("mlxnode_queue_depth") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model="m", prompt="Hi", max_tokens=2)
    assert e.value.response.headers["retry-after"] == "1"
    assert e.value.body["code"] == "queue_full"
    stream.close()  # the client goes away mid-stream
    left = time.monotonic()
    waiting.join(timeout=30)
    assert answers and answers[0].choices[0].finish_reason == "length"
    assert time.monotonic() - left < 10  # far less than 20000 tokens
    assert 'status="429"' in narrow.get("/metrics").text

    # The same for a client that gives up waiting for a whole (non-streamed) answer.
    host, port = narrow.url.removeprefix("http://").split(":")
    gone = http.client.HTTPConnection(host, int(port), timeout=1)
    body = json.dumps({"prompt": PROMPT, "max_tokens": 20000})
    gone.request(
        "POST", "/v1/completions", body=body, headers={"authorization": f"Bearer {API_KEY}"}
    )
    with pytest.raises(TimeoutError):
        gone.getresponse()
    gone.close()
    left = time.monotonic()
    done = client.completions.create(model="m", prompt="Soup", max_tokens=2)
    assert done.choices[0].finish_reason == "length"
    assert time.monotonic() - left < 10
    assert 'status="499"' in narrow.get("/metrics").text  # nginx's "client closed request"


# -- two ranks under mlx.launch


def test_two_ranks_answer_as_mlxnode_run(pair, monkeypatch):
    client = pair.client()
    ran = _run_greedy(pair.model, PROMPT, monkeypatch)
    chat = _chat(client, PROMPT, max_tokens=MAX_TOKENS)
    assert chat.choices[0].message.content == ran["completion"]
    streamed = _chat(client, PROMPT, max_tokens=MAX_TOKENS, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == ran["completion"]
    # Several at once: the ranks run them as one batch and agree about it.
    prompts = ["Soup", "Why is the sea salty?", "The library was quiet"]
    solo = {p: client.completions.create(model="m", prompt=p).choices[0].text for p in prompts}
    answers: dict[str, str] = {}

    def ask(p: str) -> None:
        answers[p] = client.completions.create(model="m", prompt=p).choices[0].text

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert answers == solo
    text = pair.get("/metrics").text
    assert 'rank="0"' in text and 'rank="1"' in text


def test_two_ranks_sample_seeded_requests_in_one_batch_with_greedy_ones(pair):
    """Only rank 0 draws (`pipeline.TokenSharing`): requests that sample differently share
    a step, each with its own sampler, and every rank feeds rank 0's tokens on."""
    client = pair.client()

    def ask(seed: int | None) -> str:
        sampling = {"temperature": 1.0, "top_p": 0.9, "seed": seed} if seed else {}
        answer = client.completions.create(
            model="m", prompt=PROMPT, max_tokens=MAX_TOKENS, **sampling
        )
        return answer.choices[0].text

    seeds = (None, 5, 6)
    solo = {seed: ask(seed) for seed in seeds}
    assert len(set(solo.values())) == 3  # two draws and the greedy answer
    together: dict[int | None, str] = {}
    threads = [
        threading.Thread(target=lambda s=seed: together.__setitem__(s, ask(s))) for seed in seeds
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert together == solo


def test_idle_ranks_outlast_the_step_timeout_but_a_hung_one_turns_ready_to_503(pair):
    """The last test of `pair`: it stops rank 1 (SIGSTOP) for good."""
    # Idle for longer than the step timeout: the heartbeat decisions keep every rank alive.
    time.sleep(PAIR_STEP_TIMEOUT + 1)
    assert pair.proc.poll() is None
    assert pair.get("/ready").status_code == 200
    rank1 = _rank_pid(PAIR_RUN_ID, 1)
    os.kill(rank1, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        while pair.get("/ready").status_code == 200:
            # A heartbeat (1 s), the ready deadline, and a little for a slow machine.
            assert time.monotonic() - stopped < 1 + PAIR_READY_DEADLINE + 2, "/ready stayed 200"
            time.sleep(0.2)
        body = pair.get("/ready").json()
        assert body["status"] == "not ready"
        # Whichever comes first: the step stuck past the deadline, or no recent probe.
        assert "step across the ranks" in body["reason"] or "probe" in body["reason"]
        assert pair.get("/health").status_code == 200  # alive, not ready
    finally:
        os.kill(rank1, signal.SIGKILL)


# -- the real checkpoint


@pytest.mark.slow
def test_real_checkpoint_greedy_chat_equals_mlxnode_run(tmp_path, monkeypatch):
    from tests.support.real_model import real_model

    model = real_model("q4")
    prompt = "What is the capital of France?"
    ran = _run_greedy(model, prompt, monkeypatch)
    with serving(model, "--max-tokens", str(MAX_TOKENS), cwd=tmp_path) as s:
        chat = _chat(s.client(), prompt, max_tokens=MAX_TOKENS)
    assert chat.choices[0].message.content == ran["completion"]
    assert chat.usage.completion_tokens == ran["generation_tokens"]


# -- the API and the bind without a model


class _FailingGateway:
    """A scheduler whose generation always fails, as when a rank dies mid-request."""

    queue_depth = 0

    def submit(self, work) -> None:
        work.emit(Failed("DistributedSetupError: rank 1 lost a peer"))

    def cancel(self, request_id: str) -> None:
        pass

    def ready(self) -> tuple[bool, str]:
        return False, "the model is loading"


class _WordTokenizer:
    bos_token = None
    has_chat_template = False

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [len(w) for w in text.split()]


@pytest.fixture(scope="module")
def failing() -> Iterator[Server]:
    settings = ApiSettings(model_id="m", context_length=None, max_tokens=4, max_body_bytes=1000)
    app = create_app(_FailingGateway(), _WordTokenizer(), settings, ServeMetrics())
    sock = bind(ServeConfig(port=_free_ports(1)))
    http = HttpThread(app, sock)
    http.start()
    port = sock.getsockname()[1]
    yield Server(None, f"http://127.0.0.1:{port}", Path("/dev/null"), Path("m"))  # type: ignore[arg-type]
    http.stop()


def test_a_failed_generation_is_500_naming_the_request(failing):
    r = failing.post("/v1/completions", {"prompt": "a b c"})
    assert r.status_code == 500
    error = r.json()["error"]
    assert error["type"] == "server_error" and r.headers["x-request-id"] in error["message"]
    mine = failing.post("/v1/completions", {"prompt": "a"}, headers={"x-request-id": "job-7.a"})
    assert "job-7.a" in mine.json()["error"]["message"]
    odd = failing.post("/v1/completions", {"prompt": "a"}, headers={"x-request-id": "a b%"})
    assert odd.headers["x-request-id"].startswith("req-")  # not plain: replaced
    r = failing.post("/v1/completions", {"prompt": "a b c", "stream": True})
    events = [line for line in r.text.splitlines() if line]
    assert '"server_error"' in events[-2] and events[-1] == "data: [DONE]"
    assert failing.get("/ready").status_code == 503
    assert failing.get("/ready").json()["reason"] == "the model is loading"


def test_bind_refuses_a_taken_port_and_warns_about_an_open_one_without_a_key(caplog):
    taken = bind(ServeConfig(port=_free_ports(1)))
    try:
        with pytest.raises(UsageError, match=r"cannot serve on 127\.0\.0\.1:\d+ .*--port"):
            bind(ServeConfig(port=taken.getsockname()[1]))
    finally:
        taken.close()
    with caplog.at_level(logging.WARNING, logger="mlxnode.server"):
        bind(ServeConfig(host="0.0.0.0", port=_free_ports(1))).close()
        bind(ServeConfig(host="0.0.0.0", port=_free_ports(1), api_key=API_KEY)).close()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "without an API key" in warnings[0]


def test_launch_passes_serve_and_its_arguments_to_every_rank():
    assert split_verb(["--", "serve", "--port", "9000"]) == ("serve", ["--port", "9000"])
    assert split_verb(["--", "--max-tokens", "4", "serve"]) == (
        "run",
        ["--", "--max-tokens", "4", "serve"],
    )
