"""playbooks/serve.yml on the real 3-host testbed (the session's shared `cluster`).

The testbed's hosts have no systemd, so the role runs the server detached
(start-stop-daemon, a pidfile). serve.yml starts it and waits for /ready; the official
`openai` client gets an answer through it, generated over the three hosts (each rank names
its host in /v1/cluster); a second serve.yml changes nothing; health.yml reports /ready;
collect_logs.yml brings back every rank's log. Then, on the same server, rank 1's process
on h2 is SIGKILLed mid-stream: the client's stream errors within seconds, /ready turns 503
and back to 200 on a new group that `mlxnode launch --supervise` started by itself, which
answers the same greedy text as before. Last, stopping twice changes something once and
leaves nothing running. The three tests share one deployment (a module fixture) and run in
file order.
"""

from __future__ import annotations

import json
import shlex
import signal
import threading
import time

import openai
import pytest
from conftest import requires
from test_supervise import _ready_status

from mlxnode.launcher import rank_pattern
from tests.support.cluster import HOSTS, LONG, PROMPT, RUNS_DIR

pytestmark = [pytest.mark.e2e, pytest.mark.slow, requires("root", "iproute2", "sshd", "rsync")]

PORT = 8090
API_KEY = "sk-serveE2eKey0123456789"
SERVE_VARS = {
    # Every interface of h1, so the controller reaches it over the bridge; hence a key.
    "mlxnode_serve_host": "0.0.0.0",
    "mlxnode_serve_port": PORT,
    "mlxnode_serve_api_key": API_KEY,
    "mlxnode_serve_args": ["--max-tokens", "8", "--no-chat-template"],
    "mlxnode_serve_ready_timeout": 90,
}
START = ("-e", json.dumps(SERVE_VARS))
STOP = ("-e", json.dumps({**SERVE_VARS, "state": "stopped"}))
# The server's ranks, as `mlxnode launch` starts them (run id `serve`, the role's default).
RANKS = rank_pattern("serve", "serve")
# A dead rank ends the stream within the ring's own error, well before the step timeout.
CLIENT_ERROR_SECONDS = 15.0
# Back-off (1 s), lock, pre-flight, three new ranks' start-up and load, the first probe.
RECOVERY_SECONDS = 120.0


def _server_logs(cluster) -> str:
    """The launcher's end of the server's logs, for a failure message."""
    files = " ".join(f"{RUNS_DIR}/serve/{f}" for f in ("launcher.stderr.log", "service.log"))
    return cluster.ssh("h1", f"tail -n 30 {files}", check=False).stdout


def _changed(play) -> dict[str, int]:
    recap = play.recap()
    assert set(recap) == set(HOSTS), play.output[-3000:]
    return {host: r["changed"] for host, r in recap.items()}


@pytest.fixture(scope="module")
def served(cluster):
    """serve.yml's server on the testbed for this module's tests; stopped after them."""
    try:
        started = cluster.playbook("serve.yml", *START)
        assert started.rc == 0, started.output[-3000:] + _server_logs(cluster)
        print(f"\nserve.yml: {started.seconds:.1f} s")
        yield started
    finally:
        cluster.playbook("serve.yml", *STOP)


def _client(cluster, **options) -> openai.OpenAI:
    h1 = cluster.bed.host("h1").ip
    options = {"api_key": API_KEY, "max_retries": 0, **options}
    return openai.OpenAI(base_url=f"http://{h1}:{PORT}/v1", **options)


