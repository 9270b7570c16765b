"""A testbed of N real SSH hosts on one Linux machine, standing in for a cluster of Macs.

Each host is a network namespace with its own address on a bridge, plus mount, UTS and PID
namespaces with a private /root, /tmp, /etc/hosts, /etc/ssh, hostname and process table,
running its own sshd. Ansible, paramiko and mlx.launch reach the hosts over real SSH, host
key checking on, exactly as they reach real Macs::

    python -m tests.support.testbed up --hosts 3    # also writes inventory/testbed/hosts.yml
    python -m tests.support.testbed up --hosts 2 --pin --memory h1=600M,h2=300M
    python -m tests.support.testbed status
    python -m tests.support.testbed down

With `--pin` / `--cpus` / `--memory` each host gets its own cgroup (v1 `cpuset` and `memory`
controllers), its sshd placed in it, so every session and every rank started over SSH runs on
the host's own CPUs within its own memory limit: two hosts on two cores are two 1-core
machines, and a host's memory can be smaller than a model.

Everything the testbed creates is recorded in its state dir, and `down` removes exactly that.
"""

import argparse
import concurrent.futures
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

DEFAULT_NAME = "mlxnode"
DEFAULT_HOSTS = 3
DEFAULT_SUBNET = "10.213.0.0/24"
DEFAULT_STATE_ROOT = Path("/var/lib/mlxnode-testbed")
DEFAULT_INVENTORY = Path(__file__).resolve().parents[2] / "inventory" / "testbed" / "hosts.yml"
DEFAULT_CONNECT_TIMEOUT = 5
# The hosts' "system Python": /root (and so any pyenv in it) is private to each host.
HOST_PYTHON = "/usr/bin/python3"
INVENTORY_GROUP = "mlx_cluster"

SSHD = "/usr/sbin/sshd"  # sshd re-executes itself, so it must be started by absolute path.
_SFTP_SERVER = "/usr/lib/openssh/sftp-server"
_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_ENV = {"PATH": _SYSTEM_PATH, "LC_ALL": "C.UTF-8"}
_SSH_PORT = 22
_HOST_OFFSET = 10  # host i gets the subnet's address 10 + i; address 1 is the controller.
_STATE_VERSION = 1
_NAME_RE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
_TOOLS = {
    "ip": "iproute2",
    "unshare": "util-linux",
    "mount": "mount",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
}
_FILES = {SSHD: "openssh-server", _SFTP_SERVER: "openssh-sftp-server"}
# The hosts' private dirs are bind-mounted over these, so state must not live under them.
# Each pinned host's cgroup is <controller root>/mlxnode-testbed/<testbed>/<host>.
CGROUP_ROOT = Path("/sys/fs/cgroup")
_CGROUP_PARENT = "mlxnode-testbed"
_MEMORY_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}
_FORBIDDEN_STATE_PARENTS = ("/tmp", "/root", "/etc", "/usr", "/proc", "/sys", "/dev", "/run/netns")

# Runs as PID 1 of the host's fresh mount, UTS and PID namespaces. Propagation is private, so
# none of these mounts reaches the controller. The binds come first: hiding the state root
# afterwards keeps the controller's key and the other hosts' files out of this host's sight.
# sshd, exec'd as the namespace's init, reaps the host's orphans; when it dies, the kernel
# kills every process left on the host.
_HOST_INIT = """\
set -e
mount --bind "$1/root" /root
mount --bind "$1/tmp" /tmp
mount --bind "$1/etc/hosts" /etc/hosts
mount --bind "$1/etc/ssh" /etc/ssh
mount -t tmpfs -o size=64k,mode=0755 mlxnode-testbed "$2"
echo "$3" > /proc/sys/kernel/hostname
# `ip netns exec` gave the host a fresh /sys without the cgroup mounts; mount the cpuset and
# memory controllers again, so a process on the host can read its own limits there.
if mount -t tmpfs -o size=16k,mode=0755 cgroup /sys/fs/cgroup 2>/dev/null; then
  for c in cpuset memory; do
    mkdir /sys/fs/cgroup/$c
    mount -t cgroup -o $c,ro cgroup /sys/fs/cgroup/$c 2>/dev/null || rmdir /sys/fs/cgroup/$c
  done
fi
exec "$4" -D -e -f /etc/ssh/sshd_config
"""

_SSHD_CONFIG = """\
# Written by tests.support.testbed for host {host} of testbed {name!r}.
ListenAddress {ip}
ListenAddress 127.0.0.1
Port {port}
HostKey /etc/ssh/ssh_host_ed25519_key
PidFile none
PermitRootLogin prohibit-password
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes yes
# Ansible forks and mlx.launch each open several sessions at once.
MaxStartups 64:30:256
MaxSessions 64
UseDNS no
PrintMotd no
PrintLastLog no
X11Forwarding no
Subsystem sftp {sftp}
"""


class TestbedError(Exception):
    """A testbed operation failed; `exit_code` is what the CLI returns for it."""

    __test__ = False  # not a pytest test class, despite the name
    exit_code = 1

    def __init__(self, message: str, *, host: str | None = None) -> None:
        super().__init__(message)
        self.host = host


class TestbedEnvironmentError(TestbedError, OSError):
    """This machine cannot run the testbed: not root, or a tool is missing."""

    exit_code = 2


class TestbedUsageError(TestbedError, ValueError):
    """The request conflicts with a bad argument or with what already exists on this machine."""

    exit_code = 2


@dataclass(frozen=True)
class Host:
    """One testbed host as the inventory names it."""

    name: str
    ip: str
    netns: str


@dataclass(frozen=True)
class HostStatus:
    """What `status()` found for one host."""

    name: str
    ip: str
    netns: str
    sshd_pid: int | None
    link_up: bool
    reachable: bool
    cpus: str | None = None  # the host cgroup's CPU set; None: not pinned
    memory_bytes: int | None = None  # the host cgroup's memory limit; None: no limit


