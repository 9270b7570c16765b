"""playbooks/serve.yml on the real 3-host testbed (the session's shared `cluster`).

The testbed's hosts have no systemd, so the role runs the server detached
(start-stop-daemon, a pidfile). serve.yml starts it and waits for /ready; the official
`openai` client gets an answer through it, generated over the three hosts (each rank names
its host in /v1/cluster); a second serve.yml changes nothing; health.yml reports /ready;
collect_logs.yml brings back every rank's log; stopping twice changes something once.
"""

from __future__ import annotations

import json

import openai
import pytest
from conftest import requires

from tests.support.cluster import HOSTS, PROMPT, RUNS_DIR

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


def _server_logs(cluster) -> str:
    """The launcher's end of the server's logs, for a failure message."""
    files = " ".join(f"{RUNS_DIR}/serve/{f}" for f in ("launcher.stderr.log", "service.log"))
    return cluster.ssh("h1", f"tail -n 30 {files}", check=False).stdout


def _changed(play) -> dict[str, int]:
    recap = play.recap()
    assert set(recap) == set(HOSTS), play.output[-3000:]
    return {host: r["changed"] for host, r in recap.items()}


def test_serve_playbook_runs_the_server_as_a_service_over_the_three_hosts(cluster):
    extra = ("-e", json.dumps(SERVE_VARS))
    stop = ("-e", json.dumps({**SERVE_VARS, "state": "stopped"}))
    try:
        started = cluster.playbook("serve.yml", *extra)
        assert started.rc == 0, started.output[-3000:] + _server_logs(cluster)
        print(f"\nserve.yml: {started.seconds:.1f} s")
        assert _changed(started)["h1"] > 0
        h1 = cluster.bed.host("h1").ip
        client = openai.OpenAI(
            base_url=f"http://{h1}:{PORT}/v1", api_key=API_KEY, max_retries=0, timeout=60
        )
        answer = client.completions.create(model="m", prompt=PROMPT, max_tokens=8)
        assert answer.choices[0].text and answer.usage.completion_tokens > 0
        cluster_info = client.get("/cluster", cast_to=object)
        assert [r["host"] for r in cluster_info["ranks"]] == list(HOSTS)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://{h1}:{PORT}/v1", api_key="wrong").models.list()

        again = cluster.playbook("serve.yml", *extra).check()
        assert set(_changed(again).values()) == {0}, again.output[-3000:]

        # health.yml knows the port as serve.yml does: from the inventory, or here -e.
        health = cluster.playbook("health.yml", "-e", f"mlxnode_serve_port={PORT}").check()
        assert f"server http://127.0.0.1:{PORT}: ready" in health.output

        cluster.playbook("collect_logs.yml", "-e", "run_id=serve").check()
        for rank, host in enumerate(HOSTS):
            log = cluster.logs / "serve" / host / f"serve.rank{rank}.log"
            assert log.exists() and log.stat().st_size > 0, log
            assert API_KEY not in log.read_text()

        stopped = cluster.playbook("serve.yml", *stop).check()
        assert _changed(stopped)["h1"] > 0
        assert set(_changed(cluster.playbook("serve.yml", *stop).check()).values()) == {0}
        with pytest.raises(openai.APIConnectionError):
            client.models.list()
        assert cluster.leftovers() == {}
    finally:
        cluster.playbook("serve.yml", *stop)
