"""Parallel pre-flight of every host before a launch, over SSH with paramiko.

`mlx.launch` retries unreachable hosts for minutes and starts ranks that then
fail on mismatched versions. Checking every host at once first turns those into
one clear error within seconds: which host, what is wrong, a table of versions.
This module probes; mlxnode/readiness.py judges what it found.
"""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

from .errors import UsageError
from .readiness import HostReport

logger = logging.getLogger(__name__)

DEFAULT_STARTING_PORT = 32323  # mlx.launch's default for the ring backend
DEFAULT_CONNECT_TIMEOUT = 5.0
LOCAL_HOSTS = ("127.0.0.1", "localhost")

# Runs on each host with the interpreter the job will use; prints one JSON line.
# mlx_lm's version comes from its metadata: importing it pulls in transformers (~1 s).
_PROBE = r"""
import json, socket, sys
from importlib.metadata import version
report = {"python": sys.executable}
for name, module in (("mlx", "mlx.core"), ("mlxnode", "mlxnode")):
    try:
        report[name] = __import__(module, fromlist=["_"]).__version__
    except Exception as e:
        report[name] = None
try:
    report["mlx_lm"] = version("mlx-lm")
except Exception:
    report["mlx_lm"] = None
try:
    from mlxnode.memory import available_memory_bytes
    report["memory_available"] = available_memory_bytes()
except Exception:
    report["memory_available"] = None
busy = []
for ip, port in json.loads(sys.argv[1]):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((ip, port))
    except OSError:
        busy.append(port)
    finally:
        s.close()
report["ports_busy"] = busy
print(json.dumps(report))
"""


@dataclass
class HostSpec:
    """One entry of an `mlx.launch` hostfile: the SSH name and the IPs MLX uses.

    `name` is what messages call the host: the hostfile's optional ``name`` (the
    inventory name mlxnode_config writes there), else the SSH name.
    """

    rank: int
    ssh: str
    ips: list[str] = field(default_factory=list)
    name: str = ""

    def __post_init__(self) -> None:
        self.name = self.name or self.ssh

    @property
    def is_local(self) -> bool:
        return self.ssh in LOCAL_HOSTS