@dataclass
class _State:
    """What the testbed created, saved after every creation so `down` can undo a partial `up`."""

    name: str
    hosts: int
    subnet: str
    bridge: str | None = None
    netns: dict[str, str] = field(default_factory=dict)
    veths: dict[str, str] = field(default_factory=dict)
    # host -> pid and start time of its sshd, and of the unshare ("keeper") that forked it
    sshd: dict[str, dict[str, int]] = field(default_factory=dict)
    # host -> {"cpus": "0", "memory": bytes}: the limits its cgroup enforces
    limits: dict[str, dict[str, Any]] = field(default_factory=dict)
    version: int = _STATE_VERSION


class Testbed:
    """N SSH hosts on this Linux machine, each in its own network and mount namespace.

    Host i is named `hi`, lives in namespace `<name>-hi` and has address 10 + i of the
    subnet; the controller (this machine) has address 1 on the bridge `<name[:4]>br0`.
    """

    __test__ = False

    def __init__(
        self,
        name: str = DEFAULT_NAME,
        *,
        hosts: int | None = None,
        subnet: str | None = None,
        state_root: Path | str = DEFAULT_STATE_ROOT,
        cpus: Mapping[str, str] | None = None,
        memory: Mapping[str, str | int] | None = None,
    ) -> None:
        """Describe a testbed; nothing is touched until `up()` or `down()`.

        Args:
            name: Prefix of every namespace, interface and state dir the testbed creates.
            hosts: Number of hosts; `None` means what the running testbed has, else 3.
            subnet: IPv4 subnet; `None` means the running testbed's, else 10.213.0.0/24.
            state_root: Where each testbed keeps its keys, host dirs and record of what it made.
            cpus: Host name -> the CPUs it may use ("0", "0-1"), enforced by a cpuset cgroup.
            memory: Host name -> its memory limit (bytes, or "600M", "2G"), enforced by a
                memory cgroup. With neither, `up()` keeps what the running testbed has.

        Raises:
            TestbedUsageError: An argument is invalid.
        """
        if not _NAME_RE.match(name) or len(name) > 32:
            raise TestbedUsageError(
                f"invalid testbed name {name!r}: use lowercase letters, digits and inner dashes"
            )
        if hosts is not None and hosts < 1:
            raise TestbedUsageError(f"a testbed needs at least one host, not {hosts}")
        self.name = name
        self.state_root = _check_state_root(Path(state_root))
        self._requested_hosts = hosts
        self._requested_subnet = _parse_subnet(subnet) if subnet is not None else None
        self._requested_limits = _limits(cpus or {}, memory or {}) if cpus or memory else None
        self._prefix = name[:4]
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    # -- layout ---------------------------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        """This testbed's own directory under the state root."""
        return self.state_root / self.name

    @property
    def key_path(self) -> Path:
        """The controller's SSH private key, authorized on every host."""
        return self.state_dir / "controller" / "id_ed25519"

    @property
    def known_hosts_path(self) -> Path:
        """known_hosts with every host's IP and host key, for the controller."""
        return self.state_dir / "controller" / "known_hosts"

    @property
    def bridge(self) -> str:
        """The bridge in the root namespace that joins the controller and the hosts."""
        return f"{self._prefix}br0"

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        """The subnet in use: the running testbed's, else the requested one, else the default."""
        return self._layout()[1]

    @property
    def controller_ip(self) -> str:
        """The controller's address on the bridge, as the hosts see it."""
        return str(self.subnet[1])

    @property
    def hosts(self) -> list[Host]:
        """The hosts, h1..hN."""
        count, subnet = self._layout()
        return self._hosts_for(count, subnet)

    def host(self, name: str) -> Host:
        """Look up a host by inventory name.

        Raises:
            TestbedUsageError: No host has that name.
        """
        hosts = self.hosts
        for host in hosts:
            if host.name == name:
                return host
        raise TestbedUsageError(
            f"unknown host {name!r}; testbed {self.name!r} has h1..h{len(hosts)}", host=name
        )

    def _layout(self) -> tuple[int, ipaddress.IPv4Network]:
        state = self._load_state()
        if state is not None:
            return state.hosts, _parse_subnet(state.subnet)
        return (
            self._requested_hosts or DEFAULT_HOSTS,
            self._requested_subnet or _parse_subnet(DEFAULT_SUBNET),
        )

    def _hosts_for(self, count: int, subnet: ipaddress.IPv4Network) -> list[Host]:
        return [
            Host(name=f"h{i}", ip=str(subnet[_HOST_OFFSET + i]), netns=f"{self.name}-h{i}")
            for i in range(1, count + 1)
        ]

    def _veth(self, host: Host) -> str:
        return f"{self._prefix}-{host.name}"

    def _host_dir(self, host: Host) -> Path:
        return self.state_dir / "hosts" / host.name

    # -- lifecycle ------------------------------------------------------------------------

    def up(self) -> list[str]:
        """Create the testbed, or verify (and repair) the one already up.

        Returns:
            What was created, started or repaired; empty when the testbed was already healthy.

        Raises:
            TestbedEnvironmentError: Not root, or a required tool is missing.
            TestbedUsageError: The testbed is up with another size or subnet, or a name or the
                subnet is already taken by something that is not this testbed.
            TestbedError: A host did not come up.
        """
        _check_environment()
        state = self._load_state()
        count = self._requested_hosts or (state.hosts if state else DEFAULT_HOSTS)
        subnet = self._requested_subnet or (
            _parse_subnet(state.subnet) if state else _parse_subnet(DEFAULT_SUBNET)
        )
        if state is not None and (state.hosts, state.subnet) != (count, str(subnet)):
            raise TestbedUsageError(
                f"testbed {self.name!r} is up with {state.hosts} hosts on {state.subnet}; "
                f"run `down` first to recreate it with {count} hosts on {subnet}"
            )
        if _HOST_OFFSET + count > subnet.num_addresses - 2:
            raise TestbedUsageError(f"subnet {subnet} is too small for {count} hosts")
        hosts = self._hosts_for(count, subnet)
        self._check_names_free(state, hosts)
        self._check_subnet_free(state, subnet)

        if state is None:
            self.state_root.mkdir(mode=0o755, parents=True, exist_ok=True)
            self.state_dir.mkdir(mode=0o700, exist_ok=True)
            state = _State(name=self.name, hosts=count, subnet=str(subnet))
            self._save_state(state)
        # sshd's privilege separation dir; a systemd unit normally creates it.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)

        for pid, proc in list(self._children.items()):
            if proc.poll() is not None:  # reap an sshd of ours that died since
                del self._children[pid]
        actions = self._ensure_keys(hosts)
        actions += self._ensure_network(state, hosts, subnet)
        changed = [host for host in hosts if self._ensure_host_files(host, hosts)]
        actions += self._ensure_sshd(state, hosts, restart={h.name for h in changed})
        actions += self._ensure_limits(state, hosts)
        _write_if_changed(self.known_hosts_path, self._known_hosts_text(hosts), 0o644)
        unreachable = [h.name for h, ok in zip(hosts, self._probe(hosts), strict=True) if not ok]
        if unreachable:
            logs = ", ".join(str(self._host_dir(self.host(n)) / "sshd.log") for n in unreachable)
            raise TestbedError(
                f"{', '.join(unreachable)} not reachable over SSH; see {logs}",
                host=unreachable[0],
            )
        return actions

    def down(self) -> list[str]:
        """Remove everything this testbed created: processes, namespaces, links, state dir.

        Only names recorded in the state dir are touched, so it is safe to run at any time;
        without a state dir it does nothing.

        Returns:
            What was removed; empty when the testbed was already down.

        Raises:
            TestbedEnvironmentError: Not root, or `ip` is missing.
            TestbedError: Something could not be removed.
        """
        _check_environment(only_ip=True)  # tearing down must not need sshd installed
        state = self._load_state()
        if state is None:
            return []
        self._check_recorded_names(state)
        actions: list[str] = []

        def done(action: str) -> None:
            logger.info("%s", action)
            actions.append(action)

        for host_name, netns in state.netns.items():
            sshd = self._live_sshd(state, host_name)
            keeper = self._live_keeper(state, host_name)
            pids = _pids_in_netns(netns)
            pids += [p for p in (sshd, keeper) if p is not None and p not in pids]
            if pids:
                # Sessions first, so sshd can still reap them; then sshd, which the unshare
                # that forked it outlives only by an instant.
                self._terminate([p for p in pids if p not in (sshd, keeper)])
                self._terminate([p for p in pids if p == sshd])
                self._terminate([p for p in pids if p == keeper])
                left = _pids_in_netns(netns)
                if left:
                    raise TestbedError(
                        f"processes {left} in {netns} survived SIGKILL", host=host_name
                    )
                done(f"stopped {len(pids)} process{'es' * (len(pids) != 1)} on {host_name}")
        for host_name in state.limits:
            for controller in ("cpuset", "memory"):
                directory = self._cgroup_dir(controller, host_name)
                if directory.is_dir():
                    directory.rmdir()  # empty now: its processes were stopped above
                    done(f"removed {controller} cgroup of {host_name}")
        for controller in ("cpuset", "memory"):
            for directory in (self._cgroup_dir(controller), self._cgroup_dir(controller).parent):
                with contextlib.suppress(OSError):
                    directory.rmdir()  # only if no other testbed's hosts live there
        # Deleting the root side of a veth removes both ends at once; deleting a namespace
        # would also remove them, but asynchronously.
        for veth in state.veths.values():
            if _link_exists(veth):
                _delete_link(veth)
                done(f"deleted link {veth}")
        for netns in state.netns.values():
            if _netns_exists(netns):
                _ip("netns", "delete", netns)
                done(f"deleted namespace {netns}")
        if state.bridge and _link_exists(state.bridge):
            _delete_link(state.bridge)
            done(f"deleted bridge {state.bridge}")
        self._remove_state_dir()
        done(f"removed {self.state_dir}")
        return actions

    def status(self) -> list[HostStatus]:
        """Report each host's sshd, link and SSH reachability; empty when the testbed is down.

        Raises:
            TestbedEnvironmentError: Not root.
        """
        _require_root()
        state = self._load_state()
        if state is None:
            return []
        hosts = self._hosts_for(state.hosts, _parse_subnet(state.subnet))
        reachable = self._probe(hosts, connect_timeout=2, attempts=1)
        return [
            HostStatus(
                name=host.name,
                ip=host.ip,
                netns=host.netns,
                sshd_pid=self._live_sshd(state, host.name),
                link_up=_link_is_up(self._veth(host)),
                reachable=ok,
                cpus=_read_cgroup(self._cgroup_dir("cpuset", host.name) / "cpuset.cpus"),
                memory_bytes=_int_or_none(
                    _read_cgroup(self._cgroup_dir("memory", host.name) / "memory.limit_in_bytes")
                ),
            )
            for host, ok in zip(hosts, reachable, strict=True)
        ]

    # -- using the hosts ------------------------------------------------------------------

    def ssh_command(
        self, host: str, command: str, *, connect_timeout: int = DEFAULT_CONNECT_TIMEOUT
    ) -> list[str]:
        """Build the argv that runs `command` on `host` as root, with host key checking on.

        Args:
            host: Inventory name, e.g. "h1".
            command: Shell command line run by root's shell on the host.
            connect_timeout: Seconds before giving up on the TCP connection.
        """
        target = self.host(host)
        return [
            shutil.which("ssh", path=_SYSTEM_PATH) or "ssh",
            "-F",
            "none",
            "-i",
            str(self.key_path),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={self.known_hosts_path}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            f"ConnectTimeout={connect_timeout}",
            f"root@{target.ip}",
            command,
        ]

    def set_link(self, host: str, up: bool) -> None:
        """Take one host's link down or up, to partition it from the others.

        Established TCP connections are not reset: packets are dropped, as when a cable is
        pulled, so peers notice only through their own timeouts.
        """
        _require_root()
        veth = self._recorded_veth(host)
        _ip("link", "set", veth, "up" if up else "down")
        logger.info("link %s of %s is %s", veth, host, "up" if up else "down")

    def kill_host_processes(
        self, host: str, pattern: str, *, sig: signal.Signals = signal.SIGTERM
    ) -> list[int]:
        """Signal the processes on `host` whose command line matches `pattern` (a regex).

        The host's sshd listener (and the unshare that holds its namespaces) is never signalled.

        Returns:
            The pids that were signalled.
        """
        _require_root()
        state = self._require_state()
        target = self.host(host)
        spared = {self._live_sshd(state, host), self._live_keeper(state, host)}
        regex = re.compile(pattern)
        killed = []
        for pid in _pids_in_netns(target.netns):
            if pid not in spared and regex.search(_cmdline(pid)):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    continue
                killed.append(pid)
        return killed

    def write_inventory(
        self,
        path: Path | str | None = None,
        *,
        extra_host_vars: Mapping[str, Mapping[str, Any]] | None = None,
        group_vars: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write an Ansible YAML inventory of the hosts, in the format used for real Macs.

        Args:
            path: Where to write; defaults to inventory/testbed/hosts.yml in the repo.
            extra_host_vars: More variables per host name, merged over the generated ones.
            group_vars: More variables for the `mlx_cluster` group, merged over the generated
                connection settings.

        Returns:
            The path written.

        Raises:
            TestbedUsageError: `extra_host_vars` names a host the testbed does not have.
        """
        target = Path(path) if path is not None else DEFAULT_INVENTORY
        hosts = self.hosts
        extra_host_vars = extra_host_vars or {}
        unknown = sorted(set(extra_host_vars) - {h.name for h in hosts})
        if unknown:
            raise TestbedUsageError(f"extra_host_vars names unknown hosts: {', '.join(unknown)}")
        ssh_args = (
            f"-o UserKnownHostsFile={self.known_hosts_path} "
            "-o StrictHostKeyChecking=yes -o IdentitiesOnly=yes"
        )
        inventory = {
            "all": {
                "children": {
                    INVENTORY_GROUP: {
                        "hosts": {
                            h.name: {
                                "ansible_host": h.ip,
                                "mlxnode_mlx_ip": h.ip,
                                **extra_host_vars.get(h.name, {}),
                            }
                            for h in hosts
                        },
                        "vars": {
                            "ansible_user": "root",
                            "ansible_python_interpreter": HOST_PYTHON,
                            "ansible_ssh_private_key_file": str(self.key_path),
                            "ansible_ssh_common_args": ssh_args,
                            **(group_vars or {}),
                        },
                    }
                }
            }
        }
        header = (
            f"# Written by `python -m tests.support.testbed up` for testbed {self.name!r}.\n"
            "# Regenerated on every `up`; edit the testbed, not this file.\n"
            "---\n"
        )
        text = header + yaml.safe_dump(inventory, sort_keys=False, default_flow_style=False)
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_if_changed(target, text, 0o644)
        return target

    # -- up, step by step -----------------------------------------------------------------

    def _check_names_free(self, state: _State | None, hosts: list[Host]) -> None:
        recorded = set()
        if state is not None:
            recorded = {state.bridge, *state.netns.values(), *state.veths.values()}
        if self.bridge not in recorded and _link_exists(self.bridge):
            raise TestbedUsageError(
                f"interface {self.bridge} exists but testbed {self.name!r} did not create it; "
                "pick another --name"
            )
        for host in hosts:
            if host.netns not in recorded and _netns_exists(host.netns):
                raise TestbedUsageError(
                    f"namespace {host.netns} exists but testbed {self.name!r} did not create it",
                    host=host.name,
                )
            veth = self._veth(host)
            if veth not in recorded and _link_exists(veth):
                raise TestbedUsageError(
                    f"interface {veth} exists but testbed {self.name!r} did not create it; "
                    "pick another --name",
                    host=host.name,
                )

    def _check_subnet_free(self, state: _State | None, subnet: ipaddress.IPv4Network) -> None:
        ours = state.bridge if state is not None else None
        for link in _ip_json("-4", "addr", "show"):
            if link.get("ifname") == ours:
                continue
            for addr in link.get("addr_info", []):
                net = ipaddress.ip_network(f"{addr['local']}/{addr['prefixlen']}", strict=False)
                if net.overlaps(subnet):
                    raise TestbedUsageError(
                        f"subnet {subnet} overlaps {addr['local']}/{addr['prefixlen']} "
                        f"on interface {link['ifname']}; "
                        "pass another --subnet"
                    )
        for route in _ip_json("-4", "route", "show"):
            dst = route.get("dst", "default")
            if dst == "default" or route.get("dev") == ours:
                continue
            net = ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False)
            if net.overlaps(subnet):
                raise TestbedUsageError(
                    f"subnet {subnet} overlaps route {dst} via {route.get('dev')}; "
                    "pass another --subnet"
                )

    def _ensure_keys(self, hosts: list[Host]) -> list[str]:
        actions = []
        if not self.key_path.exists():
            self.key_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            _keygen(self.key_path, f"mlxnode-testbed {self.name} controller")
            actions.append("generated the controller key")
        for host in hosts:
            key = self._host_dir(host) / "etc" / "ssh" / "ssh_host_ed25519_key"
            if not key.exists():
                key.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                _keygen(key, f"mlxnode-testbed {self.name} {host.name}")
                actions.append(f"generated the host key of {host.name}")
        for action in actions:
            logger.info("%s", action)
        return actions

    def _ensure_network(
        self, state: _State, hosts: list[Host], subnet: ipaddress.IPv4Network
    ) -> list[str]:
        actions = []
        if not _link_exists(self.bridge):
            _ip("link", "add", self.bridge, "type", "bridge")
            state.bridge = self.bridge
            self._save_state(state)
            actions.append(f"created bridge {self.bridge} ({self.controller_ip})")
        _ip("addr", "replace", f"{subnet[1]}/{subnet.prefixlen}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for host in hosts:
            veth = self._veth(host)
            if not _netns_exists(host.netns):
                _ip("netns", "add", host.netns)
                state.netns[host.name] = host.netns
                self._save_state(state)
                actions.append(f"created namespace {host.netns}")
            if not _link_exists(veth):
                _ip(
                    "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", host.netns
                )
                state.veths[host.name] = veth
                self._save_state(state)
                actions.append(f"created link {veth} to {host.name} ({host.ip})")
            elif not _link_is_up(veth):
                actions.append(f"brought link {veth} of {host.name} back up")
            _ip("link", "set", veth, "master", self.bridge, "up")
            _ip("-n", host.netns, "addr", "replace", f"{host.ip}/{subnet.prefixlen}", "dev", "eth0")
            _ip("-n", host.netns, "link", "set", "eth0", "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")
        for action in actions:
            logger.info("%s", action)
        return actions

    def _ensure_host_files(self, host: Host, hosts: list[Host]) -> bool:
        """Lay out the host's private dirs; True if its sshd must (re)start to see a change."""
        base = self._host_dir(host)
        for sub, mode in (("root", 0o700), ("root/.ssh", 0o700), ("tmp", 0o1777)):
            (base / sub).mkdir(parents=True, exist_ok=True)
            os.chmod(base / sub, mode)  # mkdir's mode is filtered by the umask
        authorized = base / "root" / ".ssh" / "authorized_keys"
        client_key = self.key_path.with_suffix(".pub").read_text().strip()
        # Append rather than overwrite: roles add their own keys (the launcher's) here.
        existing = authorized.read_text() if authorized.exists() else ""
        if client_key not in existing.splitlines():
            sep = "" if not existing or existing.endswith("\n") else "\n"
            _write_if_changed(authorized, f"{existing}{sep}{client_key}\n", 0o600)
        etc_hosts = "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n" + "".join(
            f"{h.ip} {h.name}\n" for h in hosts
        )
        changed = _write_if_changed(base / "etc" / "hosts", etc_hosts, 0o644)
        config = _SSHD_CONFIG.format(
            host=host.name, name=self.name, ip=host.ip, port=_SSH_PORT, sftp=_SFTP_SERVER
        )
        changed |= _write_if_changed(base / "etc" / "ssh" / "sshd_config", config, 0o644)
        client_config = Path("/etc/ssh/ssh_config")
        if client_config.exists() and not (base / "etc" / "ssh" / "ssh_config").exists():
            # The host's /etc/ssh is private, so its ssh client needs its own system config.
            shutil.copy2(client_config, base / "etc" / "ssh" / "ssh_config")
        return changed

    def _ensure_sshd(self, state: _State, hosts: list[Host], *, restart: set[str]) -> list[str]:
        actions = []
        started: list[tuple[Host, subprocess.Popen[bytes]]] = []
        for host in hosts:
            pid = self._live_sshd(state, host.name)
            if pid is not None and host.name not in restart:
                continue
            if pid is not None:
                self._terminate([pid])
                self._terminate([p for p in [self._live_keeper(state, host.name)] if p])
                actions.append(f"restarted sshd on {host.name} for its new config")
            started.append((host, self._spawn_sshd(host)))
        for host, proc in started:
            sshd = self._wait_listening(host, proc)
            state.sshd[host.name] = {
                "pid": sshd,
                "start": _start_time(sshd) or 0,
                "keeper": proc.pid,
                "keeper_start": _start_time(proc.pid) or 0,
            }
            self._save_state(state)
            actions.append(f"started sshd on {host.name} (pid {sshd})")
        for action in actions:
            logger.info("%s", action)
        return actions

    def _cgroup_dir(self, controller: str, host: str | None = None) -> Path:
        directory = CGROUP_ROOT / controller / _CGROUP_PARENT / self.name
        return directory / host if host else directory

    def _ensure_limits(self, state: _State, hosts: list[Host]) -> list[str]:
        """Give each limited host a cpuset and a memory cgroup, with its sshd in both."""
        limits = self._requested_limits if self._requested_limits is not None else state.limits
        unknown = sorted(set(limits) - {h.name for h in hosts})
        if unknown:
            raise TestbedUsageError(f"limits name unknown hosts: {', '.join(unknown)}")
        actions = []
        for host in hosts:
            wanted = limits.get(host.name)
            if not wanted:
                continue
            state.limits[host.name] = dict(wanted)
            self._save_state(state)  # so `down` removes the cgroups even if this fails
            sshd = self._live_sshd(state, host.name)
            assert sshd is not None  # _ensure_sshd just started or found it
            cpuset = self._cgroup_dir("cpuset", host.name)
            _make_cpuset(cpuset)
            _write_cgroup(cpuset / "cpuset.cpus", wanted.get("cpus") or _root_cpus())
            _write_cgroup(cpuset / "cgroup.procs", str(sshd))
            memory = self._cgroup_dir("memory", host.name)
            memory.mkdir(parents=True, exist_ok=True)
            _write_cgroup(memory / "memory.limit_in_bytes", str(wanted.get("memory") or -1))
            _write_cgroup(memory / "cgroup.procs", str(sshd))
            actions.append(
                f"pinned {host.name} to CPUs {_read_cgroup(cpuset / 'cpuset.cpus')}, memory "
                f"{_read_cgroup(memory / 'memory.limit_in_bytes')} bytes"
            )
        for action in actions:
            logger.info("%s", action)
        return actions

    def _spawn_sshd(self, host: Host) -> subprocess.Popen[bytes]:
        base = self._host_dir(host)
        argv = ["ip", "netns", "exec", host.netns]
        # --kill-child: if this unshare dies, so does the host's sshd, and with it the host.
        argv += ["unshare", "--mount", "--uts", "--pid", "--fork", "--kill-child"]
        argv += ["--mount-proc", "--propagation", "private"]
        argv += [
            "/bin/sh",
            "-c",
            _HOST_INIT,
            "sh",
            str(base),
            str(self.state_root),
            host.name,
            SSHD,
        ]
        logger.debug("$ %s", shlex.join(argv))
        with open(base / "sshd.log", "ab") as log:
            # `ip netns exec` execs unshare, whose forked child execs sh, which execs sshd.
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_ENV,
                start_new_session=True,
            )
        self._children[proc.pid] = proc
        return proc

    def _wait_listening(
        self, host: Host, proc: subprocess.Popen[bytes], timeout: float = 10.0
    ) -> int:
        """Wait until the host's sshd accepts connections; return its pid."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise TestbedError(
                    f"sshd on {host.name} exited with {proc.returncode}: "
                    f"{_last_line(self._host_dir(host) / 'sshd.log')}",
                    host=host.name,
                )
            try:
                with socket.create_connection((host.ip, _SSH_PORT), timeout=0.5):
                    pass
            except OSError:
                time.sleep(0.05)
                continue
            sshd = [p for p in _children_of(proc.pid) if _exe(p) == os.path.realpath(SSHD)]
            if sshd:
                return sshd[0]
            time.sleep(0.05)
        raise TestbedError(
            f"sshd on {host.name} is not listening on {host.ip}:{_SSH_PORT} after {timeout:.0f} s",
            host=host.name,
        )

    def _known_hosts_text(self, hosts: list[Host]) -> str:
        lines = []
        for host in hosts:
            pub = self._host_dir(host) / "etc" / "ssh" / "ssh_host_ed25519_key.pub"
            key_type, key_data = pub.read_text().split()[:2]
            lines.append(f"{host.ip} {key_type} {key_data}\n")
        return "".join(lines)

    def _probe(
        self,
        hosts: list[Host],
        *,
        connect_timeout: int = DEFAULT_CONNECT_TIMEOUT,
        attempts: int = 3,
    ) -> list[bool]:
        """Run `true` over SSH on every host at once; True where it worked."""

        def ok(host: Host) -> bool:
            argv = self.ssh_command(host.name, "true", connect_timeout=connect_timeout)
            for attempt in range(attempts):
                if attempt:
                    time.sleep(0.2 * attempt)
                try:
                    proc = subprocess.run(
                        argv,
                        stdin=subprocess.DEVNULL,
                        capture_output=True,
                        env=_ENV,
                        timeout=connect_timeout + 5,
                    )
                except subprocess.TimeoutExpired:
                    continue
                if proc.returncode == 0:
                    return True
                logger.debug("ssh %s: %s", host.name, proc.stderr.decode(errors="replace"))
            return False

        if not hosts:
            return []
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(hosts), 16)) as pool:
            return list(pool.map(ok, hosts))

    # -- down, step by step ---------------------------------------------------------------

    def _check_recorded_names(self, state: _State) -> None:
        """Refuse to delete anything whose recorded name is not this testbed's."""
        expected_veth = re.compile(rf"^{re.escape(self._prefix)}-h\d+$")
        expected_netns = re.compile(rf"^{re.escape(self.name)}-h\d+$")
        bad = [n for n in state.netns.values() if not expected_netns.match(n)]
        bad += [v for v in state.veths.values() if not expected_veth.match(v)]
        if state.bridge not in (None, self.bridge):
            bad.append(state.bridge)
        if state.name != self.name or bad:
            raise TestbedError(
                f"{self.state_dir / 'state.json'} records names that are not testbed "
                f"{self.name!r}'s ({', '.join(map(str, bad)) or state.name}); not removing them"
            )

    def _terminate(self, pids: Sequence[int], timeout: float = 3.0) -> None:
        """SIGTERM, then SIGKILL what is left; reap the ones that are our own children."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                for pid in pids:
                    self._reap(pid)
                if not any(_is_running(pid) for pid in pids):
                    return
                time.sleep(0.02)

    def _reap(self, pid: int) -> None:
        proc = self._children.get(pid)
        if proc is not None:
            if proc.poll() is not None:
                del self._children[pid]
            return
        # Not our child: init reaps it (or, in some sandboxes, leaves a zombie behind).
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)

    def _remove_state_dir(self) -> None:
        prefix = f"{self.state_dir}/"
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split()[4] for line in f]
        busy = [m for m in mounts if m == str(self.state_dir) or m.startswith(prefix)]
        if busy:
            raise TestbedError(f"not removing {self.state_dir}: {busy[0]} is mounted")
        shutil.rmtree(self.state_dir, ignore_errors=False)
        with contextlib.suppress(OSError):
            self.state_root.rmdir()  # only if no other testbed lives there

    # -- state ----------------------------------------------------------------------------

    def _load_state(self) -> _State | None:
        path = self.state_dir / "state.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except PermissionError as exc:
            raise TestbedEnvironmentError(f"cannot read {path}: run as root") from exc
        except json.JSONDecodeError as exc:
            raise TestbedError(f"{path} is corrupt ({exc}); remove the testbed by hand") from exc
        if data.get("version") != _STATE_VERSION:
            raise TestbedError(f"{path} has unknown version {data.get('version')!r}")
        return _State(**data)

    def _save_state(self, state: _State) -> None:
        path = self.state_dir / "state.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(state), indent=2) + "\n")
        os.replace(tmp, path)

    def _require_state(self) -> _State:
        state = self._load_state()
        if state is None:
            raise TestbedError(f"testbed {self.name!r} is down; run `up` first")
        return state

    def _recorded_veth(self, host: str) -> str:
        state = self._require_state()
        self.host(host)
        veth = state.veths.get(host)
        if veth is None:
            raise TestbedError(f"testbed {self.name!r} has no link for {host}", host=host)
        return veth

    def _live_sshd(self, state: _State, host: str) -> int | None:
        """The recorded sshd pid of `host` if that very process still runs, else None."""
        return self._live_recorded(state, host, "pid", "start", SSHD)

    def _live_keeper(self, state: _State, host: str) -> int | None:
        """The unshare holding `host`'s namespaces (sshd's parent), if it still runs."""
        unshare = shutil.which("unshare", path=_SYSTEM_PATH) or "unshare"
        return self._live_recorded(state, host, "keeper", "keeper_start", unshare)

    def _live_recorded(
        self, state: _State, host: str, pid_key: str, start_key: str, exe: str
    ) -> int | None:
        record = state.sshd.get(host, {})
        pid = record.get(pid_key)
        if pid is None or not _is_running(pid) or _start_time(pid) != record.get(start_key):
            return None  # gone, or the pid now belongs to someone else
        return pid if _exe(pid) == os.path.realpath(exe) else None


# -- helpers ------------------------------------------------------------------------------


def _limits(cpus: Mapping[str, str], memory: Mapping[str, str | int]) -> dict[str, dict[str, Any]]:
    """Host -> {"cpus", "memory" (bytes)}, checked; raises TestbedUsageError naming the value."""
    limits: dict[str, dict[str, Any]] = {}
    for host, value in cpus.items():
        if not re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", str(value)):
            raise TestbedUsageError(f"CPUs {value!r} for {host}: write them as 0, 0-1 or 0,2")
        limits.setdefault(host, {})["cpus"] = str(value)
    for host, value in memory.items():
        limits.setdefault(host, {})["memory"] = parse_memory(value)
    return limits


def parse_memory(value: str | int) -> int:
    """Bytes from 629145600, "600M", "2G" or "512K"; raises TestbedUsageError otherwise."""
    match = re.fullmatch(r"(\d+)([KMG]?)", str(value).strip().upper())
    if not match or int(match.group(1)) == 0:
        raise TestbedUsageError(f"memory limit {value!r}: write it as bytes, or e.g. 600M, 2G")
    return int(match.group(1)) * _MEMORY_UNITS[match.group(2)]


def _root_cpus() -> str:
    return (CGROUP_ROOT / "cpuset" / "cpuset.cpus").read_text().strip()


def _make_cpuset(directory: Path) -> None:
    """Create a cpuset cgroup and its parents; a v1 cpuset takes no process until it has
    CPUs and memory nodes, so each new level inherits its parent's."""
    missing = []
    for level in (directory, *directory.parents):
        if level.is_dir():
            break
        missing.append(level)
    for level in reversed(missing):
        level.mkdir()
        for name in ("cpuset.cpus", "cpuset.mems"):
            _write_cgroup(level / name, (level.parent / name).read_text().strip())