def test_serve_playbook_runs_the_server_as_a_service_over_the_three_hosts(cluster, served):
    assert _changed(served)["h1"] > 0
    client = _client(cluster, timeout=60)
    answer = client.completions.create(model="m", prompt=PROMPT, max_tokens=8)
    assert answer.choices[0].text and answer.usage.completion_tokens > 0
    cluster_info = client.get("/cluster", cast_to=object)
    assert [r["host"] for r in cluster_info["ranks"]] == list(HOSTS)
    with pytest.raises(openai.AuthenticationError):
        _client(cluster, api_key="wrong").models.list()

    again = cluster.playbook("serve.yml", *START).check()
    assert set(_changed(again).values()) == {0}, again.output[-3000:]

    # health.yml knows the port as serve.yml does: from the inventory, or here -e.
    health = cluster.playbook("health.yml", "-e", f"mlxnode_serve_port={PORT}").check()
    assert f"server http://127.0.0.1:{PORT}: ready" in health.output

    cluster.playbook("collect_logs.yml", "-e", "run_id=serve").check()
    for rank, host in enumerate(HOSTS):
        log = cluster.logs / "serve" / host / f"serve.rank{rank}.log"
        assert log.exists() and log.stat().st_size > 0, log
        assert API_KEY not in log.read_text()


def test_a_rank_killed_mid_stream_errors_the_client_and_the_group_comes_back(cluster, served):
    client = _client(cluster, timeout=60)
    url = f"http://{cluster.bed.host('h1').ip}:{PORT}"
    before = client.completions.create(model="m", prompt=PROMPT, max_tokens=8, temperature=0)
    streaming = threading.Event()
    outcome: dict[str, object] = {}

    def ask() -> None:
        try:
            stream = client.completions.create(
                model="m", prompt=PROMPT, max_tokens=LONG, temperature=0, stream=True
            )
            for _ in stream:
                streaming.set()
            outcome["finished"] = True
        except Exception as e:  # noqa: BLE001 - an API error, or the connection's
            outcome["error"] = e

    asking = threading.Thread(target=ask, daemon=True)
    asking.start()
    assert streaming.wait(60), "no token came"
    killed = cluster.bed.kill_host_processes("h2", RANKS, sig=signal.SIGKILL)
    killed_at = time.monotonic()
    assert killed, "rank 1 was not running on h2"
    asking.join(CLIENT_ERROR_SECONDS)
    error_after = time.monotonic() - killed_at
    assert not asking.is_alive(), f"the stream hangs {CLIENT_ERROR_SECONDS:.0f}s after the kill"
    assert isinstance(outcome.get("error"), openai.APIError), outcome

    # Down (503, or nothing listening while the groups change), then ready on a new group.
    seen: list[int | None] = []  # what /ready said until it said 200 again
    while time.monotonic() - killed_at < RECOVERY_SECONDS:
        status = _ready_status(url)
        if status != 200:
            seen.append(status)
        elif seen:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"not ready {RECOVERY_SECONDS:.0f}s after the kill:\n{_server_logs(cluster)}")
    ready_after = time.monotonic() - killed_at
    print(
        f"\nclient error {error_after:.1f} s after the kill ({outcome['error']!r}); "
        f"/ready {sorted(set(seen), key=str)} then 200 again {ready_after:.1f} s after it"
    )
    assert 503 in seen, seen
    rank1 = {int(pid) for pid in cluster.ssh("h2", f"pgrep -f {shlex.quote(RANKS)}").stdout.split()}
    assert rank1 and not rank1 & set(killed), (rank1, killed)
    restarts = cluster.out(
        "h1", f"grep -c 'restarting the whole group' {RUNS_DIR}/serve/service.log"
    )
    assert int(restarts) == 1, _server_logs(cluster)

    after = client.completions.create(model="m", prompt=PROMPT, max_tokens=8, temperature=0)
    assert after.choices[0].text == before.choices[0].text
    assert after.usage.completion_tokens == before.usage.completion_tokens > 0


def test_stopping_the_server_twice_changes_something_once(cluster, served):
    stopped = cluster.playbook("serve.yml", *STOP).check()
    assert _changed(stopped)["h1"] > 0
    assert set(_changed(cluster.playbook("serve.yml", *STOP).check()).values()) == {0}
    with pytest.raises(openai.APIConnectionError):
        _client(cluster, timeout=60).models.list()
    assert cluster.leftovers() == {}