def load_hostfile(path: str | Path) -> list[HostSpec]:
    """Read an `mlx.launch` hostfile: a list of hosts, or ``{"hosts": [...], ...}``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise UsageError(f"hostfile {path} not found; render it with playbooks/site.yml") from e
    except (OSError, ValueError) as e:
        raise UsageError(f"hostfile {path} is not valid JSON: {e}") from e
    hosts = data.get("hosts") if isinstance(data, dict) else data
    if not isinstance(hosts, list) or not hosts:
        raise UsageError(f"hostfile {path}: expected a non-empty list of hosts")
    specs = []
    for rank, entry in enumerate(hosts):
        if not isinstance(entry, dict) or not isinstance(entry.get("ssh"), str):
            raise UsageError(f"hostfile {path}: host {rank} needs an 'ssh' name")
        ips = entry.get("ips") or []
        if not isinstance(ips, list) or not all(isinstance(ip, str) for ip in ips):
            raise UsageError(f"hostfile {path}: host {rank} 'ips' must be a list of strings")
        name = entry.get("name") or ""
        if not isinstance(name, str):
            raise UsageError(f"hostfile {path}: host {rank} 'name' must be a string")
        specs.append(HostSpec(rank=rank, ssh=entry["ssh"], ips=ips, name=name))
    return specs


def ring_ports(
    hosts: Sequence[HostSpec], *, starting_port: int = DEFAULT_STARTING_PORT, connections: int = 1
) -> dict[int, list[tuple[str, int]]]:
    """The (ip, port) each rank listens on, numbered exactly as `mlx.launch` does for ring."""
    port = starting_port
    ports: dict[int, list[tuple[str, int]]] = {}
    for host in hosts:
        ports[host.rank] = []
        for ip in host.ips:
            for _ in range(connections):
                ports[host.rank].append((ip, port))
                port += 1
    return ports


def check_hosts(
    hosts: Sequence[HostSpec],
    *,
    python: str,
    starting_port: int = DEFAULT_STARTING_PORT,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> list[HostReport]:
    """Probe every host at once; never raises for a host problem, reports it instead."""
    ports = ring_ports(hosts, starting_port=starting_port)
    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        futures = [
            pool.submit(_probe_host, host, python, ports[host.rank], timeout) for host in hosts
        ]
        return [f.result() for f in futures]


def run_on_host(host: HostSpec, argv: Sequence[str], *, timeout: float) -> str:
    """Run `argv` on `host` (locally for 127.0.0.1) and return its stdout.

    Raises:
        HostCommandError: with `unreachable` set when SSH itself failed.
    """
    if host.is_local:
        return _run_local(list(argv), timeout)
    return _run_ssh(host.ssh, shlex.join(argv), timeout)


def run_everywhere(
    hosts: Sequence[HostSpec], argv: Sequence[str], *, timeout: float
) -> dict[str, str]:
    """Best effort: run `argv` on every host at once.

    Returns:
        The hosts SSH could not reach (name -> why); a command that ran and failed
        is only logged.
    """

    def one(host: HostSpec) -> tuple[str, str] | None:
        try:
            run_on_host(host, argv, timeout=timeout)
        except HostCommandError as e:
            logger.debug("%s on %s: %s", argv[0], host.name, e)
            if e.unreachable:
                return host.name, str(e)
        return None

    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        return dict(found for found in pool.map(one, hosts) if found is not None)


def _probe_host(
    host: HostSpec, python: str, ports: list[tuple[str, int]], timeout: float
) -> HostReport:
    report = HostReport(rank=host.rank, host=host.name)
    started = time.monotonic()
    try:
        out = run_on_host(host, [python, "-c", _PROBE, json.dumps(ports)], timeout=timeout)
        report.reachable = True
        data = json.loads(out.strip().splitlines()[-1])
        for key in ("python", "mlx", "mlx_lm", "mlxnode", "ports_busy"):
            setattr(report, key, data.get(key))
        report.mem_free = data.get("memory_available")
    except HostCommandError as e:
        report.reachable = not e.unreachable
        report.error = str(e)
        if not e.unreachable:
            report.python = python
    except (ValueError, IndexError):
        report.reachable = True
        report.error = "probe printed no report"
    report.seconds = time.monotonic() - started
    return report


class HostCommandError(Exception):
    def __init__(self, message: str, *, unreachable: bool):
        super().__init__(message)
        self.unreachable = unreachable


def _run_local(argv: list[str], timeout: float) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout * 4)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise HostCommandError(f"cannot run {argv[0]}: {e}", unreachable=False) from e
    if result.returncode != 0:
        raise HostCommandError(
            f"{argv[0]} failed: {result.stderr.strip()[-200:]}", unreachable=False
        )
    return result.stdout


def _ssh_settings(host: str) -> dict:
    """Connection settings for `host` from ~/.ssh/config, as the ssh client would use them."""
    settings: dict = {"hostname": host, "port": 22, "username": None, "key_filename": None}
    config_path = Path("~/.ssh/config").expanduser()
    if config_path.is_file():
        found = paramiko.SSHConfig.from_path(str(config_path)).lookup(host)
        settings["hostname"] = found.get("hostname", host)
        settings["port"] = int(found.get("port", 22))
        settings["username"] = found.get("user")
        settings["key_filename"] = found.get("identityfile")
        settings["known_hosts"] = found.get("userknownhostsfile")
    return settings


def _run_ssh(host: str, command: str, timeout: float) -> str:
    settings = _ssh_settings(host)
    client = paramiko.SSHClient()
    client.load_system_host_keys()
    for known in (settings.get("known_hosts") or "~/.ssh/known_hosts").split():
        path = Path(known).expanduser()
        if path.is_file():
            client.load_host_keys(str(path))
    # Host key checking stays on: an unknown host is an error, never silently trusted.
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(
            settings["hostname"],
            port=settings["port"],
            username=settings["username"],
            key_filename=settings["key_filename"],
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
            look_for_keys=True,
            allow_agent=True,
        )
    except (TimeoutError, OSError) as e:
        raise HostCommandError(f"unreachable over SSH ({e})", unreachable=True) from e
    except paramiko.BadHostKeyException as e:
        raise HostCommandError(
            "host key does not match known_hosts (if the host was reinstalled, remove its old "
            "key with ssh-keygen -R and rerun playbooks/provision.yml; if not, do not connect)",
            unreachable=True,
        ) from e
    except paramiko.SSHException as e:
        raise HostCommandError(f"SSH failed ({e})", unreachable=True) from e
    try:
        _stdin, stdout, stderr = client.exec_command(command, timeout=timeout * 4)
        out = stdout.read().decode(errors="replace")
        status = stdout.channel.recv_exit_status()
        if status != 0:
            err = stderr.read().decode(errors="replace").strip()[-200:]
            raise HostCommandError(f"probe exited {status}: {err}", unreachable=False)
        return out
    except (TimeoutError, OSError, paramiko.SSHException) as e:
        raise HostCommandError(f"probe timed out or failed ({e})", unreachable=False) from e
    finally:
        client.close()