def _write_cgroup(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise TestbedEnvironmentError(
            f"cannot write {value!r} to {path} ({exc.strerror}); the testbed needs root and the "
            "cgroup v1 cpuset and memory controllers under /sys/fs/cgroup"
        ) from exc


def _read_cgroup(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _int_or_none(text: str | None) -> int | None:
    if text is None or not text.isdigit() or int(text) >= 1 << 60:
        return None  # no cgroup, or v1's "no limit"
    return int(text)


def _parse_subnet(subnet: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(subnet)
    except ValueError as exc:
        raise TestbedUsageError(f"invalid subnet {subnet!r}: {exc}") from exc


def _check_state_root(path: Path) -> Path:
    if not path.is_absolute() or len(path.parts) < 3:
        raise TestbedUsageError(f"state root {path} must be an absolute path at least two deep")
    for parent in _FORBIDDEN_STATE_PARENTS:
        if path == Path(parent) or Path(parent) in path.parents:
            raise TestbedUsageError(
                f"state root {path} is under {parent}, which every host mounts over; "
                f"use e.g. {DEFAULT_STATE_ROOT}"
            )
    return path


def _require_root() -> None:
    if os.geteuid() != 0:
        raise TestbedEnvironmentError("the testbed must run as root (it creates namespaces)")


def _check_environment(*, only_ip: bool = False) -> None:
    """Refuse early, with the Debian package to install, when the testbed cannot work here."""
    _require_root()
    tools = {"ip": _TOOLS["ip"]} if only_ip else _TOOLS
    for tool, package in tools.items():
        if shutil.which(tool, path=_SYSTEM_PATH) is None:
            raise TestbedEnvironmentError(f"`{tool}` not found; run `apt-get install {package}`")
    for path, package in {} if only_ip else _FILES.items():
        if not os.access(path, os.X_OK):
            raise TestbedEnvironmentError(f"{path} not found; run `apt-get install {package}`")


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    logger.debug("$ %s", shlex.join(argv))
    proc = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=_ENV, timeout=60
    )
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().replace("\n", "; ")
        raise TestbedError(f"`{shlex.join(argv)}` failed: {detail}")
    return proc


def _ip(*args: str) -> str:
    return _run(["ip", *args]).stdout


def _ip_json(*args: str) -> list[dict[str, Any]]:
    return json.loads(_ip("-j", *args) or "[]")


def _delete_link(name: str) -> None:
    try:
        _ip("link", "delete", name)
    except TestbedError:
        if _link_exists(name):  # else it vanished meanwhile, with its namespace or its peer
            raise


def _keygen(path: Path, comment: str) -> None:
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])


def _link_exists(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")


def _link_is_up(name: str) -> bool:
    try:
        flags = int(Path(f"/sys/class/net/{name}/flags").read_text(), 16)
    except (OSError, ValueError):
        return False
    return bool(flags & 0x1)  # IFF_UP


def _netns_exists(name: str) -> bool:
    return os.path.exists(f"/run/netns/{name}")


def _pids_in_netns(netns: str) -> list[int]:
    """Every live process whose network namespace is `netns`, as `ip netns pids` finds them."""
    try:
        inode = os.stat(f"/run/netns/{netns}").st_ino
    except FileNotFoundError:
        return []
    target = f"net:[{inode}]"
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if os.readlink(f"/proc/{entry.name}/ns/net") == target:
                    pids.append(int(entry.name))
            except OSError:
                continue  # exited, or a zombie without namespaces
    return pids


def _proc_stat(pid: int) -> list[str] | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return data.rsplit(")", 1)[1].split()  # fields from 3 (state) on; comm may hold spaces


def _is_running(pid: int) -> bool:
    fields = _proc_stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def _start_time(pid: int) -> int | None:
    fields = _proc_stat(pid)
    return int(fields[19]) if fields is not None else None  # field 22, starttime


def _children_of(parent: int) -> list[int]:
    children = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _proc_stat(int(entry.name))
            if fields is not None and int(fields[1]) == parent:
                children.append(int(entry.name))
    return children


def _exe(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def _write_if_changed(path: Path, text: str, mode: int) -> bool:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.read_text() == text:
        if path.stat().st_mode & 0o7777 != mode:
            os.chmod(path, mode)
        return False
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    return True


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(empty log)"


# -- CLI ----------------------------------------------------------------------------------


def setup_arg_parser() -> argparse.ArgumentParser:
    """Build the parser for `python -m tests.support.testbed`."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--name",
        default=DEFAULT_NAME,
        metavar="NAME",
        help=f"Testbed name, prefix of all it creates (default: {DEFAULT_NAME}).",
    )
    common.add_argument(
        "--subnet",
        default=None,
        metavar="CIDR",
        help=f"IPv4 subnet of controller and hosts (default: {DEFAULT_SUBNET}).",
    )
    common.add_argument(
        "--state-root",
        type=Path,
        metavar="DIR",
        default=DEFAULT_STATE_ROOT,
        help=f"Directory holding each testbed's keys and state (default: {DEFAULT_STATE_ROOT}).",
    )
    common.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    common.add_argument(
        "--debug", action="store_true", help="Log every command and show tracebacks."
    )

    parser = argparse.ArgumentParser(
        prog="python -m tests.support.testbed",
        description="Run N real SSH hosts in network namespaces on this Linux machine.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{up,status,down}")
    up = sub.add_parser(
        "up",
        parents=[common],
        help="Create the testbed, or verify the running one, and write its inventory.",
    )
    up.add_argument(
        "--hosts",
        type=_positive_int,
        metavar="N",
        default=None,
        help=f"Number of hosts (default: {DEFAULT_HOSTS}, or what is running).",
    )
    up.add_argument(
        "--pin",
        action="store_true",
        help="Give host i CPU i-1 (modulo the machine's CPUs) of its own; see --cpus.",
    )
    up.add_argument(
        "--cpus",
        type=_host_values,
        metavar="H=CPUS,...",
        default=None,
        help="CPUs per host, e.g. h1=0,h2=1 (a cpuset cgroup each; wins over --pin).",
    )
    up.add_argument(
        "--memory",
        type=_host_values,
        metavar="SIZE|H=SIZE,...",
        default=None,
        help="Memory limit of every host (600M) or per host (h1=600M,h2=300M), by cgroup.",
    )
    up.add_argument(
        "--inventory",
        type=Path,
        metavar="PATH",
        default=DEFAULT_INVENTORY,
        help="Where to write the Ansible inventory (default: inventory/testbed/hosts.yml).",
    )
    sub.add_parser(
        "status",
        parents=[common],
        help="Show every host's address, sshd and reachability; exit 1 unless all are up.",
    )
    sub.add_parser(
        "down", parents=[common], help="Remove everything the testbed created, and nothing else."
    )
    return parser


def _host_values(text: str) -> dict[str, str]:
    """ "h1=0,h2=1" -> {"h1": "0", "h2": "1"}; a bare "600M" -> {"*": "600M"} (every host)."""
    if "=" not in text:
        return {"*": text}
    pairs = [item.split("=", 1) for item in text.split(",") if item]
    if any(len(pair) != 2 or not pair[0] for pair in pairs):
        raise argparse.ArgumentTypeError(f"write {text!r} as h1=VALUE,h2=VALUE")
    return dict(pairs)


def _host_limits(args: argparse.Namespace, count: int) -> tuple[dict | None, dict | None]:
    """The --pin/--cpus/--memory of `up` as the Testbed's cpus and memory mappings."""
    names = [f"h{i}" for i in range(1, count + 1)]
    cpus = None
    if args.pin:
        available = _cpu_list(_root_cpus())
        cpus = {name: str(available[i % len(available)]) for i, name in enumerate(names)}
    if args.cpus:
        cpus = {**(cpus or {}), **args.cpus}
    memory = args.memory
    if memory and "*" in memory:
        memory = {name: memory["*"] for name in names}
    return cpus, memory


def _cpu_list(text: str) -> list[int]:
    cpus: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        cpus += range(int(low), int(high or low) + 1)
    return cpus


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _format_table(statuses: Sequence[HostStatus]) -> str:
    rows = [("HOST", "IP", "NETNS", "SSHD", "LINK", "SSH", "CPUS", "MEMORY")]
    rows += [
        (
            s.name,
            s.ip,
            s.netns,
            str(s.sshd_pid) if s.sshd_pid is not None else "-",
            "up" if s.link_up else "down",
            "ok" if s.reachable else "unreachable",
            s.cpus or "all",
            f"{s.memory_bytes / 2**20:.0f} MiB" if s.memory_bytes else "no limit",
        )
        for s in statuses
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def _report(testbed: Testbed, statuses: list[HostStatus], as_json: bool, **extra: Any) -> int:
    healthy = bool(statuses) and all(s.reachable for s in statuses)
    if as_json:
        payload = {
            "name": testbed.name,
            "up": bool(statuses),
            "healthy": healthy,
            **extra,
            "hosts": [dataclasses.asdict(s) for s in statuses],
        }
        if statuses:
            payload.update(
                controller_ip=testbed.controller_ip,
                key=str(testbed.key_path),
                known_hosts=str(testbed.known_hosts_path),
            )
        print(json.dumps(payload, indent=2))
    elif not statuses:
        print(f"testbed {testbed.name!r} is down")
    else:
        print(f"testbed {testbed.name!r}: controller {testbed.controller_ip}")
        print(_format_table(statuses))
        for key, value in extra.items():
            if not isinstance(value, list):
                print(f"{key}: {value}")
    return 0 if healthy else 1


def _cmd_up(testbed: Testbed, args: argparse.Namespace) -> int:
    actions = testbed.up()
    inventory = testbed.write_inventory(args.inventory)
    return _report(testbed, testbed.status(), args.json, actions=actions, inventory=str(inventory))


def _cmd_status(testbed: Testbed, args: argparse.Namespace) -> int:
    return _report(testbed, testbed.status(), args.json)


def _cmd_down(testbed: Testbed, args: argparse.Namespace) -> int:
    removed = testbed.down()
    if args.json:
        print(json.dumps({"name": testbed.name, "removed": removed}, indent=2))
    else:
        print(f"testbed {testbed.name!r} is down")
    return 0


_COMMANDS: dict[str, Callable[[Testbed, argparse.Namespace], int]] = {
    "up": _cmd_up,
    "status": _cmd_status,
    "down": _cmd_down,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the testbed CLI; returns 0 on success, 1 on a runtime failure, 2 on bad usage."""
    parser = setup_arg_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has already printed usage
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="testbed: %(message)s",
        stream=sys.stderr,
    )
    try:
        cpus = memory = None
        if args.command == "up":
            count = args.hosts or len(Testbed(args.name, state_root=args.state_root).hosts)
            cpus, memory = _host_limits(args, count)
        testbed = Testbed(
            args.name,
            hosts=getattr(args, "hosts", None),
            subnet=args.subnet,
            state_root=args.state_root,
            cpus=cpus,
            memory=memory,
        )
        return _COMMANDS[args.command](testbed, args)
    except Exception as exc:
        if args.debug:
            logger.exception("%s failed", args.command)
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return exc.exit_code if isinstance(exc, TestbedError) else 1


if __name__ == "__main__":
    raise SystemExit(main())
